"""One step at a time per work directory: a second run is refused, a killed holder
leaves no stale lock."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from components.cli import main
from components.io.workdir_lock import LOCK_NAME, WorkdirBusy, holding
from tests.conftest import REPO_ROOT, listing

HOLD = """
import sys, time
from pathlib import Path
from components.io.workdir_lock import holding
with holding(Path(sys.argv[1]), "train"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_step_on_a_busy_workdir_is_refused_naming_the_holder(
    make_catalog, tmp_path, capsys
):
    root = make_catalog([listing("a"), listing("b")])
    work = tmp_path / "work"
    argv = ["validate", "--params", str(REPO_ROOT / "params.yaml")]
    argv += ["--set", f"paths.workdir={work}", "--set", f"paths.catalog={root}"]
    argv += ["--set", "validate.min_clean_listings=0"]
    argv += ["--set", "validate.require_eval_queries=false"]

    with holding(work, "train"):
        refused = main(argv)
        err = capsys.readouterr().err
        assert not (work / "validate" / "manifest.json").exists()

    assert refused == 1 and f"{work} is in use (step train, pid " in err
    assert "paths.workdir" in err
    assert main(argv) == 0  # free again once the holder is done


def test_a_holder_killed_with_sigkill_leaves_the_workdir_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(WorkdirBusy, match=r"step train, pid \d+"), holding(tmp_path, "embed"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)

    with holding(tmp_path, "embed"):  # non-blocking: a stale lock would raise here
        assert "step embed" in (tmp_path / LOCK_NAME).read_text()


def test_shards_of_a_step_run_side_by_side_and_keep_other_steps_out(tmp_path):
    with holding(tmp_path, "featurize", "0-of-2"), holding(tmp_path, "featurize", "1-of-2"):
        with (
            pytest.raises(WorkdirBusy, match="shards of a sharded step"),
            holding(tmp_path, "train"),
        ):
            pass
        with (
            pytest.raises(WorkdirBusy, match="featurize shard 0-of-2, pid"),
            holding(tmp_path, "featurize", "0-of-2"),
        ):
            pass
    with (
        holding(tmp_path, "train"),
        pytest.raises(WorkdirBusy, match="step train"),
        holding(tmp_path, "featurize", "0-of-2"),
    ):
        pass
