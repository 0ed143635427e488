"""Training data: the featurize outputs grouped per listing, and the splits.

Splits are decided once, from hashes, before any training, and written to
`splits.parquet` by the train step:
- queries go to train / val / test by a hash of `query_id`;
- every listing with at least 3 image views gives up one non-primary view (chosen by a
  hash of its id), which serves only as a val or test query for view-to-listing
  retrieval: it is never trained on and never fused into the listing's embedding.
Splits do not depend on `seed`, so runs with different seeds share one test set.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.batching import ListingViews
from components.feature_store import FeatureStore, unit_hash
from components.model import KIND, TEXT_VIEW_KINDS

SPLITS = ("train", "val", "test")


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    u = unit_hash(key)
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


@dataclass
class QuerySet:
    """Queries of one split: feature rows and the listing indices relevant to each."""

    features: np.ndarray  # [Q, F]
    relevant: list[set[int]]
    ids: list[str] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # rows of the features in their table


@dataclass
class TrainingData:
    listing_ids: list[str]
    image_features: np.ndarray  # [N_image_rows, F_image]
    text_features: np.ndarray  # [N_text_rows, F_text]
    images: list[ListingViews]  # per listing, held-out views removed
    texts: list[ListingViews]
    queries: dict[str, QuerySet]  # split -> text queries
    held_out_views: dict[str, QuerySet]  # "val" / "test" -> held-out image views
    splits: pa.Table  # what was decided, for the record
    image_keys: list[str] = field(default_factory=list)  # content key of each image row
    image_refs: list[str] = field(default_factory=list)  # a catalog reference for each row

    @property
    def train_queries_by_listing(self) -> dict[int, list[int]]:
        by_listing: dict[int, list[int]] = defaultdict(list)
        for q, items in enumerate(self.queries["train"].relevant):
            for item in items:
                by_listing[item].append(q)
        return by_listing


def load_training_data(
    featurize_dir: Path, manifest: dict, val_fraction: float, test_fraction: float
) -> TrainingData:
    """Group views per listing, gather their features, and apply the splits."""
    views = pq.read_table(featurize_dir / "views.parquet").to_pylist()
    image_store = modality_store(featurize_dir, manifest, "image")
    text_store = modality_store(featurize_dir, manifest, "text")
    per_listing: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for view in views:
        per_listing[view["listing_id"]][view["modality"]].append(view)
    listing_ids = sorted(lid for lid, v in per_listing.items() if v["image"] and v["text"])
    index = {lid: i for i, lid in enumerate(listing_ids)}

    image_keys: dict[str, int] = {}
    text_keys: dict[str, int] = {}
    images, texts, held_rows, split_rows = [], [], defaultdict(list), []
    for lid in listing_ids:
        listing_images = sorted(per_listing[lid]["image"], key=lambda v: v["position"])
        held = _held_out_slot(lid, len(listing_images))
        kept = [v for slot, v in enumerate(listing_images) if slot != held]
        images.append(_listing_views(kept, image_keys, _image_kind))
        texts.append(
            _listing_views(
                sorted(per_listing[lid]["text"], key=lambda v: v["position"]),
                text_keys,
                lambda v, slot: TEXT_VIEW_KINDS[v["view"]],
            )
        )
        if held is not None:
            split = "val" if unit_hash("view:" + lid) < 0.5 else "test"
            row = _row(listing_images[held]["key"], image_keys)
            held_rows[split].append((row, index[lid]))
            split_rows.append(
                {
                    "kind": "held_out_view",
                    "id": listing_images[held]["ref"],
                    "listing_id": lid,
                    "split": split,
                }
            )

    queries, query_split_rows = _query_sets(
        featurize_dir, index, text_keys, val_fraction, test_fraction
    )
    image_features = image_store.get(list(image_keys))
    text_features = text_store.get(list(text_keys))
    held_out = {
        split: QuerySet(
            _take(image_features, [r for r, _ in held_rows[split]]),
            [{i} for _, i in held_rows[split]],
            rows=[r for r, _ in held_rows[split]],
        )
        for split in ("val", "test")
    }
    ref_of = {view["key"]: view["ref"] for view in views if view["modality"] == "image"}
    return TrainingData(
        listing_ids=listing_ids,
        image_features=image_features,
        text_features=text_features,
        images=images,
        texts=texts,
        queries={
            split: QuerySet(_take(text_features, rows), relevant, ids)
            for split, (rows, relevant, ids) in queries.items()
        },
        held_out_views=held_out,
        splits=pa.Table.from_pylist(split_rows + query_split_rows),
        image_keys=list(image_keys),
        image_refs=[ref_of[key] for key in image_keys],
    )


def _take(features: np.ndarray, rows: list[int]) -> np.ndarray:
    return features[np.asarray(rows, dtype=np.int64)]


def modality_store(featurize_dir: Path, manifest: dict, modality: str) -> FeatureStore:
    """The featurize step's feature store of one modality ("image" or "text")."""
    spec = manifest["encoders"][modality]
    return FeatureStore((featurize_dir / spec["store"]).parent, spec["id"], spec["dim"])


def _held_out_slot(listing_id: str, n_images: int) -> int | None:
    """Listings with >= 3 image views give up one non-primary view, chosen by hash."""
    if n_images < 3:
        return None
    return 1 + int(unit_hash("slot:" + listing_id) * (n_images - 1))


def _image_kind(view: dict, slot: int) -> int:
    return KIND["primary_image"] if slot == 0 else KIND["image"]


def _row(key: str, rows: dict[str, int]) -> int:
    return rows.setdefault(key, len(rows))


def _listing_views(views: list[dict], rows: dict[str, int], kind) -> ListingViews:
    return ListingViews(
        tuple(_row(v["key"], rows) for v in views),
        tuple(kind(v, slot) for slot, v in enumerate(views)),
    )


def _query_sets(
    featurize_dir: Path,
    index: dict[str, int],
    text_keys: dict[str, int],
    val_fraction: float,
    test_fraction: float,
):
    """Per split: the text-feature row of each query, its relevant listings and its id."""
    table = pq.read_table(featurize_dir / "queries.parquet")
    grouped: dict[str, dict] = {}
    for row in table.to_pylist():
        if row["listing_id"] not in index:
            continue
        entry = grouped.setdefault(row["query_id"], {"key": row["key"], "relevant": set()})
        entry["relevant"].add(index[row["listing_id"]])
    sets: dict[str, tuple[list[int], list[set[int]], list[str]]] = {s: ([], [], []) for s in SPLITS}
    split_rows = []
    for query_id in sorted(grouped):
        split = split_of("query:" + query_id, val_fraction, test_fraction)
        rows, relevant, ids = sets[split]
        rows.append(_row(grouped[query_id]["key"], text_keys))
        relevant.append(grouped[query_id]["relevant"])
        ids.append(query_id)
        split_rows.append({"kind": "query", "id": query_id, "listing_id": None, "split": split})
    return sets, split_rows
