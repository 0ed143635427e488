"""The embeddings on disk: parts, deleted rows, a refresh appended to a release's parts or
compacted, every reader seeing the live rows in the order of listing_ids.parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.io import embedding_files
from components.io.embedding_files import DELETED, AppendedParts, ChunkParts, Embeddings

DIM = 4


def _ids(names: list[str]) -> pa.Table:
    return pa.table({"listing_id": names, "fingerprint": [f"fp-{n}" for n in names]})


def _base(tmp_path, sizes=(3, 2)):
    """A retrain's embeddings: parts of `sizes` rows, listing i's vector all i."""
    out = tmp_path / "base"
    names = [f"l{i}" for i in range(sum(sizes))]
    with ChunkParts(out, embedding_files.ID_SCHEMA) as parts:
        first = 0
        for number, size in enumerate(sizes):
            rows = range(first, first + size)
            vectors = np.repeat(np.arange(first, first + size, dtype=np.float32), DIM)
            parts.add(number, _ids([names[i] for i in rows]), vectors.reshape(size, DIM))
            first += size
    return out


def _refresh(tmp_path, base, keep, added, compact_above=0.5):
    out = tmp_path / "refresh"
    with AppendedParts(
        out, base / "embeddings", base / "listing_ids.parquet", compact_above
    ) as written:
        written.keep(np.array(keep))
        vectors = np.repeat(np.arange(100, 100 + len(added), dtype=np.float32), DIM)
        written.add(0, _ids(added), vectors.reshape(len(added), DIM))
    return out, written


def test_a_refresh_keeps_the_release_s_parts_deletes_what_it_replaces_and_appends(tmp_path):
    base = _base(tmp_path)

    out, written = _refresh(tmp_path, base, keep=[4, 0, 2], added=["l1", "new"])

    folder = out / "embeddings"
    assert sorted(p.name for p in folder.iterdir()) == [
        DELETED,
        "part-000000.npy",
        "part-000001.npy",
        "part-000002.npy",
    ]
    for name in ("part-000000.npy", "part-000001.npy"):  # the release's, byte for byte
        assert (folder / name).read_bytes() == (base / "embeddings" / name).read_bytes()
    assert np.load(folder / DELETED).tolist() == [1, 3] and not written.compacted
    live = Embeddings(folder)
    ids = pq.read_table(out / "listing_ids.parquet")["listing_id"].to_pylist()
    assert ids == ["l0", "l2", "l4", "l1", "new"] and len(live) == 5 and live.stored == 7
    assert live.all()[:, 0].tolist() == [0, 2, 4, 100, 101]  # row i is listing i's
    assert live.take(np.array([3, 1]))[:, 0].tolist() == [100, 2]
    assert [len(chunk) for chunk in live.chunks()] == [2, 1, 2]


def test_a_refresh_that_deletes_too_much_writes_every_live_row_anew_in_order(tmp_path):
    base = _base(tmp_path)
    appended, _ = _refresh(tmp_path, base, keep=[4, 0, 2], added=["l1", "new"])
    live = Embeddings(appended / "embeddings").all()

    out, written = _refresh(tmp_path, base, [4, 0, 2], ["l1", "new"], compact_above=0.25)

    assert written.compacted
    assert [p.name for p in (out / "embeddings").iterdir()] == ["part-000000.npy"]
    assert np.array_equal(Embeddings(out / "embeddings").all(), live)


def test_a_refresh_refuses_to_keep_a_row_twice_or_one_already_deleted(tmp_path):
    base = _base(tmp_path)
    once, _ = _refresh(tmp_path, base, keep=[0, 1, 2, 3], added=[])
    (tmp_path / "again").mkdir()

    with pytest.raises(ValueError, match="kept a row of the release twice"):
        _refresh(tmp_path / "again", base, keep=[0, 0], added=[])
    assert not (tmp_path / "again" / "refresh" / "listing_ids.parquet").exists()
    with pytest.raises(ValueError, match="or a deleted one"):
        _refresh(tmp_path / "again", once, keep=[4], added=[])


def test_deleted_rows_that_are_not_stored_rows_are_named_as_damage(tmp_path):
    base = _base(tmp_path)
    np.save(base / "embeddings" / DELETED, np.array([3, 1]))

    with pytest.raises(ValueError, match=r"deleted.npy: not ascending stored rows below 5"):
        Embeddings(base / "embeddings")


def test_a_refresh_with_nothing_new_leaves_the_release_s_files_byte_for_byte(tmp_path):
    retrained = _base(tmp_path)
    appended, _ = _refresh(tmp_path / "a", retrained, keep=[4, 0, 2], added=["l1", "new"])

    for base in (retrained, appended):  # on a retrain's files, and on a refresh's
        live = Embeddings(base / "embeddings").stored_rows().tolist()
        out, _ = _refresh(tmp_path / base.name, base, keep=live[::-1], added=[])

        for name in (
            "listing_ids.parquet",
            *(f"embeddings/{p.name}" for p in Embeddings(base / "embeddings").files),
        ):
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
        assert sorted(p.name for p in (out / "embeddings").iterdir()) == sorted(
            p.name for p in (base / "embeddings").iterdir()
        )


def _release(folder, ids: list[str], prints: list[str] | None, deleted: list[int] = ()):
    """A downloaded release's embed files: one part of len(ids) + len(deleted) stored rows,
    `deleted` of them no longer live."""
    from components.release.base_release import BaseRelease

    stored = len(ids) + len(deleted)
    (folder / "embeddings").mkdir(parents=True)
    np.save(folder / "embeddings" / "part-000000.npy", np.eye(stored, 4, dtype=np.float32))
    if deleted:
        np.save(folder / "embeddings" / DELETED, np.array(deleted, np.int64))
    columns = {"listing_id": ids} | ({"fingerprint": prints} if prints is not None else {})
    pq.write_table(pa.table(columns), folder / "listing_ids.parquet")
    return BaseRelease("v1", {}, folder)


def test_reusable_vectors_sort_listings_into_reused_changed_and_added(tmp_path):
    """A listing the release holds with the same fingerprint reuses its stored row (past
    the deleted ones), one with another fingerprint is changed, any other added."""
    from components.release.base_release import ADDED, CHANGED, REUSED, ReusableVectors

    ids = [f"L{i:04d}" for i in range(300)]
    release = ReusableVectors(_release(tmp_path, ids, [f"p{i}" for i in range(300)], [0, 5]))
    asked = ["L0299", "new-1", "L0003", "L0007", "L00030", ""]
    statuses, stored = release.lookup(asked, ["p299", "p1", "other", "p7", "p30", "p0"])

    assert statuses == [REUSED, ADDED, CHANGED, REUSED, ADDED, ADDED]
    # live row 299 is stored row 301 (stored rows 0 and 5 deleted); 7 is stored row 9
    assert stored.tolist() == [301, -1, -1, 9, -1, -1]
    statuses, stored = release.lookup([], [])
    assert statuses == [] and len(stored) == 0


def test_a_release_without_fingerprints_reuses_nothing(tmp_path):
    from components.release.base_release import CHANGED, ReusableVectors

    release = ReusableVectors(_release(tmp_path, ["a", "b"], None))
    statuses, stored = release.lookup(["b", "a"], ["x", "y"])
    assert statuses == [CHANGED, CHANGED] and stored.tolist() == [-1, -1]
