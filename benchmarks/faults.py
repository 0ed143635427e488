"""The fault suite's figures: kill -9 at several points of every step, storage faults
under promote, hostile images under validate. Prints one table per part.

1. **kill -9.** A small sample catalog runs featurize .. promote once uninterrupted (the
   reference), then again in another workdir where each step is killed with SIGKILL at
   `--fractions` of its reference duration, checked (every visible file of the step
   parses whole; the production store's CURRENT names a whole release) and run again to
   completion. The result is compared with the reference: output hashes, and where those
   differ, the values (model weights, embeddings, index answers, metrics).
2. **Storage faults** (`--storage`): the scenarios of tests/test_storage_faults.py
   through tests/harness/fault_proxy.py, with the error each failure printed.
3. **Bad inputs**: the hostile-image catalog of benchmarks/large_images.py (validate's
   decisions and peak memory are printed there).

    .venv/bin/python benchmarks/faults.py [--listings 120] [--fractions 0.2 0.5 0.8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.contract import STEP_ORDER  # noqa: E402

STEPS = [step for step in STEP_ORDER if step not in ("catalog", "validate")]
OVERRIDES = [
    "evaluate.champion=null",
    "evaluate.gates.min={}",
    "evaluate.gates.max_regression={}",
    "evaluate.gates.min_gain_over_frozen={}",
    "evaluate.bootstrap=100",
]


def command(step: str, workdir: Path, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "components", step, "--set", f"paths.workdir={workdir}"]
    for override in [*OVERRIDES, *extra]:
        argv += ["--set", override]
    return argv


def run(step: str, workdir: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command(step, workdir, extra), cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{step} failed in {workdir}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def kill_at(step: str, workdir: Path, extra: list[str], after: float) -> bool:
    """Start the step, SIGKILL it after `after` seconds; False if it finished first."""
    process = subprocess.Popen(
        command(step, workdir, extra),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        process.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def unreadable_files(folder: Path) -> list[str]:
    """Visible files of a step folder that do not parse whole (temp files are hidden by
    name: a leading dot or a .tmp suffix)."""
    import faiss
    import pyarrow.parquet as pq
    import torch

    readers = {
        ".json": lambda p: json.loads(p.read_text()),
        ".parquet": pq.read_metadata,
        ".npy": lambda p: np.load(p, mmap_mode="r"),
        ".pt": lambda p: torch.load(p, weights_only=True),
        ".faiss": lambda p: faiss.read_index(str(p)),
    }
    bad = []
    for path in sorted(folder.rglob("*")) if folder.exists() else []:
        if not path.is_file() or path.name.startswith(".") or ".tmp" in path.name:
            continue
        reader = readers.get(path.suffix)
        if reader is None:
            continue
        try:
            reader(path)
        except Exception as err:
            bad.append(f"{path.relative_to(folder)}: {type(err).__name__}")
    return bad


def store_whole(workdir: Path) -> str:
    """'none', or the version CURRENT names once its every byte was verified."""
    from components.config import StorageConfig
    from components.release import production
    from components.release.storage import open_storage

    store = open_storage(StorageConfig(uri=str(workdir / "production")))
    pointer = production.read_pointer(store)
    if pointer is None:
        return "none"
    manifest = production.read_manifest(store, pointer.version, pointer.manifest_sha256)
    production.verify(store, pointer.version, manifest)
    return pointer.version


def compare(step: str, ref: Path, got: Path) -> str:
    """'identical' when the step's recorded output hashes match; else what differs, by
    value."""
    from components.io.manifest import read_manifest

    if step == "promote":
        return _compare_releases(ref, got)
    a, b = read_manifest(ref / step)["outputs"], read_manifest(got / step)["outputs"]
    differ = sorted(name for name in a if a[name]["sha256"] != b.get(name, {}).get("sha256"))
    notes = [f"{name}: {_by_value(step, name, ref / step, got / step)}" for name in differ]
    if step == "featurize":
        notes.append(_compare_stores(ref / step, got / step))
    return "; ".join(notes) or "identical"


def _compare_stores(ref: Path, got: Path) -> str:
    """The feature store's vectors of every view and query key, run against run."""
    import pyarrow.parquet as pq

    from components.io.feature_store import FeatureStore
    from components.io.manifest import read_manifest

    keys = pq.read_table(ref / "views.parquet").column("key").to_pylist()
    keys += pq.read_table(ref / "queries.parquet").column("key").to_pylist()
    worst, count = 0.0, 0
    for encoder in read_manifest(ref)["encoders"].values():
        stores = [FeatureStore(r / "store", encoder["id"], encoder["dim"]) for r in (ref, got)]
        mine = sorted({k for k in keys if k in stores[0]})
        vectors = [store.get(mine) for store in stores]
        worst, count = max(worst, float(np.abs(vectors[0] - vectors[1]).max())), count + len(mine)
    return f"feature store: {count} vectors, equal to within {worst:.1e}"


def _by_value(step: str, name: str, ref: Path, got: Path) -> str:
    import faiss
    import torch

    if name.endswith(".pt"):
        x, y = torch.load(ref / name), torch.load(got / name)
        worst = max(float((x[k].float() - y[k].float()).abs().max()) for k in x)
        return f"weights differ by at most {worst:.1e}"
    if name == "embeddings":
        x = np.concatenate([np.load(p) for p in sorted((ref / name).glob("*.npy"))])
        y = np.concatenate([np.load(p) for p in sorted((got / name).glob("*.npy"))])
        return f"embeddings differ by at most {np.abs(x - y).max():.1e}"
    if name.endswith(".faiss"):
        x, y = faiss.read_index(str(ref / name)), faiss.read_index(str(got / name))
        probe = x.reconstruct_n(0, min(200, x.ntotal))
        same = (x.search(probe, 10)[1] == y.search(probe, 10)[1]).mean()
        return f"same top-10 for {same:.1%} of 200 probes"
    if name.endswith(".json"):
        x, y = json.loads((ref / name).read_text()), json.loads((got / name).read_text())
        if isinstance(x, dict):
            recall = [k for k in x if "recall" in k and isinstance(x[k], int | float)]
            worst = max((abs(x[k] - y.get(k, np.nan)) for k in recall), default=0.0)
            return f"recall metrics differ by at most {worst:.1e} (timings differ)"
        return "differs"
    return "differs (bytes)"


def _compare_releases(ref: Path, got: Path) -> str:
    from components.config import StorageConfig
    from components.release import production
    from components.release.storage import open_storage

    releases = [
        production.load_current_index(
            open_storage(StorageConfig(uri=str(w / "production"))), w / "release-cache"
        )
        for w in (ref, got)
    ]
    same_ids = releases[0].ids == releases[1].ids
    complete = sum(
        v.complete
        for v in production.list_versions(open_storage(StorageConfig(uri=str(got / "production"))))
    )
    return (
        f"CURRENT whole, same listing ids: {same_ids}; complete versions in the store: {complete}"
    )


def registered_versions(workdir: Path) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    return len(client.search_model_versions("name='listing-encoder'"))


def kill_suite(base: Path, listings: int, fractions: list[float]) -> None:
    extra = [f"catalog.max_listings={listings}"]
    for step in ("catalog", "validate"):
        run(step, base, extra)
    ref, killed = base.parent / "reference", base.parent / "killed"
    for target in (ref, killed):
        shutil.copytree(base, target)
    durations = {step: run(step, ref, extra) for step in STEPS}
    print(f"reference run ({listings} listings), seconds per step: ", end="")
    print(", ".join(f"{s} {d:.1f}" for s, d in durations.items()))
    print()
    print("| step | kill at s | killed | visible files unreadable | CURRENT after kill |")
    print("|---|---|---|---|---|")
    tried = survived = 0
    outcomes = {}
    for step in STEPS:
        for fraction in fractions:
            after = fraction * durations[step]
            killed_it = kill_at(step, killed, extra, after)
            bad = unreadable_files(killed / step)
            try:
                current = store_whole(killed)
            except Exception as err:
                current = f"BROKEN: {err}"
            tried += killed_it
            ok = not bad and not current.startswith("BROKEN")
            survived += killed_it and ok
            print(
                f"| {step} | {after:.1f} | {'yes' if killed_it else 'no (done first)'} | "
                f"{', '.join(bad) or 'none'} | {current} |"
            )
        run(step, killed, extra)
        outcomes[step] = compare(step, ref, killed)
    print()
    print("| step | rerun after the kills vs the uninterrupted run |")
    print("|---|---|")
    for step, outcome in outcomes.items():
        print(f"| {step} | {outcome} |")
    print()
    versions = registered_versions(ref), registered_versions(killed)
    print(
        f"kill points tried {tried}, survived {survived} (no unreadable visible file, CURRENT "
        f"whole); registered model versions: reference {versions[0]}, killed run {versions[1]}"
    )


def storage_suite() -> None:
    import pytest

    print()
    print("storage faults (tests/test_storage_faults.py through the fault proxy):")
    test = str(REPO / "tests/test_storage_faults.py")
    code = pytest.main(["-v", "--no-header", "-p", "no:cacheprovider", "-p", "no:warnings", test])
    print(f"pytest exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listings", type=int, default=120)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--storage", action="store_true", help="also run the storage faults")
    parser.add_argument("--out", type=Path, default=None, help="keep the workdirs here")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="faults-"))
    kill_suite(root / "base", args.listings, args.fractions)
    if args.storage:
        storage_suite()


if __name__ == "__main__":
    main()
