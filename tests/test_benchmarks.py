"""Benchmarks that the suite runs small, so that they still run when they are needed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_prints_its_table():
    """The prepared GPU check (benchmarks/gpu.sh) as a smoke test: every row measured."""
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    table = {row.split(" | ")[0].lstrip("| "): row for row in rows[1:]}
    for what in (
        "train step, factorized",
        "train step, pairwise",
        "featurize images, efficientnet-lite0",
        "featurize images, efficientnet-lite2",
        "embed listings",
    ):
        assert what in table, f"{what} missing from:\n{done.stdout}"
    for row in rows[1:]:
        value = float(row.split(" | ")[2])
        assert value > 0, row
