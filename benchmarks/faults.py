"""The fault suite's figures: kill -9 at several points of every step, storage faults
under promote, hostile images under validate. Prints one table per part.

1. **kill -9.** A small sample catalog runs featurize .. promote once uninterrupted (the
   reference), then again in another workdir where each step is killed with SIGKILL at
   `--fractions` of its reference duration, checked (every visible file of the step
   parses whole; the production store's CURRENT names a whole release) and run again to
   completion. The result is compared with the reference: output hashes, and where those
   differ, the values (model weights, embeddings, index answers, metrics).
2. **First-run initialisation**: train on a workdir without a tracking store, killed at
   points inside the store's creation found by polling its temporary file (a share of a
   whole store's tables) and inside the model's first registration (the registered model
   written, its first version not yet), then run again; the store left in place, the
   registered versions and the weights are compared with an uninterrupted run.
3. **Refresh**: on the reference's release, the catalog changed (3 listings retitled, 2
   removed, 1 new), `refresh` killed at `--refresh-at` shares of its uninterrupted
   duration, checked as above after each kill, then run again to completion and compared
   with an uninterrupted refresh.
4. **Storage faults** (`--storage`): the scenarios of tests/test_storage_faults.py
   through tests/harness/fault_proxy.py, with the error each failure printed.
5. **Bad inputs**: the hostile-image catalog of benchmarks/large_images.py (validate's
   decisions and peak memory are printed there).

    .venv/bin/python benchmarks/faults.py [--listings 120] [--fractions 0.2 0.5 0.8] \
        [--suites kill creation refresh] [--storage]
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
from tests.harness.creation_kills import (  # noqa: E402
    kill_during_creation,
    kill_when,
    table_count,
)

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
    a, b = releases[0].ids, releases[1].ids
    same_ids = a.listing_ids == b.listing_ids and np.array_equal(a.labels, b.labels)
    complete = sum(
        v.complete
        for v in production.list_versions(open_storage(StorageConfig(uri=str(got / "production"))))
    )
    return (
        f"CURRENT whole, same listing ids and labels: {same_ids}; complete versions in the "
        f"store: {complete}"
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


# what a workdir holds after featurize: everything but these is copied for a first train
AFTER_FEATURIZE = (*STEPS[1:], "production", "mlartifacts", "*mlflow.db*", ".lock")


def creation_suite(base: Path, extra: list[str], shares: list[float]) -> None:
    """Kill train inside the first-run initialisation of its tracking store and of its
    registered model, then rerun; compare with the uninterrupted reference run."""
    from components.io.manifest import sha256_file
    from components.release.tracking_store import ensure_whole

    reference = base.parent / "reference"
    weights = sha256_file(reference / "train" / "model.pt")
    whole = base.parent / "whole-store" / "mlflow.db"
    ensure_whole(whole)
    tables = table_count(whole)
    print()
    print(f"first-run initialisation (a whole tracking store has {tables} tables):")
    print()
    print("| kill point | killed inside | store left in place | rerun | versions | weights |")
    print("|---|---|---|---|---|---|")
    points = [(f"store creation, {share:.0%} of tables", int(share * tables)) for share in shares]
    for name, at in [*points, ("first registration", None)]:
        work = base.parent / f"init-{len(list(base.parent.glob('init-*')))}"
        shutil.copytree(reference, work, ignore=shutil.ignore_patterns(*AFTER_FEATURIZE))
        argv = command("train", work, extra)
        if at is None:
            killed = _kill_inside_registration(argv, work / "mlflow.db")
        else:
            killed = kill_during_creation(argv, REPO, work / "mlflow.db", at) is not None
        left = (work / "mlflow.db").exists()
        rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        outcome = "ok" if rerun.returncode == 0 else rerun.stderr.strip().splitlines()[-1][:80]
        same = rerun.returncode == 0 and sha256_file(work / "train" / "model.pt") == weights
        print(
            f"| {name} | {'yes' if killed else 'no (passed first)'} | {'yes' if left else 'no'}"
            f" | {outcome} | {registered_versions(work) if rerun.returncode == 0 else '-'} | "
            f"{'as uninterrupted' if same else 'DIFFERENT'} |"
        )


def _kill_inside_registration(argv: list[str], db: Path) -> bool:
    """Run train and SIGKILL it once its registered model exists without a version."""
    import sqlite3

    query = "select (select count(*) from registered_models), (select count(*) from model_versions)"

    def reached() -> bool | None:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0) as conn:
                models, versions = conn.execute(query).fetchone()
        except sqlite3.Error:
            return None
        return True if models and not versions else None

    return kill_when(argv, REPO, reached, every=0.001) is not None


def refresh_suite(base: Path, extra: list[str], fractions: list[float]) -> None:
    """Kill `refresh` at `fractions` of its uninterrupted duration on a changed catalog,
    then rerun it; CURRENT must be whole after every kill and the rerun's release the
    uninterrupted one's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    reference = base.parent / "reference"  # a promoted retrain (the kill suite's)
    changed = base.parent / "refresh-base"
    shutil.copytree(reference, changed)
    listings = changed / "catalog" / "listings.parquet"
    rows = pq.read_table(listings).to_pylist()
    for row in rows[:3]:
        row["title"] += " (second edition)"
    rows = [*rows[:-2], dict(rows[5], listing_id="new-listing", title="A new " + rows[5]["title"])]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(listings)), listings)
    ref, killed = base.parent / "refresh-reference", base.parent / "refresh-killed"
    for target in (ref, killed):
        shutil.copytree(changed, target)
    duration = run("refresh", ref, extra)
    print()
    print(f"refresh (3 retitled, 2 removed, 1 new), uninterrupted {duration:.1f} s:")
    print()
    print("| kill at s | killed | visible files unreadable | CURRENT after kill |")
    print("|---|---|---|---|")
    for fraction in fractions:
        after = fraction * duration
        killed_it = kill_at("refresh", killed, extra, after)
        bad = [f"{step}/{b}" for step in STEPS for b in unreadable_files(killed / step)]
        try:
            current = store_whole(killed)
        except Exception as err:
            current = f"BROKEN: {err}"
        print(
            f"| {after:.1f} | {'yes' if killed_it else 'no (done first)'} | "
            f"{', '.join(bad) or 'none'} | {current} |"
        )
    run("refresh", killed, extra)
    print()
    print("| refresh rerun after the kills vs the uninterrupted refresh | |")
    print("|---|---|")
    for step in ("embed", "index", "evaluate", "promote"):
        print(f"| {step} | {compare(step, ref, killed)} |")


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
    parser.add_argument(
        "--init-shares",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 0.95],
        help="kill points inside the tracking store's creation, as shares of its tables",
    )
    parser.add_argument(
        "--refresh-at",
        type=float,
        nargs="+",
        default=[0.25, 0.5, 0.85, 0.97],
        help="kill points of refresh, as shares of its uninterrupted duration",
    )
    parser.add_argument(
        "--suites",
        nargs="+",
        choices=["kill", "creation", "refresh"],
        default=["kill", "creation", "refresh"],
    )
    parser.add_argument("--storage", action="store_true", help="also run the storage faults")
    parser.add_argument("--out", type=Path, default=None, help="keep the workdirs here")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="faults-"))
    extra = [f"catalog.max_listings={args.listings}"]
    if "kill" in args.suites:
        kill_suite(root / "base", args.listings, args.fractions)
    else:  # the other suites start from the uninterrupted reference run
        for step in ("catalog", "validate", *STEPS):
            run(step, root / "reference", extra)
    if "creation" in args.suites:
        creation_suite(root / "base", extra, args.init_shares)
    if "refresh" in args.suites:
        refresh_suite(root / "base", extra, args.refresh_at)
    if args.storage:
        storage_suite()


if __name__ == "__main__":
    main()
