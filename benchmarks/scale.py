"""The cost curve: embed and index at 100k / 1M / 10M synthetic listings, featurize in two
shards, and how hard the synthetic vectors are next to a real release's.

    .venv/bin/python benchmarks/scale.py [--sizes 100000 1000000 10000000] \
        [--steps embed index] [--release artifacts] [--featurize-shards artifacts]

Every measured run is the project's own step in a fresh process (wall time, and the peak
RSS the process reports from /proc: `VmHWM`); preparing its inputs is not measured.

- embed: a synthetic featurize output (2 photos and 3 text views per listing drawn from a
  pool of 8,192 cached vectors per modality, 1280-d images and 512-d texts as the default
  encoders give, featurize's chunks of 1,024 listings) and a randomly initialised 256-d
  model: the real embed step.
- index: N unit vectors sampled from a distribution fitted to a real release's
  embeddings (`--release`, a work dir after `make run`): k-means centres of the release
  (k = release size / 30) with the weights of their clusters, plus Gaussian noise with the
  pooled covariance of the release's residuals around their centres, renormalised; the
  covariance is widened (x1, 1.5, 2, 3, ...) until IVF recall on the sample is no better
  than on the release (`fit` below), so the synthetic vectors are no easier than real ones. The
  index step builds the size's factory (`FACTORIES`) part by part; recall@10 is against
  exact search, for 500 vectors sampled the same way and for the release's own text
  queries (embedded by its model), which live in the same space.
- fit: at the release's own size, the same index types' recall on the release, on the
  fitted sample, and on the tight clusters `benchmarks/index.py` uses: the fitted sample
  should be no easier than the release.
- featurize shards (`--featurize-shards DIR`, a work dir with validate/ and catalog/):
  featurize from an empty feature store in one process with glibc's allocator as it
  comes, in one process as the step runs (freed memory kept), then as 2 shards side by
  side plus the gather; wall, user and kernel CPU seconds of each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 1024  # featurize's listings per chunk
POOL = 8192  # distinct feature vectors per modality (embed)
PART_ROWS = 65536  # embedding rows per part file (index)
DIM = 256
QUERIES = 500
INFLATIONS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)  # residual covariance widening tried
# the index of each size: (factory, search params); docs/scale.md says why
FACTORIES = {
    100_000: ("IVF1024,Flat", {"nprobe": 32}),
    # exact coarse quantizer, float16 re-ranking: recall@10 0.96 of exact for text queries
    # at 1M (docs/scale.md, "A large-index default"); HNSW32 quantizers held it at 0.89
    1_000_000: ("IVF4096,SQ8,Refine(SQfp16)", {"nprobe": 128, "refine_k_factor": 4}),
    10_000_000: ("IVF4096,SQ8,Refine(SQfp16)", {"nprobe": 128, "refine_k_factor": 4}),
}


# --- the measured runs, each in its own process ---------------------------------------


def own_peak_mb() -> float:
    """This process's peak RSS (VmHWM): unlike wait4's ru_maxrss, it does not carry the
    RSS of the parent that forked it (Linux keeps that across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def timed_child(args: list[str]) -> dict:
    """Run `args`; its wall seconds, peak RSS (MB, the VmHWM it reports on its last line)
    and that line."""
    start = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, _ = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{args} exited {os.waitstatus_to_exitcode(status)}")
    last = json.loads(out.strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss_mb": last.pop("peak_rss_mb"), "out": last}


def run_embed(work: Path) -> None:
    from components import embed
    from components.config import EmbedConfig, StepPaths

    result = embed.run(EmbedConfig(device="auto"), StepPaths(workdir=work, catalog=str(work)))
    print(json.dumps(result.counts | {"peak_rss_mb": own_peak_mb()}))


def run_index(work: Path, factory: str, params: dict) -> None:
    from components import index
    from components.config import IndexConfig, StepPaths

    config = IndexConfig(factory=factory, train_sample=200_000, gpu="never", **params)
    result = index.run(config, StepPaths(workdir=work, catalog=str(work)))
    print(json.dumps({"summary": result.summary, "peak_rss_mb": own_peak_mb()}))


# --- inputs -----------------------------------------------------------------------------


def build_features(work: Path, listings: int) -> None:
    """featurize/, validate/clean.parquet and train/ for `listings` synthetic listings."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from components.core.model import ListingModel
    from components.io.feature_store import FeatureStore

    rng = np.random.default_rng(0)
    featurize = work / "featurize"
    stores = {}
    for modality, encoder, dim in (
        ("image", "synthetic-image", 1280),
        ("text", "synthetic-text", 512),
    ):
        store = FeatureStore(featurize / "store", encoder, dim, shard_rows=POOL)
        store.add(
            [f"{modality}-{i}" for i in range(POOL)],
            rng.normal(size=(POOL, dim)).astype(np.float32),
        )
        store.flush()
        stores[modality] = {"id": encoder, "dim": dim, "store": f"store/{encoder}"}
    views = [
        ("image", "image", 0),
        ("image", "image", 1),
        ("text", "title", 0),
        ("text", "description", 1),
        ("text", "tags", 2),
    ]
    schema = pa.schema(
        [(n, pa.string()) for n in ("listing_id", "modality", "view")]
        + [("position", pa.int32()), ("ref", pa.string()), ("key", pa.string())]
    )
    with pq.ParquetWriter(featurize / "views.parquet", schema) as writer:
        for first in range(0, listings, CHUNK):
            ids = np.array([f"L{i:09d}" for i in range(first, min(first + CHUNK, listings))])
            keys = rng.integers(0, POOL, size=(len(ids), len(views)))
            columns = {
                "listing_id": np.repeat(ids, len(views)),
                "modality": np.tile([v[0] for v in views], len(ids)),
                "view": np.tile([v[1] for v in views], len(ids)),
                "position": np.tile(np.array([v[2] for v in views], np.int32), len(ids)),
            }
            columns["ref"] = np.char.add(columns["listing_id"], np.char.add("/", columns["view"]))
            columns["key"] = np.char.add(
                np.char.add(columns["modality"], "-"), keys.ravel().astype(str)
            )
            writer.write_table(
                pa.table({k: pa.array(v) for k, v in columns.items()}, schema=schema)
            )
    (featurize / "manifest.json").write_text(
        json.dumps({"outputs": {"views.parquet": {"listings": listings}}, "encoders": stores})
    )
    (work / "validate").mkdir()
    ids = pa.array([f"L{i:09d}" for i in range(listings)])
    pq.write_table(pa.table({"listing_id": ids}), work / "validate" / "clean.parquet")
    train = work / "train"
    train.mkdir()
    spec = {"image_dim": 1280, "text_dim": 512, "dim": DIM, "hidden": 1024, "residual": True}
    torch.save(ListingModel(**spec).state_dict(), train / "model.pt")
    pq.write_table(
        pa.table({n: pa.array([], pa.string()) for n in ("kind", "id", "listing_id", "split")}),
        train / "splits.parquet",
    )
    from components.io.manifest import describe_files

    outputs = describe_files(train, ["model.pt"])
    manifest = {"step": "train", "outputs": outputs, "model": {"model": spec}}
    (train / "manifest.json").write_text(json.dumps(manifest))


class FittedMixture:
    """Unit vectors distributed like a release's embeddings (module docstring)."""

    def __init__(self, real: np.ndarray, seed: int = 0) -> None:
        import faiss

        k = max(2, len(real) // 30)
        kmeans = faiss.Kmeans(real.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
        kmeans.train(real)
        _, assigned = kmeans.index.search(real, 1)
        assigned = assigned.ravel()
        self.centres = kmeans.centroids
        self.weights = np.bincount(assigned, minlength=k) / len(real)
        residuals = real - self.centres[assigned]
        covariance = residuals.T @ residuals / len(real) + 1e-6 * np.eye(real.shape[1])
        self.factor = np.linalg.cholesky(covariance).astype(np.float32)
        self.k = k
        self.inflation = 1.0

    def inflated(self, factor: float) -> FittedMixture:
        """The same mixture with `factor` times the residual covariance."""
        wider = object.__new__(FittedMixture)
        wider.__dict__.update(self.__dict__, factor=self.factor * np.float32(np.sqrt(factor)))
        wider.inflation = factor
        return wider

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        picked = rng.choice(self.k, size=n, p=self.weights)
        noise = rng.standard_normal((n, self.centres.shape[1]), dtype=np.float32) @ self.factor.T
        points = self.centres[picked] + noise
        return points / np.linalg.norm(points, axis=1, keepdims=True)


def release_vectors(release: Path) -> tuple[np.ndarray, np.ndarray]:
    """A release's listing embeddings and its text queries embedded by its model."""
    import pyarrow.parquet as pq
    import torch

    from components.config import StepPaths
    from components.io.embedding_files import read_embeddings
    from components.io.manifest import read_manifest
    from components.io.training_data import modality_store
    from components.release import registry

    paths = StepPaths(workdir=release, catalog=str(release / "catalog"))
    _, listings = read_embeddings(paths)
    loaded = registry.load_model(None, paths, torch.device("cpu"))
    featurize = paths.step_dir("featurize")
    keys = list(
        dict.fromkeys(pq.read_table(featurize / "queries.parquet").column("key").to_pylist())
    )
    features = modality_store(featurize, read_manifest(featurize), "text").get(keys)
    with torch.no_grad():
        queries = loaded.model.embed_text_queries(torch.from_numpy(features)).numpy()
    return listings.astype(np.float32), queries.astype(np.float32)


def build_embeddings(work: Path, mixture: FittedMixture, count: int) -> None:
    """An embed step's outputs: `count` fitted vectors in parts, ids and a manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.io.manifest import describe_files

    out = work / "embed"
    (out / "embeddings").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for part, first in enumerate(range(0, count, PART_ROWS)):
        rows = min(PART_ROWS, count - first)
        np.save(out / "embeddings" / f"part-{part:06d}.npy", mixture.sample(rows, rng))
    ids = pa.array([f"S{i:09d}" for i in range(count)])
    pq.write_table(pa.table({"listing_id": ids}), out / "listing_ids.parquet")
    outputs = describe_files(out, ["embeddings", "listing_ids.parquet"])
    (out / "manifest.json").write_text(json.dumps({"step": "embed", "outputs": outputs}))


def exact_top10(queries: np.ndarray, parts: list[Path]) -> np.ndarray:
    """Exact inner-product top 10 of each query over every part, part by part."""
    best_scores = np.full((len(queries), 10), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 10), np.int64)
    first = 0
    for part in parts:
        vectors = np.load(part, mmap_mode="r")
        for start in range(0, len(vectors), 32768):
            block = np.asarray(vectors[start : start + 32768])
            scores = queries @ block.T
            top = np.argpartition(-scores, 10, axis=1)[:, :10]
            merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
            merged_ids = np.concatenate([best_ids, top + first + start], 1)
            keep = np.argsort(-merged_scores, axis=1)[:, :10]
            best_scores = np.take_along_axis(merged_scores, keep, 1)
            best_ids = np.take_along_axis(merged_ids, keep, 1)
        first += len(vectors)
    return best_ids


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


# --- stages -----------------------------------------------------------------------------


def embed_stage(size: int, scratch: Path) -> dict:
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        start = time.perf_counter()
        build_features(work, size)
        prepared = time.perf_counter() - start
        measured = timed_child([sys.executable, __file__, "--one-embed", str(work)])
        listings = measured["out"]["listings"]
        return {"step": "embed", "listings": listings, "prepare_s": prepared, **measured}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def index_stage(size: int, scratch: Path, mixture: FittedMixture, real_queries: np.ndarray) -> dict:
    import faiss

    from components.io.embedding_files import embedding_parts
    from components.io.faiss_index import load_index

    factory, params = FACTORIES[size]
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        start = time.perf_counter()
        build_embeddings(work, mixture, size)
        prepared = time.perf_counter() - start
        args = [sys.executable, __file__, "--one-index", str(work), factory, json.dumps(params)]
        measured = timed_child(args)
        index, _, _ = load_index(work / "index")
        parts = embedding_parts(work / "embed")
        synthetic = mixture.sample(QUERIES, np.random.default_rng(2))
        row = {"step": "index", "listings": size, "factory": factory, "params": params}
        for name, queries in (("synthetic", synthetic), ("release", real_queries[:QUERIES])):
            exact = exact_top10(queries, parts)
            begin = time.perf_counter()
            _, found = index.search(queries, 10)
            row[f"recall_{name}"] = recall(found, exact)
            row[f"qps_{name}"] = len(queries) / (time.perf_counter() - begin)
        row["index_mb"] = (work / "index" / "index.faiss").stat().st_size / 2**20
        row["threads"] = faiss.omp_get_max_threads()
        return row | {"prepare_s": prepared, **measured}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fit_stage(real: np.ndarray, mixture: FittedMixture, real_queries: np.ndarray) -> list[dict]:
    """Recall of small IVF indexes at the release's size: on the release (300 listings held
    out as queries, and its text queries), on the fitted distribution and on the tight
    clusters of `benchmarks/index.py` (300 more points of each as queries)."""
    import faiss

    sys.path.insert(0, str(Path(__file__).parent))
    from index import clustered

    held = 300
    n = len(real) - held
    rng = np.random.default_rng(3)
    order = rng.permutation(len(real))
    tight = clustered(len(real), real.shape[1], max(2, len(real) // 200), seed=0)
    data = {
        "release, held-out listings as queries": (real[order[held:]], real[order[:held]]),
        "release, its text queries": (real, real_queries[:QUERIES]),
        "fitted distribution": (mixture.sample(n, rng), mixture.sample(held, rng)),
        "tight clusters (benchmarks/index.py)": (tight[held:], tight[:held]),
    }
    lists = max(4, int(np.sqrt(n)))
    rows = []
    for name, (vectors, queries) in data.items():
        exact = exact_top10_in_memory(queries, vectors)
        quantizer = faiss.IndexFlatIP(vectors.shape[1])
        index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        row = {"data": name, "lists": lists}
        for nprobe in (1, 2, 4):
            index.nprobe = nprobe
            _, found = index.search(queries, 10)
            row[f"nprobe {nprobe}"] = recall(found, exact)
        rows.append(row)
    return rows


def calibrated(real: np.ndarray, real_queries: np.ndarray) -> tuple[FittedMixture, list[dict]]:
    """The fitted mixture with the least widened noise whose IVF recall at the release's
    size is at or below the release's own at every nprobe: no easier than the release."""
    fitted = FittedMixture(real)
    for factor in INFLATIONS:
        mixture = fitted.inflated(factor)
        rows = fit_stage(real, mixture, real_queries)
        release, sample = rows[0], rows[2]
        if all(sample[k] <= release[k] for k in sample if k.startswith("nprobe")):
            break
    return mixture, rows


def exact_top10_in_memory(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    scores = queries @ vectors.T
    return np.argsort(-scores, axis=1)[:, :10]


def decode_stage(count: int = 200) -> dict:
    """One core's rate of what a featurize worker does per photo before the encoder:
    decode a 1200x900 JPEG (reduced, as featurize does) and resize it to 224 px."""
    import io

    from PIL import Image

    from components.io.images import decode_image

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((30, 30, 1))).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(count):
        decode_image(data, "bench.jpg", fit=224).resize((224, 224), Image.Resampling.BILINEAR)
    seconds = (time.perf_counter() - start) / count
    return {"jpeg_bytes": len(data), "ms_per_photo": seconds * 1000, "photos_per_s": 1 / seconds}


def featurize_shards_stage(source: Path, scratch: Path) -> dict:
    """featurize of `source`'s validated catalog from an empty store: 1 process with
    glibc's allocator as it comes, 1 process as featurize sets it (freed memory kept),
    then 2 shards side by side and the gather. Each shard gets its share of the cores
    (OMP_NUM_THREADS, as a pod's CPU limit would give it): two processes of all-core
    torch thread pools on the same cores fight each other (measured 3.8x slower)."""
    share = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    # any malloc tunable leaves the allocator alone (components/io/allocator.py); 7 is
    # glibc's own tcache_count
    as_it_comes = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
    rows = {}
    runs = (
        ("one process, allocator as it comes", None, as_it_comes),
        ("one process", None, None),
        ("2 shards", 2, share),
    )
    for label, shards, env in runs:
        work = Path(tempfile.mkdtemp(dir=scratch))
        for step in ("catalog", "validate"):
            (work / step).symlink_to((source / step).resolve())
        base = [sys.executable, "-m", "components", "featurize", "--set", f"paths.workdir={work}"]
        start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        if shards is None:
            subprocess.run(base, check=True, capture_output=True, env=env)
        else:
            running = [
                subprocess.Popen(
                    [*base, "--shard", f"{i}/{shards}"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                )
                for i in range(shards)
            ]
            if any(p.wait() for p in running):
                raise RuntimeError("a featurize shard failed")
            subprocess.run([*base, "--gather", str(shards)], check=True, capture_output=True)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        user, kernel = after.ru_utime - used.ru_utime, after.ru_stime - used.ru_stime
        rows[label] = {"wall_s": wall, "user_s": user, "sys_s": kernel}
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=sorted(FACTORIES))
    parser.add_argument(
        "--steps", nargs="*", default=["embed", "index"], choices=["embed", "index"]
    )
    parser.add_argument("--release", default="artifacts", help="work dir of a finished run")
    parser.add_argument("--featurize-shards", metavar="DIR", help="also time featurize in 2 shards")
    parser.add_argument("--scratch", default=None, help="where synthetic inputs go (default: tmp)")
    parser.add_argument("--one-embed", help=argparse.SUPPRESS)
    parser.add_argument("--one-index", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_embed:
        return run_embed(Path(args.one_embed))
    if args.one_index:
        work, factory, params = args.one_index
        return run_index(Path(work), factory, json.loads(params))
    import logging

    logging.basicConfig(level=logging.WARNING)
    scratch = Path(args.scratch or tempfile.gettempdir())
    results: dict = {"rows": []}
    if "index" in args.steps:
        real, real_queries = release_vectors(Path(args.release))
        mixture, results["fit"] = calibrated(real, real_queries)
        results["inflation"] = mixture.inflation
        print(json.dumps(results["fit"]), flush=True)
    results["decode"] = decode_stage()
    if args.featurize_shards:
        results["featurize"] = featurize_shards_stage(Path(args.featurize_shards), scratch)
        print(json.dumps(results["featurize"]), flush=True)
    for size in args.sizes:
        if "embed" in args.steps:
            results["rows"].append(embed_stage(size, scratch))
            print(json.dumps(results["rows"][-1]), flush=True)
        if "index" in args.steps:
            results["rows"].append(index_stage(size, scratch, mixture, real_queries))
            print(json.dumps(results["rows"][-1]), flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    import torch

    print(f"\nthis machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    if "fit" in results:
        print(
            f"\nIVF recall@10 at the release's size ({args.release}); fitted distribution: "
            f"residual covariance x {results['inflation']}:"
        )
        for row in results["fit"]:
            cells = "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("nprobe"))
            print(f"  {row['data']:<40} {row['lists']} lists  {cells}")
    decode = results["decode"]
    print(
        f"\ndecode + resize of a {decode['jpeg_bytes'] // 1024} KiB 1200x900 JPEG on one core: "
        f"{decode['ms_per_photo']:.1f} ms ({decode['photos_per_s']:.0f} photos/s)"
    )
    if "featurize" in results:
        runs = results["featurize"]
        print(f"\n{'featurize':<36} {'wall s':>8} {'user s':>8} {'sys s':>8} {'CPUs':>5}")
        for label, run in runs.items():
            cpus = (run["user_s"] + run["sys_s"]) / run["wall_s"]
            print(
                f"{label:<36} {run['wall_s']:>8.1f} {run['user_s']:>8.1f} {run['sys_s']:>8.1f} "
                f"{cpus:>5.2f}"
            )
        one, two = runs["one process"]["wall_s"], runs["2 shards"]["wall_s"]
        print(f"2 shards + gather / one process: {two / one:.2f}")
    print(f"\n{'step':<6} {'listings':>10} {'wall s':>8} {'per s':>9} {'peak RSS MB':>12}  detail")
    for row in results["rows"]:
        detail = ""
        if row["step"] == "index":
            detail = (
                f"{row['factory']} {row['params']}: {row['index_mb']:.0f} MB, recall@10 "
                f"synthetic {row['recall_synthetic']:.3f} / release queries "
                f"{row['recall_release']:.3f}"
            )
        rate = row["listings"] / row["seconds"]
        cells = f"{row['seconds']:>8.1f} {rate:>9.0f} {row['peak_rss_mb']:>12.0f}"
        print(f"{row['step']:<6} {row['listings']:>10} {cells}  {detail}")


if __name__ == "__main__":
    main()
