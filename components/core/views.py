"""A listing's views: the text of a text view, and the grouping of view rows per listing.

A view row is what the featurize step writes per usable view (`views.parquet`):
`listing_id`, `modality` ("image" or "text"), `view` (the column), `position` (0 = the
primary view of its modality), `ref` (image reference, or the text) and `key` (the
content key of its features). Training, the embed step, evaluation and the served
model all group rows with `group_views`, so a listing is made of the same views
everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from components.core.batching import ListingViews
from components.core.model import KIND, TEXT_VIEW_KINDS


def view_text(value: object) -> str | None:
    """A text view's string: lists (tags) are joined; empty or missing gives None."""
    if isinstance(value, list):
        value = ", ".join(v for v in value if isinstance(v, str) and v.strip())
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


@dataclass
class GroupedViews:
    """Listings that have views of both modalities, in first-seen order: each modality
    of each listing as rows into a table of distinct content keys (primary view first)."""

    listing_ids: list[str] = field(default_factory=list)
    images: list[ListingViews] = field(default_factory=list)  # rows into `image_keys`
    texts: list[ListingViews] = field(default_factory=list)  # rows into `text_keys`
    image_keys: list[str] = field(default_factory=list)
    image_refs: list[str] = field(default_factory=list)  # a catalog reference per image key
    text_keys: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # listing_id -> why not grouped
    _image_rows: dict[str, int] = field(default_factory=dict, repr=False)
    _text_rows: dict[str, int] = field(default_factory=dict, repr=False)

    def image_row(self, key: str, ref: str) -> int:
        """The table row of an image content (added if new)."""
        if key not in self._image_rows:
            self._image_rows[key] = len(self.image_keys)
            self.image_keys.append(key)
            self.image_refs.append(ref)
        return self._image_rows[key]

    def text_row(self, key: str) -> int:
        """The table row of a text content (added if new)."""
        if key not in self._text_rows:
            self._text_rows[key] = len(self.text_keys)
            self.text_keys.append(key)
        return self._text_rows[key]


def group_views(rows: Iterable[dict], held_out: Collection[tuple[str, str]] = ()) -> GroupedViews:
    """Group view rows per listing, each modality ordered by position. Image views in
    `held_out` ((listing_id, ref) pairs, kept for evaluation) are left out. A listing
    needs a view of each modality; one without is recorded in `left_out` with why."""
    per_listing: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        views = per_listing.setdefault(row["listing_id"], {"image": [], "text": []})
        if row["modality"] == "image" and (row["listing_id"], row["ref"]) in held_out:
            continue
        views[row["modality"]].append(row)
    grouped = GroupedViews()
    for listing_id, views in per_listing.items():
        images = sorted(views["image"], key=lambda v: v["position"])
        texts = sorted(views["text"], key=lambda v: v["position"])
        if not images or not texts:
            grouped.left_out[listing_id] = (
                "no_usable_image_view" if texts else "no_usable_text_view"
            )
            continue
        grouped.listing_ids.append(listing_id)
        grouped.images.append(
            ListingViews(
                tuple(grouped.image_row(v["key"], v["ref"]) for v in images),
                tuple(image_kind(slot) for slot in range(len(images))),
            )
        )
        grouped.texts.append(
            ListingViews(
                tuple(grouped.text_row(v["key"]) for v in texts),
                tuple(TEXT_VIEW_KINDS[v["view"]] for v in texts),
            )
        )
    return grouped


def subset(grouped: GroupedViews, members: Iterable[int]) -> GroupedViews:
    """The listings `members` (positions in `grouped`) alone, with tables of only their
    contents: what embedding just those listings reads."""
    part = GroupedViews()
    for i in members:
        images, texts = grouped.images[i], grouped.texts[i]
        part.listing_ids.append(grouped.listing_ids[i])
        image_rows = [
            part.image_row(grouped.image_keys[r], grouped.image_refs[r]) for r in images.rows
        ]
        text_rows = [part.text_row(grouped.text_keys[r]) for r in texts.rows]
        part.images.append(ListingViews(tuple(image_rows), images.kinds))
        part.texts.append(ListingViews(tuple(text_rows), texts.kinds))
    return part


def fingerprints(grouped: GroupedViews) -> list[str]:
    """Per listing of `grouped`, a hash of exactly what its embedding is made of: the
    content key and view type of each of its views, in order. The same fingerprint and the
    same model give the same vector, so a refresh reuses the vector of a listing whose
    fingerprint did not change."""
    found = []
    for images, texts in zip(grouped.images, grouped.texts, strict=True):
        digest = hashlib.sha256()
        for kind, row in zip(images.kinds, images.rows, strict=True):
            digest.update(f"i{kind}:{grouped.image_keys[row]}\n".encode())
        for kind, row in zip(texts.kinds, texts.rows, strict=True):
            digest.update(f"t{kind}:{grouped.text_keys[row]}\n".encode())
        found.append(digest.hexdigest()[:32])
    return found


def image_kind(slot: int) -> int:
    """The view type of the image in `slot`: the primary photo, or another photo."""
    return KIND["primary_image"] if slot == 0 else KIND["image"]


def group_queries(
    rows: Iterable[dict], row_of: dict[str, int], keep: Collection[str] | None = None
) -> dict[str, dict]:
    """Query rows (`query_id`, `listing_id`, `key`: one row per relevant listing) grouped
    per query: {query_id: {"key": text content key, "relevant": {listing rows}}}. Only
    listings in `row_of` (listing id -> row) count, and only queries in `keep` if given."""
    grouped: dict[str, dict] = {}
    for row in rows:
        if row["listing_id"] not in row_of or (keep is not None and row["query_id"] not in keep):
            continue
        entry = grouped.setdefault(row["query_id"], {"key": row["key"], "relevant": set()})
        entry["relevant"].add(row_of[row["listing_id"]])
    return grouped
