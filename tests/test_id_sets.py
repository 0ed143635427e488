"""Listing-id sets as hashes, and embed's missing listings through them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components import embed
from components.io import id_sets
from components.io.id_sets import IdSet


def test_an_id_set_finds_its_ids_and_a_repeat():
    ids = IdSet()
    ids.add([f"L{i}" for i in range(1000)])
    ids.add(["L1000", "L1001"])

    found = ids.contains(["L5", "L1001", "M5", ""])

    assert found.tolist() == [True, True, False, False] and len(ids) == 1002
    assert ids.first_repeated() is None
    ids.add(["L7"])
    assert ids.first_repeated() == int(id_sets.id_hashes(["L7"])[0])
    assert IdSet().contains(["a"]).tolist() == [False]


def test_id_hashes_are_the_same_from_a_list_or_an_arrow_slice_and_tell_ids_apart():
    ids = [f"L{i}" for i in range(3000)] + ["", "é", "listing-" * 40, "L1 ", " L1"]
    hashes = id_sets.id_hashes(ids)

    assert len(set(hashes.tolist())) == len(ids)  # every length, empty and non-ASCII ones
    sliced = pa.array(["x", *ids, "y"]).slice(1, len(ids))  # an Arrow array with an offset
    assert np.array_equal(id_sets.id_hashes(sliced), hashes)
    assert np.array_equal(id_sets.id_hashes(ids[::-1]), hashes[::-1])  # per id, not per batch


def _embedded(tmp_path, embedded: list[str], clean: list[str]):
    pq.write_table(pa.table({"listing_id": embedded}), tmp_path / "listing_ids.parquet")
    pq.write_table(pa.table({"listing_id": clean}), tmp_path / "clean.parquet")


def test_missing_listings_are_found_and_a_hash_collision_falls_back_to_exact(tmp_path, monkeypatch):
    clean = [f"L{i}" for i in range(50)]
    _embedded(tmp_path, clean[::2], clean)
    left_out = {"L1": "no_usable_image_view"}

    count = embed._write_missing(tmp_path / "clean.parquet", tmp_path, left_out)

    rows = pq.read_table(tmp_path / "missing.parquet").to_pylist()
    assert count == 25 and [r["listing_id"] for r in rows] == clean[1::2]
    assert rows[0]["reason"] == "no_usable_image_view" and rows[1]["reason"] == "no_usable_view"

    # every id hashes alike: the counts disagree, so the exact comparison decides
    monkeypatch.setattr(id_sets, "id_hashes", lambda ids: np.zeros(len(list(ids)), np.uint64))
    assert embed._write_missing(tmp_path / "clean.parquet", tmp_path, {}) == 25
    assert [
        r["listing_id"] for r in pq.read_table(tmp_path / "missing.parquet").to_pylist()
    ] == clean[1::2]
