"""Batched searches through a `Flat` index: faiss's default path against the matrix product
evaluate's batches take (components/io/faiss_index.py, `as_matrix_product`).

faiss 1.15 scans the stored vectors once per query unless queries x dimensions reach
`distance_compute_blas_threshold` (128,000 by default). One run, one row per batch size,
on random unit vectors; each time the median of 3 searches after one to warm up.

    python benchmarks/faiss_batches.py --vectors 1000000 --dim 256
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from components.io import faiss_index


def _unit(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _seconds(index: faiss.Index, queries: np.ndarray, k: int, product: bool) -> float:
    """The median of 3 searches after one to warm up: faiss's default path, or as
    evaluate searches (`product`)."""
    times = []
    with faiss_index.as_matrix_product(len(queries) if product else 0):
        index.search(queries, k)
        for _ in range(3):
            start = time.perf_counter()
            index.search(queries, k)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=110, help="results per query (evaluate: 110)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 256, 1024])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(args.dim)
    index.add(_unit(args.vectors, args.dim, rng))
    threads = faiss.omp_get_max_threads()
    print(f"{args.vectors:,} vectors of {args.dim} dims, k={args.k}, {threads} threads")
    print("| queries | faiss default s | as evaluate searches s | ratio |")
    print("|---|---|---|---|")
    for batch in args.batches:
        queries = _unit(batch, args.dim, rng)
        scanned = _seconds(index, queries, args.k, product=False)
        product = _seconds(index, queries, args.k, product=True)
        print(f"| {batch} | {scanned:.3f} | {product:.3f} | {scanned / product:.1f}x |")


if __name__ == "__main__":
    main()
