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

from components.contract import HELD_OUT_MIN_PHOTOS, QUERY_FEATURES, VIEWS
from components.core.batching import ListingViews
from components.core.retrieval import QUERY_TO_LISTING, VIEW_TO_LISTING, QuerySet
from components.core.views import GroupedViews, group_queries, group_views
from components.io.feature_store import FeatureStore, unit_hash

SPLITS = ("train", "val", "test")


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    u = unit_hash(key)
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


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

    def tasks(self, split: str) -> list[QuerySet]:
        """The retrieval tasks of a split (val or test)."""
        return [self.queries[split], self.held_out_views[split]]


@dataclass(frozen=True)
class HeldOutView:
    listing_id: str
    ref: str
    key: str
    split: str


def load_training_data(
    featurize_dir: Path, manifest: dict, val_fraction: float, test_fraction: float
) -> TrainingData:
    """Group views per listing (by listing id), gather their features, apply the splits."""
    views = sorted(
        pq.read_table(featurize_dir / VIEWS.name).to_pylist(), key=lambda v: v["listing_id"]
    )
    held = held_out_views(views)
    grouped = group_views(views, {(h.listing_id, h.ref) for h in held})
    index = {lid: i for i, lid in enumerate(grouped.listing_ids)}
    held_rows: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for view in held:
        held_rows[view.split].append(
            (grouped.image_row(view.key, view.ref), index[view.listing_id])
        )
    queries, query_split_rows = _query_sets(
        featurize_dir, index, grouped, val_fraction, test_fraction
    )
    image_features = modality_store(featurize_dir, manifest, "image").get(grouped.image_keys)
    text_features = modality_store(featurize_dir, manifest, "text").get(grouped.text_keys)
    held_out = {
        split: QuerySet(
            VIEW_TO_LISTING,
            _take(image_features, [r for r, _ in held_rows[split]]),
            [{i} for _, i in held_rows[split]],
            rows=[r for r, _ in held_rows[split]],
        )
        for split in ("val", "test")
    }
    split_rows = [
        {"kind": "held_out_view", "id": h.ref, "listing_id": h.listing_id, "split": h.split}
        for h in held
    ]
    return TrainingData(
        listing_ids=grouped.listing_ids,
        image_features=image_features,
        text_features=text_features,
        images=grouped.images,
        texts=grouped.texts,
        queries={
            split: QuerySet(QUERY_TO_LISTING, _take(text_features, rows), relevant, ids)
            for split, (rows, relevant, ids) in queries.items()
        },
        held_out_views=held_out,
        splits=pa.Table.from_pylist(split_rows + query_split_rows),
        image_keys=grouped.image_keys,
        image_refs=grouped.image_refs,
    )


def held_out_views(views: list[dict]) -> list[HeldOutView]:
    """Per listing with views of both modalities and >= 3 image views (in `views`' listing
    order): the one non-primary image view, chosen by hash, that is held out of training
    and embedding, and whether it is a val or a test query."""
    per_listing: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for view in views:
        per_listing[view["listing_id"]][view["modality"]].append(view)
    held = []
    for listing_id, modalities in per_listing.items():
        images = sorted(modalities["image"], key=lambda v: v["position"])
        slot = _held_out_slot(listing_id, len(images))
        if slot is None or not modalities["text"]:
            continue
        split = "val" if unit_hash("view:" + listing_id) < 0.5 else "test"
        held.append(HeldOutView(listing_id, images[slot]["ref"], images[slot]["key"], split))
    return held


def _take(features: np.ndarray, rows: list[int]) -> np.ndarray:
    return features[np.asarray(rows, dtype=np.int64)]


def modality_store(featurize_dir: Path, manifest: dict, modality: str) -> FeatureStore:
    """The featurize step's feature store of one modality ("image" or "text")."""
    spec = manifest["encoders"][modality]
    return FeatureStore((featurize_dir / spec["store"]).parent, spec["id"], spec["dim"])


def _held_out_slot(listing_id: str, n_images: int) -> int | None:
    """Listings with >= 3 image views give up one non-primary view, chosen by hash."""
    if n_images < HELD_OUT_MIN_PHOTOS:
        return None
    return 1 + int(unit_hash("slot:" + listing_id) * (n_images - 1))


def _query_sets(
    featurize_dir: Path,
    index: dict[str, int],
    grouped: GroupedViews,
    val_fraction: float,
    test_fraction: float,
):
    """Per split: the text-feature row of each query, its relevant listings and its id."""
    table = pq.read_table(featurize_dir / QUERY_FEATURES.name)
    grouped_queries = group_queries(table.to_pylist(), index)
    sets: dict[str, tuple[list[int], list[set[int]], list[str]]] = {s: ([], [], []) for s in SPLITS}
    split_rows = []
    for query_id in sorted(grouped_queries):
        split = split_of("query:" + query_id, val_fraction, test_fraction)
        rows, relevant, ids = sets[split]
        rows.append(grouped.text_row(grouped_queries[query_id]["key"]))
        relevant.append(grouped_queries[query_id]["relevant"])
        ids.append(query_id)
        split_rows.append({"kind": "query", "id": query_id, "listing_id": None, "split": split})
    return sets, split_rows
