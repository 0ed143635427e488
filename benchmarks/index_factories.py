"""Index types side by side on the scale benchmark's fitted vectors: recall@10 against
exact search, one-query p99, batched queries/s, size, build time and build peak memory.

The vectors are `benchmarks/scale.py`'s (drawn from the distribution fitted to the release
in `--release`, calibrated no easier than it), written once to `--workdir` and kept there
for the next run; each candidate is built by the index step in a process of its own
(`scale.py --one-index`). Queries: 500 fresh draws from the fitted distribution and the
release's first 500 text queries (embedded by its model), which are harder.

    .venv/bin/python benchmarks/index_factories.py --size 1000000 --workdir /work/idx \\
        --release artifacts \\
        --candidate 'IVF4096,SQ8,Refine(SQfp16)' '{"nprobe": 128, "refine_k_factor": 4}'
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LATENCY_QUERIES = 200


def main() -> None:
    import scale

    from components.io.embedding_files import embedding_parts
    from components.io.faiss_index import load_index

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, required=True, help="kept: the vectors")
    parser.add_argument("--release", type=Path, default=ROOT / "artifacts")
    parser.add_argument(
        "--candidate",
        nargs=2,
        action="append",
        required=True,
        metavar=("FACTORY", "PARAMS"),
        help="index.factory and a JSON object of index params (nprobe, refine_k_factor, ...)",
    )
    args = parser.parse_args()
    work = args.workdir / f"w{args.size}"
    real, real_queries = scale.release_vectors(args.release)
    mixture, _ = scale.calibrated(real, real_queries)
    if not (work / "embed" / "manifest.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        scale.build_embeddings(work, mixture, args.size)
    parts = embedding_parts(work / "embed")
    queries = {
        "fitted": mixture.sample(scale.QUERIES, np.random.default_rng(2)),
        "text": real_queries[: scale.QUERIES],
    }
    exact = {name: scale.exact_top10(q, parts) for name, q in queries.items()}
    print(
        f"{args.size:,} vectors; recall@10 against exact for {scale.QUERIES} fitted draws / "
        f"the release's text queries; p99 of {LATENCY_QUERIES} one-query searches (text)"
    )
    print(
        "| factory | params | recall fitted | recall text | index MB | build s | build peak MB "
        "| p99 ms | queries/s (batch) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for factory, params in args.candidate:
        shutil.rmtree(work / "index", ignore_errors=True)
        command = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--one-index"]
        measured = scale.timed_child([*command, str(work), factory, params])
        index, _, _ = load_index(work / "index")
        recall = {}
        for name, q in queries.items():
            _, found = index.search(q, 10)
            recall[name] = scale.recall(found, exact[name])
        begin = time.perf_counter()
        index.search(queries["text"], 10)
        batched = len(queries["text"]) / (time.perf_counter() - begin)
        latency = []
        for vector in queries["text"][:LATENCY_QUERIES]:
            start = time.perf_counter()
            index.search(vector[None], 10)
            latency.append((time.perf_counter() - start) * 1000)
        size_mb = (work / "index" / "index.faiss").stat().st_size / 2**20
        print(
            f"| `{factory}` | {json.loads(params)} | {recall['fitted']:.3f} | "
            f"{recall['text']:.3f} | {size_mb:,.0f} | {measured['seconds']:.0f} | "
            f"{measured['peak_rss_mb']:,.0f} | {np.percentile(latency, 99):.1f} | {batched:,.0f} |",
            flush=True,
        )
        del index


if __name__ == "__main__":
    main()
