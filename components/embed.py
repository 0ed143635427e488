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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from components import finetune, model_io
from components.batching import ListingViews, fuse_listings
from components.config import EmbedConfig, StepPaths
from components.encoders import pick_device
from components.manifest import (
    Timer,
    describe_files,
    read_manifest,
    sha256_file,
    unchanged_manifest,
    write_manifest,
)
from components.model import KIND, TEXT_VIEW_KINDS
from components.train_data import modality_store

STEP = "embed"
PARTS_DIR = "embeddings"
IDS_FILE = "listing_ids.parquet"
MISSING_FILE = "missing.parquet"
SPLITS_FILE = "splits.parquet"  # the train step's
OUTPUTS = (PARTS_DIR, IDS_FILE, MISSING_FILE)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    counts: dict
    summary: str


@dataclass
class Chunk:
    """Complete listings of one featurize chunk: their ids and views per modality."""

    listing_ids: list[str]
    images: list[ListingViews]  # rows into `image_keys`
    texts: list[ListingViews]  # rows into `text_keys`
    image_keys: list[str]
    image_refs: list[str]
    text_keys: list[str]


def run(config: EmbedConfig, paths: StepPaths) -> EmbedResult:
    """Embed every listing of `<workdir>/featurize` with the configured model."""
    timer = Timer()
    featurize_dir = paths.step_dir("featurize")
    features_manifest = read_manifest(featurize_dir)
    out = paths.step_dir(STEP)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    loaded = model_io.load_model(config.model, paths, device)
    splits = paths.step_dir("train") / SPLITS_FILE
    inputs = {
        "featurize": features_manifest["outputs"],
        "model": loaded.reference,
        "splits_sha256": sha256_file(splits),
    }
    if (done := _unchanged(out, config, inputs)) is not None:
        log.info("%s", done.summary)
        return done
    embedder = ListingEmbedder(loaded, featurize_dir, features_manifest, paths, device)
    held_out = held_out_views(splits)
    counts = embedder.write(out, held_out, config.batch_size)
    missing = _write_missing(paths.step_dir("validate") / "clean.parquet", out, embedder.left_out)
    counts["missing"] = missing
    summary = (
        f"embed: {counts['listings']} listings -> {loaded.spec['model']['dim']}-d embeddings "
        f"with model {_describe(loaded.reference)} on {device}, {counts['held_out_views']} "
        f"held-out views left out, {missing} listings without a usable view; "
        f"{counts['listings_per_s']:.0f} listings/s"
    )
    write_manifest(
        out,
        step=STEP,
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


def held_out_views(splits: Path) -> set[tuple[str, str]]:
    """(listing_id, image ref) of every view held out for evaluation."""
    table = pq.read_table(splits, columns=["kind", "id", "listing_id"]).to_pylist()
    return {(r["listing_id"], r["id"]) for r in table if r["kind"] == "held_out_view"}


class ListingEmbedder:
    """Fused listing embeddings from cached features, chunk by chunk."""

    def __init__(self, loaded, featurize_dir: Path, manifest: dict, paths: StepPaths, device):
        self.model = loaded.model
        self.device = device
        self.views_path = featurize_dir / "views.parquet"
        self.text_store = modality_store(featurize_dir, manifest, "text")
        self.image_store = modality_store(featurize_dir, manifest, "image")
        self.left_out: dict[str, str] = {}  # listing_id -> why it has no embedding
        self.encoder = None
        tuned = loaded.spec.get("finetune_blocks", 0)
        if tuned:  # the model's tail takes backbone activations, not pooled features
            self.encoder = finetune.image_encoder(loaded.spec, tuned, device)
            root = paths.step_dir("train") / finetune.ACTIVATIONS_DIR
            self.image_store = finetune.activation_store(self.encoder, root)
        self.catalog = paths.catalog

    def chunks(self, held_out: set[tuple[str, str]]) -> Iterator[Chunk]:
        """One Chunk per row group of views.parquet (featurize writes whole listings)."""
        parquet = pq.ParquetFile(self.views_path)
        finished: set[str] = set()
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group).to_pylist()
            chunk = _group(rows, held_out, self.left_out)
            repeated = finished.intersection(chunk.listing_ids)
            if repeated:
                raise ValueError(
                    f"{self.views_path}: listing {sorted(repeated)[0]!r} has views in more "
                    "than one row group; re-run featurize"
                )
            finished.update(chunk.listing_ids)
            yield chunk

    def image_features(self, keys: list[str], refs: list[str]) -> np.ndarray:
        """The model's image inputs for these contents: cached features, or backbone
        activations (computed if missing) when the model fine-tuned its backbone."""
        if self.encoder is not None:
            finetune.ensure_activations(self.image_store, self.encoder, keys, refs, self.catalog)
        return self.image_store.get(keys)

    def text_features(self, keys: list[str]) -> np.ndarray:
        return self.text_store.get(keys)

    def embed(self, chunk: Chunk, batch_size: int) -> np.ndarray:
        image_table = self.image_features(chunk.image_keys, chunk.image_refs)
        text_table = self.text_features(chunk.text_keys)
        return fuse_listings(
            self.model, image_table, chunk.images, text_table, chunk.texts, batch_size, self.device
        )

    def embed_all(self, held_out: set[tuple[str, str]], batch_size: int):
        """Every listing's embedding in memory: (listing ids, [n, dim] array)."""
        ids, parts = [], []
        for chunk in self.chunks(held_out):
            ids += chunk.listing_ids
            parts.append(self.embed(chunk, batch_size))
        return ids, np.concatenate(parts)

    def write(self, out: Path, held_out: set[tuple[str, str]], batch_size: int) -> dict:
        parts = out / PARTS_DIR
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
        total = 0
        progress = tqdm(desc="embed: listings", unit="listing", mininterval=2)
        with pq.ParquetWriter(out / IDS_FILE, pa.schema([("listing_id", pa.string())])) as ids:
            for part, chunk in enumerate(self.chunks(held_out)):
                vectors = self.embed(chunk, batch_size)
                np.save(parts / f"part-{part:06d}.npy", vectors)
                ids.write_table(pa.table({"listing_id": chunk.listing_ids}))
                total += len(chunk.listing_ids)
                progress.update(len(chunk.listing_ids))
        rate = progress.format_dict["n"] / max(progress.format_dict["elapsed"], 1e-9)
        progress.close()
        return {"listings": total, "held_out_views": len(held_out), "listings_per_s": rate}


def _group(rows: list[dict], held_out: set[tuple[str, str]], left_out: dict[str, str]) -> Chunk:
    """Views of one chunk grouped per listing (first-seen order), primary view first.
    A listing needs a view of each modality, like in training; one without is recorded
    in `left_out` with the reason."""
    per_listing: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        per_listing.setdefault(row["listing_id"], {"image": [], "text": []})
        if row["modality"] == "image" and (row["listing_id"], row["ref"]) in held_out:
            continue
        per_listing[row["listing_id"]][row["modality"]].append(row)
    chunk = Chunk([], [], [], [], [], [])
    image_rows: dict[str, int] = {}
    text_rows: dict[str, int] = {}
    for listing_id, views in per_listing.items():
        image_views = sorted(views["image"], key=lambda v: v["position"])
        text_views = sorted(views["text"], key=lambda v: v["position"])
        if not image_views or not text_views:
            left_out[listing_id] = "no_usable_image_view" if text_views else "no_usable_text_view"
            continue
        chunk.listing_ids.append(listing_id)
        chunk.images.append(
            ListingViews(
                tuple(_row(v, image_rows, chunk.image_keys, chunk.image_refs) for v in image_views),
                tuple(
                    KIND["primary_image"] if i == 0 else KIND["image"]
                    for i in range(len(image_views))
                ),
            )
        )
        chunk.texts.append(
            ListingViews(
                tuple(_row(v, text_rows, chunk.text_keys) for v in text_views),
                tuple(TEXT_VIEW_KINDS[v["view"]] for v in text_views),
            )
        )
    return chunk


def _row(view: dict, rows: dict[str, int], keys: list[str], refs: list[str] | None = None) -> int:
    if view["key"] not in rows:
        rows[view["key"]] = len(keys)
        keys.append(view["key"])
        if refs is not None:
            refs.append(view["ref"])
    return rows[view["key"]]


def _write_missing(clean: Path, out: Path, left_out: dict[str, str]) -> int:
    """Clean listings that got no embedding, with the reason (featurize's skipped.parquet
    says which views were unusable and why)."""
    embedded = set(pq.read_table(out / IDS_FILE).column("listing_id").to_pylist())
    missing = [
        {"listing_id": listing_id, "reason": left_out.get(listing_id, "no_usable_view")}
        for listing_id in pq.read_table(clean, columns=["listing_id"]).column(0).to_pylist()
        if listing_id not in embedded
    ]
    schema = pa.schema([("listing_id", pa.string()), ("reason", pa.string())])
    pq.write_table(pa.Table.from_pylist(missing, schema=schema), out / MISSING_FILE)
    return len(missing)
