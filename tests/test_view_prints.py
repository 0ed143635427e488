"""A refresh's embed fingerprints listings in Arrow: the same listings, order, fingerprints
and reasons as grouping the rows in Python (core.views), or it would re-embed (or worse,
reuse) the wrong ones."""

from __future__ import annotations

import random

import pyarrow as pa

from components.core.views import fingerprints, group_views
from components.io.view_prints import held_out_pairs, listing_fingerprints

SCHEMA = pa.schema(
    [
        ("listing_id", pa.string()),
        ("modality", pa.string()),
        ("view", pa.string()),
        ("position", pa.int32()),
        ("ref", pa.string()),
        ("key", pa.string()),
    ]
)
TEXT_VIEWS = ("title", "description", "tags", "category")


def _rows(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for n in range(60):
        listing_id = f"l{n}"
        for position in rng.sample(range(4), rng.randint(0, 4)):  # some with no image
            ref = f"images/{n}-{position}.png"
            key = f"k{rng.randint(0, 20)}"  # shared contents too
            rows.append(
                dict(
                    listing_id=listing_id,
                    modality="image",
                    view="image",
                    position=position,
                    ref=ref,
                    key=key,
                )
            )
        for position in rng.sample(range(4), rng.randint(0, 4)):  # some with no text
            text = f"text {rng.randint(0, 30)}"
            rows.append(
                dict(
                    listing_id=listing_id,
                    modality="text",
                    view=TEXT_VIEWS[position],
                    position=position,
                    ref=text,
                    key=f"t-{text}",
                )
            )
    rng.shuffle(rows)  # listings first seen anywhere, positions out of order
    return rows


def test_arrow_fingerprints_are_the_grouped_ones_listing_for_listing():
    for seed in range(5):
        rows = _rows(seed)
        images = [(r["listing_id"], r["ref"]) for r in rows if r["modality"] == "image"]
        held_out = set(random.Random(seed).sample(images, len(images) // 5))
        grouped = group_views(rows, held_out)

        table = pa.Table.from_pylist(rows, SCHEMA)
        ids, prints, left_out = listing_fingerprints(table, held_out)

        assert listing_fingerprints(table, held_out_pairs(held_out)) == (ids, prints, left_out)
        assert ids == grouped.listing_ids
        assert prints == fingerprints(grouped)
        assert left_out == grouped.left_out
        assert left_out and ids  # the cases are there: listings kept and left out


def test_an_empty_table_has_no_listings():
    assert listing_fingerprints(SCHEMA.empty_table(), {("a", "b")}) == ([], [], {})
