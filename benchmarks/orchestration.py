"""End-to-end wall time of the whole pipeline on the sample catalog: `dvc repro` and the
Airflow DAG's `dag.test()` in local mode, each cold (empty workdir) and warm (nothing
changed), in one run, with the orchestration overhead as a ratio.

Each runs in its own copy (dvc: a copy of the repository; Airflow: its own AIRFLOW_HOME
and workdir), with the same params and the same optional data. Airflow's one-time
`airflow db migrate` is timed apart.

    .venv/bin/python benchmarks/orchestration.py [--max-listings N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "harness" / "airflow_dag.py"


def timed(command: list[str], **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done


def copy_repository(dest: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    if (ROOT / ".cache").is_dir():  # the same optional data as the repository's runs
        (dest / ".cache").symlink_to(ROOT / ".cache")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-listings", type=int, default=None, help="null: every listing")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="orchestration-bench-"))
    overrides = [f"catalog.max_listings={args.max_listings}"] if args.max_listings else []
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    rows = []

    repo = scratch / "repo"
    copy_repository(repo)
    if overrides:
        import yaml

        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["catalog"]["max_listings"] = args.max_listings
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for label in ("dvc repro, cold", "dvc repro, warm"):
        seconds, _ = timed([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env)
        rows.append((label, seconds))
        print(f"{label}: {seconds:.1f} s", flush=True)

    airflow_env = {
        **env,
        "AIRFLOW_HOME": str(scratch / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    seconds, _ = timed([sys.executable, "-m", "airflow", "db", "migrate"], env=airflow_env)
    print(f"airflow db migrate (once): {seconds:.1f} s", flush=True)
    work = scratch / "dag-work"
    dag_overrides = json.dumps([f"paths.workdir={work}", *overrides])
    states = {}
    for label in ("dag.test() local, cold", "dag.test() local, warm"):
        seconds, done = timed(
            [sys.executable, str(HARNESS), "test", dag_overrides], cwd=ROOT, env=airflow_env
        )
        states[label] = json.loads(done.stdout.strip().splitlines()[-1])["state"]
        rows.append((label, seconds))
        print(f"{label}: {seconds:.1f} s ({states[label]})", flush=True)

    dvc_metrics = json.loads((repo / "artifacts/evaluate/metrics.json").read_text())
    dag_metrics = json.loads((work / "evaluate/metrics.json").read_text())
    cold = rows[0][1]
    print("\n| run | wall s | vs dvc repro cold |\n|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / cold:.2f} |")
    key = "query_to_listing/recall@10"
    print(
        f"\nquery->listing recall@10: dvc {dvc_metrics[key]:.4f}, dag.test {dag_metrics[key]:.4f}"
    )
    print(f"scratch: {scratch}")


if __name__ == "__main__":
    main()
