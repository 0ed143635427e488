"""`make metrics` prints every metric long, one per line, where `dvc metrics show` on
details.json prints one ~5,000-character line."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import show_metrics


def test_each_metric_on_a_line_of_its_own_by_dvc_s_name(tmp_path):
    details = {f"diagnostics/metric_{i}": i / 7 for i in range(95)}
    details["champion"] = {"query_to_listing": {"recall@10": 0.5}}  # nested: a/b names
    (tmp_path / "details.json").write_text(json.dumps(details))

    text = show_metrics.render([tmp_path / "details.json", tmp_path / "absent.json"])

    lines = text.splitlines()
    assert len(lines) == 1 + 96 + 2  # a heading, every metric, the absent file said
    assert "  champion/query_to_listing/recall@10" in text and "0.5000" in text
    assert max(len(line) for line in lines) < 100
    assert lines[-1] == "  (not there: run the pipeline, make run)"
