"""A refresh's embed carries a listing's fingerprint only while featurize took the listing's
views whole: the same state, the same held-out views, and a row group in which every
listing is indexed (a listing featurize did not index would otherwise go unembedded)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.featurize import VIEWS_SCHEMA as SCHEMA
from components.io.print_carry import PrintCarry
from components.io.view_prints import held_out_pairs, listing_fingerprints
from components.io.view_reuse import IndexWriter


def _group(listings: list[str]) -> pa.Table:
    """Text rows, then image rows, of `listings`, as featurize writes a chunk."""
    rows = [
        {
            "listing_id": i,
            "modality": "text",
            "view": "title",
            "position": 0,
            "ref": f"t {i}",
            "key": f"kt-{i}",
        }
        for i in listings
    ]
    for i in listings:
        for position in range(2):
            ref = f"images/{i}-{position}.png"
            rows.append(
                {
                    "listing_id": i,
                    "modality": "image",
                    "view": "image",
                    "position": position,
                    "ref": ref,
                    "key": f"ki-{i}-{position}",
                }
            )
    return pa.Table.from_pylist(rows, SCHEMA)


def _featurized(tmp_path, states: dict[str, bytes | None]):
    """views.parquet in two row groups (a, b | c, d) and its index; a listing whose state
    is None is not indexed (as one with a skipped view)."""
    featurize = tmp_path / "featurize"
    featurize.mkdir(exist_ok=True)
    groups = [_group(["a", "b"]), _group(["c", "d"])]
    with pq.ParquetWriter(featurize / "views.parquet", SCHEMA) as writer:
        for table in groups:
            writer.write_table(table)
    index = IndexWriter()
    for listings in (["a", "b"], ["c", "d"]):
        index.add(
            pa.array(listings),
            pa.array([states[i] for i in listings], pa.binary(16)),
            np.ones(2, np.int64),
            np.full(2, 2, np.int64),
        )
    index.write(featurize, "featurize-params", set())
    return featurize, groups


STATES = {i: i.encode() * 16 for i in "abcd"}
HELD_OUT = held_out_pairs({("a", "images/a-1.png")})


def test_fingerprints_carry_for_a_whole_group_in_its_recorded_state(tmp_path):
    featurize, groups = _featurized(tmp_path, STATES | {"d": None})
    first = PrintCarry.open(tmp_path, featurize, HELD_OUT)
    assert [first.group_prints(g) for g in (0, 1)] == [None, None]  # nothing recorded
    for table in groups:
        first.note(listing_fingerprints(table, HELD_OUT))
    first.save(tmp_path)

    again = PrintCarry.open(tmp_path, featurize, HELD_OUT)

    assert again.group_prints(0) == listing_fingerprints(groups[0], HELD_OUT)
    assert again.group_prints(1) is None  # "d" is not indexed: the group is read


def test_a_listing_in_another_state_or_other_held_out_views_carry_nothing(tmp_path):
    featurize, groups = _featurized(tmp_path, STATES)
    first = PrintCarry.open(tmp_path, featurize, HELD_OUT)
    for table in groups:
        first.note(listing_fingerprints(table, HELD_OUT))
    first.save(tmp_path)
    assert PrintCarry.open(tmp_path, featurize, HELD_OUT).group_prints(1) is not None

    other = held_out_pairs({("c", "images/c-0.png")})
    assert PrintCarry.open(tmp_path, featurize, other).group_prints(1) is None
    featurize, _ = _featurized(tmp_path, STATES | {"c": b"C" * 16})  # "c" changed
    changed = PrintCarry.open(tmp_path, featurize, HELD_OUT)
    assert changed.group_prints(1) is None and changed.group_prints(0) is not None
