"""The test split's queries, as the evaluate step measures them: the text queries and
the held-out photos the train step assigned to `test` (the embed step's `splits.parquet`), with the
listings relevant to each, and their features for a given model."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.config import StepPaths
from components.contract import EMBED_SPLITS, QUERY_FEATURES, VIEWS
from components.core.retrieval import QUERY_TO_LISTING, VIEW_TO_LISTING, QuerySet
from components.core.views import group_queries
from components.io.embedder import ListingEmbedder


def test_split_queries(
    paths: StepPaths, embedder: ListingEmbedder, row_of: dict[str, int]
) -> list[QuerySet]:
    """The test split's text queries and held-out views, with their relevant listings
    (`row_of`: listing id -> row of the listing embeddings); inputs for `embedder`'s
    model. Text queries carry their language when the catalog's queries have one. The
    split is the one the embedded model was trained with (the embed step's copy)."""
    splits = pq.read_table(paths.path(EMBED_SPLITS)).to_pylist()
    test = [s for s in splits if s["split"] == "test"]
    query_ids = {s["id"] for s in test if s["kind"] == "query"}
    queries = pq.read_table(paths.path(QUERY_FEATURES)).to_pylist()
    grouped = group_queries(queries, row_of, query_ids)
    ordered = sorted(grouped)
    language = {row["query_id"]: row.get("language") for row in queries}
    text = QuerySet(
        QUERY_TO_LISTING,
        embedder.text_features([grouped[q]["key"] for q in ordered]),
        [grouped[q]["relevant"] for q in ordered],
        ids=ordered,
        languages=[language[q] for q in ordered],
    )
    views = [(s["listing_id"], s["id"]) for s in test if s["kind"] == "held_out_view"]
    views = [(lid, ref) for lid, ref in views if lid in row_of]
    keys = _image_keys(paths.path(VIEWS), {ref for _, ref in views})
    views = [(lid, ref) for lid, ref in views if ref in keys]
    image = QuerySet(
        VIEW_TO_LISTING,
        embedder.image_features([keys[ref] for _, ref in views], [ref for _, ref in views]),
        [{row_of[lid]} for lid, _ in views],
    )
    return [text, image]


def _image_keys(views_path: Path, refs: set[str]) -> dict[str, str]:
    """Content key of each image reference in `refs` (read column-wise, filtered)."""
    table = pq.read_table(views_path, columns=["modality", "ref", "key"])
    table = table.filter(pc.equal(table["modality"], "image"))
    table = table.filter(pc.is_in(table["ref"], value_set=pc.cast(list(refs) or [""], "string")))
    return dict(zip(table["ref"].to_pylist(), table["key"].to_pylist(), strict=True))
