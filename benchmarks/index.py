"""FAISS index types on a million clustered unit vectors: build time, size, QPS, recall.

Synthetic data shaped like listing embeddings: N unit vectors in 256-d around a few
thousand cluster centres (product families), and queries drawn near listings. For each
configuration, the same code path as the index step (`components.io.faiss_index.new_index`,
`apply_search_params`): build seconds, index size, queries/s at k=10 and k=100 (all
queries in one batch, this machine's threads), and recall@10 against exact search.

    .venv/bin/python benchmarks/index.py [--n 1000000] [--queries 10000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import faiss
import numpy as np

from components.config import IndexConfig
from components.io.faiss_index import apply_search_params, new_index, search_params

# Each factory is built once and searched with each of its settings.
CONFIGS = (
    ("Flat", [{}]),
    ("IVF1024,PQ64", [{"nprobe": 32}]),
    ("IVF1024,Flat", [{"nprobe": 8}, {"nprobe": 16}]),
    ("IVF4096,Flat", [{"nprobe": 16}, {"nprobe": 32}]),
    ("HNSW32", [{"ef_search": 64}, {"ef_search": 128}, {"ef_search": 256}]),
)


def clustered(n: int, dim: int, clusters: int, seed: int, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    points = centres[rng.integers(0, clusters, n)]
    points += spread * rng.normal(size=(n, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def queries_near(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), count, replace=False)]
    noisy = picked + 0.3 * rng.normal(size=picked.shape).astype(np.float32) / np.sqrt(
        picked.shape[1]
    )
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


def index_bytes(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as handle:
        faiss.write_index(index, handle.name)
        return os.path.getsize(handle.name)


def qps(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    _, found = index.search(queries, k)
    return len(queries) / (time.perf_counter() - start), found


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(f[:10]) & set(e[:10])) / 10 for f, e in zip(found, exact, strict=True)])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--train-sample", type=int, default=100_000)
    args = parser.parse_args()
    vectors = clustered(args.n, args.dim, args.clusters, seed=0)
    queries = queries_near(vectors, args.queries, seed=1)
    rows, exact = [], None
    for factory, settings in CONFIGS:
        index = new_index(factory, args.dim, args.n)
        start = time.perf_counter()
        if not index.is_trained:
            size = min(args.n, args.train_sample)
            sample = vectors[np.random.default_rng(2).choice(args.n, size, replace=False)]
            index.train(sample)
        index.add(vectors)
        build = time.perf_counter() - start
        size_mb = index_bytes(index) / 2**20
        for setting in settings:
            config = IndexConfig(factory=factory, **setting)
            apply_search_params(index, factory, search_params(config))
            qps10, found = qps(index, queries, 10)
            qps100, _ = qps(index, queries, 100)
            if exact is None:  # the first config is Flat: exact search
                exact = found
            named = "".join(f" {k}={v}" for k, v in search_params(config).items())
            rows.append(
                {
                    "config": factory + named,
                    "build_s": build,
                    "mb": size_mb,
                    "qps10": qps10,
                    "qps100": qps100,
                    "recall": recall_at_10(found, exact),
                }
            )
            print(rows[-1], flush=True)
        del index
    flat = rows[0]["qps10"]
    print(
        f"\n{args.n} x {args.dim} clustered unit vectors ({args.clusters} clusters), "
        f"{args.queries} queries, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads"
    )
    print(
        f"{'index':<40} {'build s':>8} {'size MB':>8} {'QPS k=10':>9} {'QPS k=100':>10} "
        f"{'x Flat':>7} {'recall@10':>10}"
    )
    for r in rows:
        print(
            f"{r['config']:<40} {r['build_s']:>8.1f} {r['mb']:>8.0f} {r['qps10']:>9.0f} "
            f"{r['qps100']:>10.0f} {r['qps10'] / flat:>7.1f} {r['recall']:>10.3f}"
        )


if __name__ == "__main__":
    main()
