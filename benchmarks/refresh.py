"""A refresh against a retrain, the index delta at a million listings, and the staleness
alarm's false and true positives.

    .venv/bin/python benchmarks/refresh.py [--stages catalog delta staleness] \
        [--listings N] [--release artifacts] [--size 1000000] [--trials 20]

- catalog: the sample catalog with 5% of its listings held back (hash-chosen) is retrained
  and promoted in a work dir of its own (not measured). Then the catalog changes: the 5%
  come back as new listings, 3% change (half retitled, half with a mirrored primary photo)
  and 2% are removed. On two copies of that work dir, one run each: `python -m components
  refresh`, and the retrain's steps validate .. promote, one process each as `dvc repro`
  runs them. Reported: both wall times and their ratio; what refresh's embed reused, added,
  changed and removed, and what featurize encoded; the reused vectors against a full embed
  with the same model (bitwise); and each new listing found by its own title through the
  refreshed index (recall@10) next to old listings found the same way.
- delta: `--size` vectors fitted to a real release (`--release`, as benchmarks/scale.py
  does) in the scale benchmark's index type for that size, built in full by the index step
  and published as a release; then 1% of them changed (0.5% removed, 0.5% new): the index
  step with `index.update_current` against a full build of the same vectors, each in a
  fresh process; ANN recall@10 of both against exact search.
- staleness: the drift test (core/drift.py, as evaluate runs it) on `--trials` seeded
  random splits of the sample catalog's frozen profile into a "snapshot" and "now" half
  (no drift: an alarm is a false positive), then with the icons catalog's listings as 20%
  of "now" (an alarm is a true positive); and the new-share measure on each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sample_data import ensure_optional_data  # noqa: E402

RETRAIN = ("validate", "featurize", "train", "embed", "index", "evaluate", "promote")
SHARES = {"new": 0.05, "changed": 0.03, "removed": 0.02}


def _share(listing_id: str) -> float:
    """A stable number in [0, 1) per listing: which group it falls in."""
    return int(hashlib.sha256(listing_id.encode()).hexdigest()[:8], 16) / 2**32


def components(work: Path, *args: str, settings: tuple[str, ...] = ()) -> float:
    """Run `python -m components ARGS` on `work`; its wall seconds."""
    command = [sys.executable, "-m", "components", *args, "--set", f"paths.workdir={work}"]
    for setting in settings:
        command += ["--set", setting]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} on {work} failed:\n{done.stderr[-3000:]}")
    return seconds


# --- catalog: refresh against retrain ----------------------------------------------------


def hold_back(catalog: Path) -> tuple[list[dict], list[dict]]:
    """Take the new listings (and their queries) out of `catalog`; return them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    listings = pq.read_table(catalog / "listings.parquet")
    rows = listings.to_pylist()
    later = [r for r in rows if _share(r["listing_id"]) < SHARES["new"]]
    held = {r["listing_id"] for r in later}
    kept = [r for r in rows if r["listing_id"] not in held]
    pq.write_table(pa.Table.from_pylist(kept, schema=listings.schema), catalog / "listings.parquet")
    queries = pq.read_table(catalog / "queries.parquet")
    query_rows = queries.to_pylist()
    later_queries = [q for q in query_rows if q["listing_id"] in held]
    pq.write_table(
        pa.Table.from_pylist(
            [q for q in query_rows if q["listing_id"] not in held], schema=queries.schema
        ),
        catalog / "queries.parquet",
    )
    return later, later_queries


def change(catalog: Path, later: list[dict], later_queries: list[dict]) -> dict:
    """The catalog a week on: the held-back listings new, 3% changed, 2% removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageOps

    listings = pq.read_table(catalog / "listings.parquet")
    rows, groups = [], {"added": [r["listing_id"] for r in later], "changed": [], "removed": []}
    low, high = SHARES["new"], SHARES["new"] + SHARES["changed"]
    for row in listings.to_pylist():
        u = _share(row["listing_id"])
        if u >= high + SHARES["removed"] or u < high - SHARES["changed"]:
            rows.append(row)
        elif u >= high:
            groups["removed"].append(row["listing_id"])
        elif u < (low + high) / 2:  # retitled
            rows.append(dict(row, title=f"{row['title']} (new edition)"))
            groups["changed"].append(row["listing_id"])
        else:  # a new primary photo
            source = row["image_uris"][0]
            mirrored = f"{source.rsplit('.', 1)[0]}-mirrored.png"
            ImageOps.mirror(Image.open(catalog / source).convert("RGBA")).save(catalog / mirrored)
            rows.append(dict(row, image_uris=[mirrored, *row["image_uris"][1:]]))
            groups["changed"].append(row["listing_id"])
    rows += later
    pq.write_table(pa.Table.from_pylist(rows, schema=listings.schema), catalog / "listings.parquet")
    queries = pq.read_table(catalog / "queries.parquet")
    gone = set(groups["removed"])
    kept = [q for q in queries.to_pylist() if q["listing_id"] not in gone] + later_queries
    pq.write_table(pa.Table.from_pylist(kept, schema=queries.schema), catalog / "queries.parquet")
    return groups | {"listings": len(rows), "before": listings.num_rows}


def title_recall(work: Path, listing_ids: list[str]) -> float:
    """recall@10 of each listing's own title as the query, through the current release's
    index, embedded by its model (as the service does)."""
    import pyarrow.parquet as pq
    import torch

    from components.config import StepPaths, StorageConfig
    from components.core.query_embedder import QueryEmbedder
    from components.release import registry
    from components.release.production import load_current_index
    from components.release.storage import open_storage

    paths = StepPaths(workdir=work, catalog=str(work / "catalog"))
    current = load_current_index(open_storage(StorageConfig(uri=str(work / "production"))))
    model = current.manifest["model"]
    uri = f"models:/{model['name']}/{model['version']}"
    loaded = registry.load_model(uri, paths, torch.device("cpu"))
    titles = {
        r["listing_id"]: r["title"]
        for r in pq.read_table(work / "catalog" / "listings.parquet").to_pylist()
    }
    queries = QueryEmbedder(loaded.model, loaded.spec, torch.device("cpu")).texts(
        [titles[i] for i in listing_ids]
    )
    _, labels = current.index.search(queries, 10)
    listing_of = current.ids.listing_of()
    hits = [
        listing_id in {listing_of.get(int(label)) for label in row}
        for listing_id, row in zip(listing_ids, labels, strict=True)
    ]
    return float(np.mean(hits))


def catalog_stage(scratch: Path, listings: int | None) -> dict:
    import pyarrow.parquet as pq

    base = scratch / "base"
    limit = () if listings is None else (f"catalog.max_listings={listings}",)
    components(base, "catalog", settings=limit)
    later, later_queries = hold_back(base / "catalog")
    start = time.perf_counter()
    for step in RETRAIN:
        components(base, step)
    first_retrain = time.perf_counter() - start
    groups = change(base / "catalog", later, later_queries)
    refreshed, retrained = scratch / "refresh", scratch / "retrain"
    for copy in (refreshed, retrained):
        shutil.copytree(base, copy, symlinks=True)
    # an explicit store and tracking URI: the copies must not publish into base's
    row = {"listings_before": groups["before"], "listings_after": groups["listings"]}
    row["refresh_s"] = components(refreshed, "refresh")
    row["retrain_s"] = sum(components(retrained, step) for step in RETRAIN)
    row["first_retrain_s"] = first_retrain
    embedded = json.loads((refreshed / "embed" / "manifest.json").read_text())["counts"]
    row["embed"] = {k: embedded.get(k) for k in ("reused", "added", "changed", "removed")}
    row["expected"] = {k: len(v) for k, v in groups.items() if isinstance(v, list)}
    featurized = json.loads((refreshed / "featurize" / "run.json").read_text())
    row["encoded"] = {k: featurized[f"{k}_encoded"] for k in ("images", "texts")}
    row["index"] = json.loads((refreshed / "index" / "manifest.json").read_text()).get("build")
    staleness = json.loads((refreshed / "evaluate" / "staleness.json").read_text())
    row["stale"], row["new_or_changed"] = staleness["stale"], staleness["new_or_changed"]
    row["bitwise"] = reused_against_full_embed(refreshed, scratch / "full")
    ids = pq.read_table(refreshed / "embed" / "listing_ids.parquet").column("listing_id")
    changed = set(groups["added"]) | set(groups["changed"])
    old = [i for i in ids.to_pylist() if i not in changed]
    old = old[:: max(1, len(old) // 500)]  # about 500 old listings
    row["title_recall_new"] = title_recall(refreshed, groups["added"])
    row["title_recall_old"] = title_recall(refreshed, old)
    return row


def reused_against_full_embed(refreshed: Path, full: Path) -> dict:
    """The refresh's vectors of unchanged listings against a full embed of the same catalog
    with the same model (the release's): how many are bitwise equal."""
    import pyarrow.parquet as pq

    from components.config import StepPaths
    from components.io.embedding_files import read_embeddings

    shutil.copytree(refreshed, full, symlinks=True)
    embedded = json.loads((refreshed / "embed" / "manifest.json").read_text())
    release = embedded["inputs"]["base"]
    # the model the refresh embedded with, as the registry names it
    components(full, "embed", settings=(f"embed.model={embedded['model']['source']}",))
    ids, vectors = read_embeddings(StepPaths(workdir=refreshed, catalog=str(refreshed)))
    full_ids, full_vectors = read_embeddings(StepPaths(workdir=full, catalog=str(full)))
    row_of = {i: r for r, i in enumerate(full_ids)}
    base = pq.read_table(
        refreshed / "embed" / "base" / release["version"] / "listing_ids.parquet"
    ).to_pylist()
    before = {r["listing_id"]: r["fingerprint"] for r in base}
    prints = pq.read_table(refreshed / "embed" / "listing_ids.parquet").to_pylist()
    reused = [r for r, p in enumerate(prints) if before.get(p["listing_id"]) == p["fingerprint"]]
    equal = sum(np.array_equal(vectors[r], full_vectors[row_of[ids[r]]]) for r in reused)
    return {"reused": len(reused), "bitwise_equal": int(equal)}


# --- delta: the index update at a million listings --------------------------------------


# an index type a refresh updates in place (a re-ranking one, scale.FACTORIES' default for
# large catalogs, cannot remove vectors: a refresh that removes listings rebuilds it)
UPDATED_IN_PLACE = ("IVF4096_HNSW32,SQ8", {"nprobe": 128})


def delta_stage(scratch: Path, size: int, release: Path) -> dict:
    import scale

    from components.io.embedding_files import embedding_parts

    factory, params = UPDATED_IN_PLACE
    real, real_queries = scale.release_vectors(release)
    mixture, _ = scale.calibrated(real, real_queries)
    work = scratch / "delta"
    scale.build_embeddings(work, mixture, size)
    _fingerprinted(work / "embed")
    full_s = _index_child(work, factory, params, update=False)["seconds"]
    version = publish_index(work, factory)
    changed = apply_delta(work, mixture, size // 200, version)
    update = _index_child(work, factory, params, update=True)
    update_build_s = _build_seconds(work)
    updated = _search(work, mixture, real_queries)
    rebuilt = scratch / "rebuilt"
    shutil.copytree(work / "embed", rebuilt / "embed")
    shutil.copytree(work / "production", rebuilt / "production")  # the release it built on
    rebuild_s = _index_child(rebuilt, factory, params, update=False)["seconds"]
    rebuild_build_s = _build_seconds(rebuilt)
    full = _search(rebuilt, mixture, real_queries)
    manifest = json.loads((work / "index" / "manifest.json").read_text())
    return {
        "listings": size,
        "factory": factory,
        "delta": changed,
        "full_build_s": full_s,
        "rebuild_s": rebuild_s,
        "update_s": update["seconds"],
        "update_build_s": update_build_s,
        "rebuild_build_s": rebuild_build_s,
        "build": manifest.get("build"),
        "recall_update": updated,
        "recall_rebuild": full,
        "parts": len(embedding_parts(work / "embed")),
    }


def _build_seconds(work: Path) -> float:
    """The index step's own build (or update) time, as its run record says: without the
    process start, the embeddings' verification and writing the files."""
    return json.loads((work / "index" / "run.json").read_text())["build_seconds"]


def _index_child(work: Path, factory: str, params: dict, update: bool) -> dict:
    import scale

    args = [sys.executable, __file__, "--one-index", str(work), factory, json.dumps(params)]
    return scale.timed_child([*args, "update" if update else "full"])


def run_index(work: Path, factory: str, params: dict, how: str) -> None:
    import scale

    from components import index
    from components.config import IndexConfig, StepPaths, StorageConfig

    config = IndexConfig(
        factory=factory,
        train_sample=200_000,
        gpu="never",
        update_current=how == "update",
        max_delta=0.5,
        **params,
    )
    paths = StepPaths(
        workdir=work, catalog=str(work), storage=StorageConfig(uri=str(work / "production"))
    )
    result = index.run(config, paths)
    print(json.dumps({"summary": result.summary, "peak_rss_mb": scale.own_peak_mb()}))


MODEL = {"name": "synthetic", "version": "1", "sha256": "0" * 64}  # what "embedded" them


def publish_index(work: Path, factory: str) -> str:
    """Publish the built index as the current release of a store in `work` (what promote
    uploads for the index step; the model and gates are not part of this benchmark)."""
    from components.config import StorageConfig
    from components.release import production
    from components.release.storage import open_storage

    storage = open_storage(StorageConfig(uri=str(work / "production")))
    files = {
        name: work / "index" / name for name in ("index.faiss", "delta.faiss", "ids.parquet")
    } | {"listing_ids.parquet": work / "embed" / "listing_ids.parquet"}
    published = production.publish(storage, files, {"index": {"factory": factory}}, MODEL)
    return published.version


def _fingerprinted(out: Path, new: tuple[str, ...] = (), base: str | None = None) -> None:
    """The embed step's ids with fingerprints (`new` ids appended) and its manifest (built
    on release `base`, when given)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.io.manifest import describe_files

    ids = pq.read_table(out / "listing_ids.parquet").column("listing_id").to_pylist() + list(new)
    table = pa.table({"listing_id": ids, "fingerprint": [f"f-{i}" for i in ids]})
    pq.write_table(table, out / "listing_ids.parquet")
    outputs = describe_files(out, ["embeddings", "listing_ids.parquet"])
    inputs = {} if base is None else {"base": {"version": base}}
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "step": "embed",
                "outputs": outputs,
                "inputs": inputs,
                "model": {"source": "synthetic", "sha256": MODEL["sha256"]},
            }
        )
    )


def apply_delta(work: Path, mixture, changes: int, version: str) -> dict:
    """Remove `changes` listings and add as many new ones (a part of their own), as a
    refresh's embed step would leave them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = work / "embed"
    ids = pq.read_table(out / "listing_ids.parquet").column("listing_id").to_pylist()
    rng = np.random.default_rng(3)
    gone = set(rng.choice(len(ids), changes, replace=False).tolist())
    parts = sorted((out / "embeddings").glob("part-*.npy"))
    kept_ids, first = [], 0
    for part in parts:
        vectors = np.load(part)
        keep = [r for r in range(len(vectors)) if first + r not in gone]
        kept_ids += [ids[first + r] for r in keep]
        first += len(vectors)
        if len(keep) < len(vectors):
            np.save(part, vectors[keep])
    np.save(out / "embeddings" / f"part-{len(parts):06d}.npy", mixture.sample(changes, rng))
    pq.write_table(pa.table({"listing_id": kept_ids}), out / "listing_ids.parquet")
    _fingerprinted(out, tuple(f"N{i:09d}" for i in range(changes)), version)
    return {"removed": changes, "added": changes, "share": 2 * changes / len(ids)}


def _search(work: Path, mixture, real_queries: np.ndarray) -> dict:
    """ANN recall@10 of the index in `work` against exact search over its embeddings."""
    import pyarrow.parquet as pq
    import scale

    from components.io.embedding_files import embedding_parts
    from components.io.faiss_index import load_index

    index, ids, _ = load_index(work / "index")
    parts = embedding_parts(work / "embed")
    listing_of = ids.listing_of()

    order = pq.read_table(work / "embed" / "listing_ids.parquet").column("listing_id").to_pylist()
    found = {}
    for name, queries in (
        ("synthetic", mixture.sample(scale.QUERIES, np.random.default_rng(2))),
        ("release", real_queries[: scale.QUERIES]),
    ):
        exact = scale.exact_top10(queries, parts)  # rows of the embeddings
        _, labels = index.search(queries, 10)
        row_of = {listing_id: r for r, listing_id in enumerate(order)}
        got = np.array([[row_of.get(listing_of.get(int(x)), -1) for x in r] for r in labels])
        found[name] = scale.recall(got, exact)
    return found


# --- staleness: false and true alarms -------------------------------------------------


def staleness_stage(release: Path, trials: int, scratch: Path) -> dict:
    """The drift test on random halves of the release's catalog profile (no drift), and
    with the icons catalog's listings as 20% of the second half (featurized here)."""
    from components.config import EvaluateConfig
    from components.core.drift import mmd_test

    config = EvaluateConfig().staleness
    profile = catalog_profile(release)
    icons = scratch / "icons"
    components(icons, "catalog", settings=("catalog.source=icons",))
    for step in ("validate", "featurize"):
        components(icons, step)
    other = catalog_profile(icons)
    rows = []
    size = config.profile_listings
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        order = rng.permutation(len(profile))
        half = len(order) // 2
        then, now = profile[order[:half]][:size], profile[order[half:]][:size]
        mixed = now.copy()
        swap = int(0.2 * len(mixed))
        mixed[:swap] = other[rng.choice(len(other), swap, replace=False)]
        rows.append(
            {
                "trial": trial,
                "p_same": mmd_test(then, now, config.permutations).p_value,
                "p_icons": mmd_test(then, mixed, config.permutations).p_value,
            }
        )
    alpha = config.drift_alpha
    return {
        "alpha": alpha,
        "trials": trials,
        "listings": len(profile),
        "false_alarms": sum(r["p_same"] < alpha for r in rows),
        "true_alarms": sum(r["p_icons"] < alpha for r in rows),
        "max_p_icons": max(r["p_icons"] for r in rows),
        "min_p_same": min(r["p_same"] for r in rows),
    }


def catalog_profile(work: Path) -> np.ndarray:
    """Every clean listing's profile from the frozen features of `work`'s featurize step,
    as evaluate computes it (no view held out)."""
    import pyarrow.parquet as pq
    import torch

    from components.config import StepPaths
    from components.core.drift import projection
    from components.io.embedder import ListingEmbedder

    paths = StepPaths(workdir=work, catalog=str(work / "catalog"))
    frozen = ListingEmbedder.frozen(paths, torch.device("cpu"))
    dims = frozen.image_store.dim + frozen.text_store.dim
    clean = pq.read_table(work / "validate" / "clean.parquet", columns=["listing_id"])
    return frozen.profiles(set(), set(clean.column(0).to_pylist()), projection(dims))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="*", default=["catalog", "delta", "staleness"])
    parser.add_argument("--listings", type=int, default=None, help="catalog.max_listings")
    parser.add_argument("--release", default="artifacts", help="work dir of a finished run")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--one-index", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_index:
        work, factory, params, how = args.one_index
        return run_index(Path(work), factory, json.loads(params), how)
    ensure_optional_data()  # the catalog stage builds the sample catalog make run builds
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    results = {}
    try:
        if "catalog" in args.stages:
            results["catalog"] = catalog_stage(scratch / "catalog", args.listings)
            print(json.dumps(results["catalog"]), flush=True)
        if "delta" in args.stages:
            results["delta"] = delta_stage(scratch / "delta", args.size, Path(args.release))
            print(json.dumps(results["delta"]), flush=True)
        if "staleness" in args.stages:
            results["staleness"] = staleness_stage(Path(args.release), args.trials, scratch)
            print(json.dumps(results["staleness"]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(results)


def report(results: dict) -> None:
    if "catalog" in results:
        r = results["catalog"]
        print(f"\ncatalog: {r['listings_before']} -> {r['listings_after']} listings")
        print("| run | wall s |\n|---|---|")
        print(f"| refresh | {r['refresh_s']:.1f} |")
        print(f"| retrain (validate .. promote) | {r['retrain_s']:.1f} |")
        print(f"| refresh / retrain | {r['refresh_s'] / r['retrain_s']:.2f} |")
        print(f"\nembed: {r['embed']} (catalog change: {r['expected']})")
        print(f"featurize encoded: {r['encoded']}; index: {r['index']}")
        print(f"reused vectors bitwise equal to a full embed: {r['bitwise']}")
        print(
            f"title -> own listing recall@10: new {r['title_recall_new']:.3f}, "
            f"old {r['title_recall_old']:.3f}; stale: {r['stale']} "
            f"({r['new_or_changed']:.1%} new or changed)"
        )
    if "delta" in results:
        r = results["delta"]
        print(f"\ndelta at {r['listings']:,} listings ({r['factory']}), {r['delta']}")
        print(
            "| run | step process wall s | build s (run.json) | recall@10 synthetic "
            "| recall@10 release queries |"
        )
        print("|---|---|---|---|---|")
        for name, key in (("full build", "rebuild"), ("update", "update")):
            print(
                f"| {name} | {r[f'{key}_s']:.1f} | {r[f'{key}_build_s']:.1f} | "
                f"{r[f'recall_{key}']['synthetic']:.3f} | {r[f'recall_{key}']['release']:.3f} |"
            )
        print(
            f"update / full build: process {r['update_s'] / r['rebuild_s']:.3f}, build "
            f"{r['update_build_s'] / r['rebuild_build_s']:.3f} ({r['build']})"
        )
    if "staleness" in results:
        r = results["staleness"]
        print(
            f"\nstaleness drift test, alpha {r['alpha']}, {r['trials']} trials: "
            f"{r['false_alarms']} alarms without drift (lowest p {r['min_p_same']:.3f}), "
            f"{r['true_alarms']} with 20% icons (highest p {r['max_p_icons']:.4f}), "
            f"{r['listings']} listings"
        )


if __name__ == "__main__":
    main()
