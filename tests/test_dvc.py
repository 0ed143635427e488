"""`dvc repro` of the pipeline on a small catalog, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.core.retrieval import TASKS
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def _copy_repository(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# about 80 s: with the slow tests (CI runs them after make test)
@pytest.mark.slow
def test_dvc_repro_builds_a_small_catalog_reproducibly_and_runs_an_experiment(tmp_path):
    _copy_repository(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["catalog"]["max_listings"] = 25
    params["featurize"]["image_size"] = 96
    # 25 listings leave almost no test queries: recall gates mean nothing at this size
    params["evaluate"]["gates"]["min"] = {}
    params["evaluate"]["gates"]["min_gain_over_frozen"] = {}
    params["evaluate"]["gates"]["min_queries"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    first = _dvc(["repro"], tmp_path)
    second = _dvc(["repro"], tmp_path)

    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads((tmp_path / "artifacts/validate/report.json").read_text())
    assert (report["total"], report["clean"], report["quarantined"]) == (25, 25, 0)
    assert second.returncode == 0, second.stdout + second.stderr
    stages = ("catalog", "validate", "featurize", "train", "embed", "index", "evaluate", "promote")
    for stage in stages:
        assert f"Stage '{stage}' didn't change" in second.stdout
    metrics = json.loads(_dvc(["metrics", "show", "--json"], tmp_path).stdout)
    (values,) = [v["data"] for v in metrics.values()]
    assert list(values) == ["artifacts/evaluate/metrics.json"]  # the headline, one file
    evaluated = values["artifacts/evaluate/metrics.json"]["data"]
    assert 0.0 <= evaluated["query_to_listing/recall@10"] <= 1.0
    gates = json.loads((tmp_path / "artifacts/evaluate/gates.json").read_text())
    assert gates and all(g["passed"] for g in gates)
    promoted = json.loads((tmp_path / "artifacts/promote/run.json").read_text())
    current = json.loads((tmp_path / "artifacts/production/indices/CURRENT").read_text())
    assert current["version"] == promoted["version"] and current["model"]["version"] == "1"
    plots = _dvc(["plots", "show", "--json"], tmp_path)
    assert plots.returncode == 0 and len(json.loads(plots.stdout)) == 2  # each plot once

    # what dvc.lock hashes is what the inputs decide: every stage again from scratch, with
    # the first release now the champion, a second registered version and another clock,
    # gives the same lock file byte for byte
    locked = (tmp_path / "dvc.lock").read_text()
    again = _dvc(["repro", "--force", "--no-run-cache"], tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("Running stage") == 8
    assert "vs champion v1" in again.stdout  # evaluate compared with the first release
    assert (tmp_path / "dvc.lock").read_text() == locked
    current = json.loads((tmp_path / "artifacts/production/indices/CURRENT").read_text())

    # an ablation as a DVC experiment, up to evaluate (an experiment never promotes)
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True, capture_output=True)
    # the headline metrics are committed; commit the details too, to diff MRR below
    details = "artifacts/evaluate/details.json"
    subprocess.run([*git, "add", "-f", details], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=tmp_path, check=True)
    # at 25 listings the default model finds every query's listing: an untrained MLP does not
    ablation = ["-S", "train.adapter=mlp", "-S", "train.epochs=1", "-S", "evaluate.champion=null"]
    experiment = _dvc(["exp", "run", "evaluate", *ablation], tmp_path)
    assert experiment.returncode == 0, experiment.stdout + experiment.stderr
    assert "Running stage 'train'" in experiment.stdout
    assert "Running stage 'promote'" not in experiment.stdout
    # the headline saturates at 25 listings (recall@10 1.0 either way); MRR does not
    diff = _dvc(["metrics", "diff", "--json", "--targets", details], tmp_path)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert json.loads(diff.stdout)[details]["query_to_listing/mrr"]["diff"] < 0
    plots = _dvc(["plots", "diff", "--json"], tmp_path)
    assert plots.returncode == 0 and "recall_curves.json" in plots.stdout
    current_after = json.loads((tmp_path / "artifacts/production/indices/CURRENT").read_text())
    assert current_after == current


INKED = """
const canvas = arguments[0];
const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let inked = 0;
for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) inked++;
return inked;
"""


def test_dvc_plots_render_with_no_network(tmp_path):
    """`dvc plots show` with this repository's plots and page: every plot drawn in a
    browser whose every request to the network fails (a proxy on a closed port)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.harness.browser import chrome, require_browser

    require_browser()
    for name in ("dvc.yaml", ".dvc/config", ".dvc/plots.html"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    history = [{"epoch": e, "loss": 1.0 / e, "val/score": 0.5 + e / 10} for e in (1, 2, 3)]
    curves = [
        {"k": k, **{f"{task}/{who}": k / 100 for task in TASKS for who in ("model", "frozen")}}
        for k in (1, 10, 50)
    ]
    for path, rows in (("train/history.json", history), ("evaluate/recall_curves.json", curves)):
        (tmp_path / "artifacts" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "artifacts" / path).write_text(json.dumps(rows))

    shown = _dvc(["plots", "show", "-o", "plots"], tmp_path)

    assert shown.returncode == 0, shown.stdout + shown.stderr
    page = tmp_path / "plots" / "index.html"
    driver = chrome("--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>")
    try:
        driver.get(page.as_uri())
        charts = "return document.querySelectorAll('.vega-embed canvas.marks').length"
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(charts) == 2)
        inked = [  # pixels drawn on each chart: axes, titles, lines
            driver.execute_script(INKED, canvas)
            for canvas in driver.find_elements(By.CSS_SELECTOR, ".vega-embed canvas.marks")
        ]
    finally:
        driver.quit()
    assert min(inked) > 2000, inked
