"""Filtered search (category filters, components/service/filters.py) against exact
filtered search: recall@10, the strategy taken and the time per query.

- sample: the promoted release of `--release` (default `artifacts`, after `make run`)
  as the service loads it; its text queries (as the service embeds them) filtered by each
  top-level category, against the exact top 10 among that category's listings; each
  category twice: as `serve.overfetch_min_share` (0.25) decides, and over-fetching.
- synthetic (`--size`, default 1,000,000): vectors drawn from the distribution fitted to
  the release (benchmarks/scale.py, calibrated no easier than the release) in the scale
  benchmark's index for that size (`IVF4096_HNSW32,SQ8`, 128 probes at 1M); each vector
  falls in a `Rare` category with probability 1% and in `Common` with 30%; the release's
  text queries filtered by each, against exact search over the matching vectors.

    .venv/bin/python benchmarks/filtered_search.py [--release artifacts] [--size 1000000]
        [--queries 500] [--stages sample synthetic]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SELECTIVITIES = {"Rare": 0.01, "Common": 0.30}


def measure(
    served, queries, vectors_of, categories: list[str], min_share: float = 0.25, k: int = 10
):
    """Per category: recall@10 against exact filtered search, strategies, ms per query
    (`min_share`: serve.overfetch_min_share)."""
    from components.service.filters import parts

    rows = []
    label_categories = served.taxonomy
    for category in categories:
        where = label_categories.resolve((category,))
        exact_labels, matrix = vectors_of(where.labels)
        truth = np.argsort(-(queries @ matrix.T), axis=1, kind="stable")[:, :k]
        truth_ids = [{served.labels.listing_of[int(exact_labels[j])] for j in row} for row in truth]
        start = time.perf_counter()
        strategies = {}
        recalls = []
        for query, expected in zip(queries, truth_ids, strict=True):
            hits, strategy = served.search_where(query[None, :], k, where, min_share)
            strategies[strategy] = strategies.get(strategy, 0) + 1
            recalls.append(len({i for i, _ in hits[0]} & expected) / len(expected))
        seconds = time.perf_counter() - start
        rows.append(
            {
                "category": category,
                "depth": len(parts(category)),
                "selectivity": where.selectivity,
                "strategy": "/".join(sorted(strategies)),
                "recall@10": float(np.mean(recalls)),
                "ms": seconds / len(queries) * 1000,
            }
        )
    return rows


def sample_stage(release: Path, count: int) -> list[dict]:
    import tempfile

    import torch

    from components.config import load_params
    from components.service.server import build

    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml", [f"paths.workdir={release}", "serve.device=cpu"])
    _, keeper = build(params, None, Path(tempfile.mkdtemp(prefix="filtered-")))
    served = keeper.current
    if served is None:
        raise SystemExit(f"nothing promoted in {release}: run `make run` first")
    from serve_load import queries as catalog_queries

    texts = catalog_queries(release)[:count]
    queries = served.embedder.texts(texts).astype(np.float32)

    def vectors_of(labels):
        return labels, np.stack([served.index.reconstruct(int(label)) for label in labels])

    tops = sorted({name for key, name in served.taxonomy.names.items() if len(key) == 1})
    # the sample's categories are all under 25%: each also with over-fetching forced
    return measure(served, queries, vectors_of, tops) + measure(
        served, queries, vectors_of, tops, min_share=0.01
    )


def synthetic_stage(release: Path, size: int, count: int) -> list[dict]:
    import faiss
    from scale import FACTORIES, calibrated, release_vectors

    from components.service.filters import Taxonomy
    from components.service.releases import Labels, ServedRelease

    real, real_queries = release_vectors(release)
    mixture, _ = calibrated(real, real_queries)
    rng = np.random.default_rng(7)
    started = time.perf_counter()
    vectors = np.concatenate(
        [mixture.sample(min(65536, size - first), rng) for first in range(0, size, 65536)]
    ).astype(np.float32)
    factory, search = FACTORIES[min(FACTORIES, key=lambda s: abs(s - size))]
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[rng.choice(size, min(size, 200_000), replace=False)])
    labels = np.arange(size, dtype=np.int64)
    index.add_with_ids(vectors, labels)
    faiss.extract_index_ivf(index).nprobe = search["nprobe"]
    built = time.perf_counter() - started
    draw = rng.random(size)
    names = np.where(draw < 0.01, "Rare > Part", np.where(draw < 0.31, "Common > Part", "Other"))
    listing_of = {int(i): f"S{i}" for i in labels}
    served = ServedRelease(
        version="synthetic",
        index=index,
        labels=Labels(listing_of, {v: k for k, v in listing_of.items()}),
        manifest={},
        embedder=None,
        listings={},
        taxonomy=Taxonomy(dict(zip(labels.tolist(), names.tolist(), strict=True))),
    )
    queries = real_queries[:count].astype(np.float32)
    _, found = index.search(queries, 10)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    unfiltered = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
    print(
        f"synthetic: {size:,} vectors, {factory} nprobe {search['nprobe']}, built in "
        f"{built:.0f} s; unfiltered recall@10 {unfiltered:.3f}"
    )
    return measure(served, queries, lambda keep: (keep, vectors[keep]), list(SELECTIVITIES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--stages", nargs="+", default=["sample", "synthetic"])
    args = parser.parse_args()
    rows = []
    if "sample" in args.stages:
        rows += [{"data": "sample release"} | r for r in sample_stage(args.release, args.queries)]
    if "synthetic" in args.stages:
        synthetic = synthetic_stage(args.release, args.size, args.queries)
        rows += [{"data": f"synthetic {args.size:,}"} | r for r in synthetic]
    print(f"{args.queries} text queries per row; k 10; overfetch_min_share 0.25; one thread")
    print("| data | category | selectivity | strategy | recall@10 vs exact | ms/query |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['data']} | {r['category']} | {r['selectivity']:.3f} | {r['strategy']} | "
            f"{r['recall@10']:.3f} | {r['ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
