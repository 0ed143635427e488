"""Filtered search (category filters, components/service/filters.py) against exact
filtered search: recall@10, the strategy taken and the time per query.

- sample: the promoted release of `--release` (default `artifacts`, after `make run`)
  as the service loads it; its text queries (as the service embeds them) filtered by each
  top-level category, against the exact top 10 among that category's listings; each
  category twice: as `serve.overfetch_min_share` (0.25) decides, and over-fetching.
- synthetic (`--size`, default 1,000,000): vectors drawn from the distribution fitted to
  the release (benchmarks/scale.py, calibrated no easier than the release) in the scale
  benchmark's index for that size (`FACTORIES`, or `--factory`); each vector
  falls in a `Rare` category with probability 1% and in `Common` with 30%; the release's
  text queries, and as many vectors sampled like the listings, filtered by each, against
  exact search over the matching vectors, and against the index's own filtered search
  over every list (what its codes can find at all), next to the index's unfiltered
  recall on the same queries.

    .venv/bin/python benchmarks/filtered_search.py [--release artifacts] [--size 1000000]
        [--queries 500] [--stages sample synthetic]
        [--factory 'IVF1024_HNSW32,SQ8,Refine(SQfp16)' --nprobe 128 --refine-k-factor 4]
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
    served,
    queries,
    vectors_of,
    categories: list[str],
    min_share: float = 0.25,
    k: int = 10,
    reference=None,
):
    """Per category: recall@10 against exact filtered search, strategies, ms per query
    (`min_share`: serve.overfetch_min_share); with `reference` (labels [Q, k] per
    category), recall against that too."""
    from components.service.filters import parts

    rows = []
    for category in categories:
        where = served.taxonomy.resolve((category,))
        exact_labels, matrix = vectors_of(where.labels)
        truth = np.argsort(-(queries @ matrix.T), axis=1, kind="stable")[:, :k]
        truth_ids = [{served.labels.listing_of[int(exact_labels[j])] for j in row} for row in truth]
        start = time.perf_counter()
        strategies, found = {}, []
        for query in queries:
            hits, strategy = served.search_where(query[None, :], k, where, min_share)
            strategies[strategy] = strategies.get(strategy, 0) + 1
            found.append({i for i, _ in hits[0]})
        seconds = time.perf_counter() - start
        row = {
            "category": category,
            "depth": len(parts(category)),
            "selectivity": where.selectivity,
            "strategy": "/".join(sorted(strategies)),
            "recall@10": _recall(found, truth_ids),
            "ms": seconds / len(queries) * 1000,
        }
        if reference is not None:
            listing_of = served.labels.listing_of
            index_ids = [{listing_of[int(i)] for i in r if i >= 0} for r in reference(where)]
            row["vs index"] = _recall(found, index_ids)
        rows.append(row)
    return rows


def _recall(found: list[set], truth: list[set]) -> float:
    return float(np.mean([len(f & t) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]))


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


def synthetic_stage(
    release: Path, size: int, count: int, factory: str | None, search: dict
) -> list[dict]:
    import faiss
    from scale import FACTORIES, calibrated, release_vectors

    from components.config import IndexConfig
    from components.io.faiss_index import apply_search_params, new_index
    from components.io.faiss_index import search_params as index_search_params
    from components.service.filters import Taxonomy, search_params
    from components.service.releases import Labels, ServedRelease

    real, real_queries = release_vectors(release)
    mixture, _ = calibrated(real, real_queries)
    rng = np.random.default_rng(7)
    started = time.perf_counter()
    vectors = np.concatenate(
        [mixture.sample(min(65536, size - first), rng) for first in range(0, size, 65536)]
    ).astype(np.float32)
    if factory is None:
        factory, configured = FACTORIES[min(FACTORIES, key=lambda s: abs(s - size))]
        search = index_search_params(IndexConfig(factory=factory, **configured))
    index = new_index(factory, vectors.shape[1], size)  # as the index step builds it
    index.train(vectors[rng.choice(size, min(size, 200_000), replace=False)])
    labels = np.arange(size, dtype=np.int64)
    index.add_with_ids(vectors, labels)
    apply_search_params(index, factory, search)
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
    ivf = faiss.extract_index_ivf(index)

    def exhaustive(queries):
        """The index's own filtered search over every list: what its codes can find."""

        def search(where):
            probes, ivf.nprobe = ivf.nprobe, ivf.nlist
            try:  # selectivity 1: the parameters of every list, kept to the filter
                return index.search(queries, 10, params=search_params(index, 1.0, 10, where))[1]
            finally:
                ivf.nprobe = probes

        return search

    rows = []
    query_sets = {
        "text queries": real_queries[:count].astype(np.float32),
        "fitted sample": mixture.sample(count, np.random.default_rng(11)).astype(np.float32),
    }
    for name, queries in query_sets.items():
        _, found = index.search(queries, 10)
        truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
        unfiltered = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
        print(
            f"synthetic: {size:,} vectors, {factory} {search}, built in "
            f"{built:.0f} s; {name}: unfiltered recall@10 {unfiltered:.3f}"
        )
        measured = measure(
            served,
            queries,
            lambda keep: (keep, vectors[keep]),
            list(SELECTIVITIES),
            reference=exhaustive(queries),
        )
        rows += [{"queries": name, "unfiltered": unfiltered} | r for r in measured]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--stages", nargs="+", default=["sample", "synthetic"])
    parser.add_argument(
        "--factory", help="the synthetic index's index.factory (default: the scale benchmark's)"
    )
    parser.add_argument("--nprobe", type=int, help="with --factory: index.nprobe")
    parser.add_argument("--refine-k-factor", type=int, help="with --factory: index.refine_k_factor")
    args = parser.parse_args()
    search = {"nprobe": args.nprobe, "k_factor_rf": args.refine_k_factor}
    search = {name: value for name, value in search.items() if value is not None}
    rows = []
    if "sample" in args.stages:
        rows += [{"data": "sample release"} | r for r in sample_stage(args.release, args.queries)]
    if "synthetic" in args.stages:
        synthetic = synthetic_stage(args.release, args.size, args.queries, args.factory, search)
        rows += [{"data": f"synthetic {args.size:,}, {r['queries']}"} | r for r in synthetic]
    print(f"{args.queries} queries per row; k 10; overfetch_min_share 0.25")
    print(
        "| data | category | selectivity | strategy | recall@10 vs exact | vs the index's "
        "exhaustive filtered search | index unfiltered vs exact | ms/query |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['data']} | {r['category']} | {r['selectivity']:.3f} | {r['strategy']} | "
            f"{r['recall@10']:.3f} | {_cell(r, 'vs index')} | {_cell(r, 'unfiltered')} | "
            f"{r['ms']:.2f} |"
        )


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


if __name__ == "__main__":
    main()
