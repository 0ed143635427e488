"""`embed` step: one fused, L2-normalised float32 embedding per clean listing.

Reads the featurize step's views and feature store one chunk of listings at a time (the
chunks featurize wrote, so memory stays bounded at any catalog size) and writes under
`<workdir>/embed/`:

    embeddings/part-NNNNNN.npy   float32 [n, dim] per chunk, unit rows
    listing_ids.parquet          listing_id of each row, parts in order
    missing.parquet              clean listings with no usable view (never silently lost)
    manifest.json                model reference, inputs, counts, timings

Every view of a listing is fused with the model's marginals, except the image views the
train step held out for evaluation (`splits.parquet`): those serve only as queries.
Running again with the same model, features and splits recomputes nothing.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from components.config import EmbedConfig, StepPaths
from components.contract import CLEAN, EMBEDDED_IDS, EMBEDDINGS, MISSING, SPLITS, STEPS
from components.core.encoders import pick_device
from components.io import atomic
from components.io.embedder import ListingEmbedder, held_out_refs
from components.io.manifest import (
    Timer,
    describe_files,
    read_manifest,
    sha256_file,
    unchanged_manifest,
    write_manifest,
)
from components.release import registry

STEP = STEPS["embed"]
OUTPUTS = tuple(artifact.name for artifact in STEP.writes)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    counts: dict
    summary: str


def run(config: EmbedConfig, paths: StepPaths) -> EmbedResult:
    """Embed every listing of `<workdir>/featurize` with the configured model."""
    timer = Timer()
    features_manifest = read_manifest(paths.step_dir("featurize"))
    out = paths.step_dir(STEP.name)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    loaded = registry.load_model(config.model, paths, device)
    inputs = {
        "featurize": features_manifest["outputs"],
        "model": loaded.reference,
        "splits_sha256": sha256_file(paths.path(SPLITS)),
    }
    if (done := _unchanged(out, config, inputs)) is not None:
        log.info("%s", done.summary)
        return done
    embedder = ListingEmbedder(loaded.model, loaded.spec, paths, device)
    held_out = held_out_refs(paths)
    counts = _write(embedder, out, held_out, config.batch_size)
    missing = _write_missing(paths.path(CLEAN), out, embedder.left_out)
    counts["missing"] = missing
    summary = (
        f"embed: {counts['listings']} listings -> {loaded.model.dim}-d embeddings "
        f"with model {_describe(loaded.reference)} on {device}, {counts['held_out_views']} "
        f"held-out views left out, {missing} listings without a usable view; "
        f"{counts['listings_per_s']:.0f} listings/s"
    )
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs=inputs,
        outputs=describe_files(out, OUTPUTS),
        counts=counts,
        extra={"summary": summary, "model": loaded.reference, "device": str(device)},
    )
    log.info("%s", summary)
    return EmbedResult(out_dir=out, counts=counts, summary=summary)


def _describe(reference: dict) -> str:
    if reference.get("version"):
        return f"{reference['name']} v{reference['version']}"
    return reference["sha256"][:12]


def _unchanged(out: Path, config: EmbedConfig, inputs: dict) -> EmbedResult | None:
    manifest = unchanged_manifest(out, config, inputs, OUTPUTS)
    if manifest is None:
        return None
    summary = manifest["summary"] + " (unchanged: nothing recomputed)"
    return EmbedResult(out_dir=out, counts=manifest["counts"], summary=summary)


def _write(
    embedder: ListingEmbedder, out: Path, held_out: set[tuple[str, str]], batch_size: int
) -> dict:
    """Embed chunk by chunk: one part file per chunk, and the ids of its rows."""
    parts = out / EMBEDDINGS.name
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    total = 0
    progress = tqdm(desc="embed: listings", unit="listing", mininterval=2)
    schema = pa.schema([("listing_id", pa.string())])
    with (
        atomic.writing(out / EMBEDDED_IDS.name) as ids_path,
        pq.ParquetWriter(ids_path, schema) as ids,
    ):
        for part, chunk in enumerate(embedder.chunks(held_out)):
            vectors = embedder.embed(chunk, batch_size)
            with atomic.writing(parts / f"part-{part:06d}.npy") as tmp, tmp.open("wb") as handle:
                np.save(handle, vectors)
            ids.write_table(pa.table({"listing_id": chunk.listing_ids}))
            total += len(chunk.listing_ids)
            progress.update(len(chunk.listing_ids))
    rate = progress.format_dict["n"] / max(progress.format_dict["elapsed"], 1e-9)
    progress.close()
    return {"listings": total, "held_out_views": len(held_out), "listings_per_s": rate}


def _write_missing(clean: Path, out: Path, left_out: dict[str, str]) -> int:
    """Clean listings that got no embedding, with the reason (featurize's skipped.parquet
    says which views were unusable and why)."""
    embedded = set(pq.read_table(out / EMBEDDED_IDS.name).column("listing_id").to_pylist())
    missing = [
        {"listing_id": listing_id, "reason": left_out.get(listing_id, "no_usable_view")}
        for listing_id in pq.read_table(clean, columns=["listing_id"]).column(0).to_pylist()
        if listing_id not in embedded
    ]
    schema = pa.schema([("listing_id", pa.string()), ("reason", pa.string())])
    atomic.write_table(pa.Table.from_pylist(missing, schema=schema), out / MISSING.name)
    return len(missing)
