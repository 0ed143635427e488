"""Peak memory and throughput of the embed step as the catalog grows.

Builds a synthetic featurize output for N listings (2 photos and 3 text views each, drawn
from a pool of distinct cached feature vectors, written in featurize's chunks of 1,024
listings), a randomly initialised model in place of the train step's, then runs the real
embed step in a fresh process per N and reports its wall time, listings/s and peak RSS.
Flat peak RSS across N is the point: embed streams chunk by chunk.

    .venv/bin/python benchmarks/embed_scale.py [--sizes 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 1024
POOL = 8192  # distinct feature vectors per modality


def build(work: Path, listings: int) -> None:
    """featurize/, validate/clean.parquet and train/ outputs for `listings` listings."""
    import numpy as np
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
        ("text", "synthetic-text", 384),
    ):
        store = FeatureStore(featurize / "store", encoder, dim, shard_rows=POOL)
        keys = [f"{modality}-{i}" for i in range(POOL)]
        store.add(keys, rng.normal(size=(POOL, dim)).astype(np.float32))
        store.flush()
        stores[modality] = {"id": encoder, "dim": dim, "store": f"store/{encoder}"}
    schema = pa.schema(
        [(n, pa.string()) for n in ("listing_id", "modality", "view")]
        + [("position", pa.int32()), ("ref", pa.string()), ("key", pa.string())]
    )
    texts = ("title", "description", "tags")
    with pq.ParquetWriter(featurize / "views.parquet", schema) as writer:
        for first in range(0, listings, CHUNK):
            ids = [f"L{i:08d}" for i in range(first, min(first + CHUNK, listings))]
            n = len(ids)
            image_keys = rng.integers(0, POOL, size=(n, 2))
            text_keys = rng.integers(0, POOL, size=(n, 3))
            columns = {name: [] for name in schema.names}
            for row, lid in enumerate(ids):
                for position in range(2):
                    _append(
                        columns,
                        lid,
                        "image",
                        "image",
                        position,
                        f"img/{lid}/{position}",
                        f"image-{image_keys[row, position]}",
                    )
                for position, view in enumerate(texts):
                    _append(
                        columns,
                        lid,
                        "text",
                        view,
                        position,
                        view,
                        f"text-{text_keys[row, position]}",
                    )
            writer.write_table(pa.table(columns, schema=schema))
    (featurize / "manifest.json").write_text(
        json.dumps({"outputs": {"views.parquet": {"listings": listings}}, "encoders": stores})
    )
    validate = work / "validate"
    validate.mkdir()
    pq.write_table(
        pa.table({"listing_id": [f"L{i:08d}" for i in range(listings)]}), validate / "clean.parquet"
    )
    train = work / "train"
    train.mkdir()
    spec = {"image_dim": 1280, "text_dim": 384, "dim": 256, "hidden": 1024}
    torch.save(ListingModel(**spec).state_dict(), train / "model.pt")
    pq.write_table(
        pa.table({n: pa.array([], pa.string()) for n in ("kind", "id", "listing_id", "split")}),
        train / "splits.parquet",
    )
    (train / "manifest.json").write_text(json.dumps({"model": {"model": spec}}))


def _append(columns, lid, modality, view, position, ref, key) -> None:
    for name, value in zip(
        ("listing_id", "modality", "view", "position", "ref", "key"),
        (lid, modality, view, position, ref, key),
        strict=True,
    ):
        columns[name].append(value)


def measure(work: Path) -> dict:
    """Run the embed step on `work` in this process (a fresh one per size)."""
    from components import embed
    from components.config import EmbedConfig, StepPaths

    paths = StepPaths(workdir=work, catalog=str(work / "catalog"))
    start = time.perf_counter()
    result = embed.run(EmbedConfig(device="auto"), paths)
    seconds = time.perf_counter() - start
    return {
        "listings": result.counts["listings"],
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Path(args.one))))
        return
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            build(Path(tmp), size)
            built = time.perf_counter() - start
            out = subprocess.run(
                [sys.executable, __file__, "--one", tmp],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]) | {"build_s": built})
    import torch

    print(f"embed step, 256-d model, CPU threads {torch.get_num_threads()}")
    print(f"{'listings':>10} {'embed s':>8} {'listings/s':>11} {'peak RSS MB':>12}")
    for row in rows:
        rate = row["listings"] / row["seconds"]
        peak = row["peak_rss_mb"]
        print(f"{row['listings']:>10} {row['seconds']:>8.1f} {rate:>11.0f} {peak:>12.0f}")


if __name__ == "__main__":
    main()
