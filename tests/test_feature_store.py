"""The content-addressed feature store: round trip, reopen, interrupted writes."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from components.io.feature_store import FeatureStore, content_key
from components.io.manifest import AlteredFile


def test_round_trip_across_shards_and_reopen(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(10, 4)).astype(np.float32)
    keys = [content_key(f"view {i}") for i in range(10)]
    store = FeatureStore(tmp_path, "enc", dim=4, shard_rows=3)

    store.add(keys[:5], vectors[:5])
    store.add(keys[5:], vectors[5:])
    store.flush()
    reopened = FeatureStore(tmp_path, "enc", dim=4, shard_rows=3)

    np.testing.assert_array_equal(store.get(keys[::-1]), vectors[::-1])
    np.testing.assert_array_equal(reopened.get(keys), vectors)
    assert len(reopened) == 10 and keys[3] in reopened
    assert len(list((tmp_path / "enc").glob("shard-*.npy"))) == 2  # one per add of >= 3 rows


def test_keys_without_vectors_are_ignored(tmp_path):
    store = FeatureStore(tmp_path, "enc", dim=2)
    store.add(["a"], np.ones((1, 2), np.float32))
    store.flush()
    (tmp_path / "enc" / "shard-000000.npy").unlink()  # as if the run died mid-write

    reopened = FeatureStore(tmp_path, "enc", dim=2)

    assert "a" not in reopened
    with pytest.raises(KeyError):
        reopened.get(["a"])


def test_bad_shapes_and_repeated_keys_are_refused(tmp_path):
    store = FeatureStore(tmp_path, "enc", dim=3)

    with pytest.raises(ValueError, match=r"expected vectors of shape \(2, 3\)"):
        store.add(["a", "b"], np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="distinct"):
        store.add(["a", "a"], np.ones((2, 3), np.float32))


def test_an_altered_shard_is_named_not_read(tmp_path):
    store = FeatureStore(tmp_path, "enc", dim=4, shard_rows=2)
    store.add(["a", "b"], np.ones((2, 4), np.float32))
    shard = next(tmp_path.glob("enc/shard-*.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last vector
    shard.write_bytes(bytes(data))

    with pytest.raises(AlteredFile, match=r"shard-000000\.npy: sha256 .* run featurize again"):
        FeatureStore(tmp_path, "enc", dim=4).get(["a"])


def test_writers_adding_at_the_same_time_keep_each_others_vectors(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(9, 4)).astype(np.float32)
    keys = [content_key(f"view {i}") for i in range(9)]
    first = FeatureStore(tmp_path, "enc", dim=4, shard_rows=2, writer="0-of-2")
    second = FeatureStore(tmp_path, "enc", dim=4, shard_rows=2, writer="1-of-2")
    rounds = {first: [slice(0, 2), slice(4, 6)], second: [slice(2, 4), slice(6, 9)]}
    together = threading.Barrier(2)

    def write(store: FeatureStore) -> None:
        for rows in rounds[store]:
            together.wait(timeout=30)  # both add a batch at once, round after round
            store.add(keys[rows], vectors[rows])

    threads = [threading.Thread(target=write, args=(store,)) for store in rounds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    reader = FeatureStore(tmp_path, "enc", dim=4)
    again = FeatureStore(tmp_path, "enc", dim=4, shard_rows=2, writer="0-of-2")
    again.add([content_key("new")], vectors[:1])
    again.flush()

    np.testing.assert_array_equal(reader.get(keys), vectors)
    assert keys[3] not in first  # each knows the others' vectors from when it opened
    names = sorted(p.name for p in (tmp_path / "enc").glob("*.npy"))
    assert names == [
        "shard-0-of-2-000000.npy",
        "shard-0-of-2-000001.npy",
        "shard-0-of-2-000002.npy",  # a reopened writer goes on after its own files
        "shard-1-of-2-000000.npy",
        "shard-1-of-2-000001.npy",
    ]


def _store_with_two_shards(tmp_path, keys, vectors) -> FeatureStore:
    store = FeatureStore(tmp_path, "enc", dim=4, shard_rows=3)
    store.add(keys[:3], vectors[:3])
    store.add(keys[3:], vectors[3:])
    store.flush()
    return store


def test_a_reopened_store_finds_its_keys_in_the_key_index_not_its_keys_files(tmp_path):
    keys = [content_key(f"view {i}") for i in range(6)]
    vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
    _store_with_two_shards(tmp_path, keys, vectors)
    FeatureStore(tmp_path, "enc", dim=4)  # opening an unindexed store indexes it

    reopened = FeatureStore(tmp_path, "enc", dim=4)

    assert reopened._where == {} and len(reopened._index) == 6  # nothing read per shard
    np.testing.assert_array_equal(reopened.get(keys[::-1]), vectors[::-1])
    assert keys[2] in reopened and "not a key" not in reopened and len(reopened) == 6
    with pytest.raises(KeyError):
        reopened.get([keys[0], "x" * 100])  # longer than any indexed key


def test_a_shard_replaced_under_its_name_is_not_looked_up_in_a_stale_key_index(tmp_path):
    keys = [content_key(f"view {i}") for i in range(6)]
    vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
    _store_with_two_shards(tmp_path, keys, vectors)
    FeatureStore(tmp_path, "enc", dim=4)  # indexed
    other = [content_key(f"other {i}") for i in range(3)]
    elsewhere = FeatureStore(tmp_path / "elsewhere", "enc", dim=4)
    elsewhere.add(other, -vectors[:3])
    elsewhere.flush()
    for suffix in (".npy", ".keys.parquet"):  # shard-000001 replaced by other vectors
        shutil.copy(
            tmp_path / "elsewhere" / "enc" / f"shard-000000{suffix}",
            tmp_path / "enc" / f"shard-000001{suffix}",
        )

    reopened = FeatureStore(tmp_path, "enc", dim=4)

    np.testing.assert_array_equal(reopened.get(other), -vectors[:3])
    assert keys[4] not in reopened


def test_an_altered_key_index_is_not_used_and_is_written_again(tmp_path):
    keys = [content_key(f"view {i}") for i in range(6)]
    vectors = np.arange(24, dtype=np.float32).reshape(6, 4)
    _store_with_two_shards(tmp_path, keys, vectors)
    FeatureStore(tmp_path, "enc", dim=4)
    where = next((tmp_path / "enc" / "key-index").glob("*.where.npy"))
    rows = np.load(where)
    np.save(where, rows[::-1].copy())  # every key pointing at another's row

    reopened = FeatureStore(tmp_path, "enc", dim=4)

    np.testing.assert_array_equal(reopened.get(keys), vectors)
    assert FeatureStore(tmp_path, "enc", dim=4)._where == {}  # indexed again


def test_shards_written_after_the_key_index_are_found_and_indexed_past_a_limit(
    tmp_path, monkeypatch
):
    from components.io import key_index

    monkeypatch.setattr(key_index, "REBUILD_AFTER", 2)
    keys = [content_key(f"view {i}") for i in range(9)]
    vectors = np.arange(36, dtype=np.float32).reshape(9, 4)
    _store_with_two_shards(tmp_path, keys[:6], vectors[:6])
    FeatureStore(tmp_path, "enc", dim=4)
    for key, vector in zip(keys[6:], vectors[6:], strict=True):  # three one-vector shards
        store = FeatureStore(tmp_path, "enc", dim=4)
        assert len(store._where) < 3  # the newest shards, from their keys files
        store.add([key], vector[None])
        store.flush()

    reopened = FeatureStore(tmp_path, "enc", dim=4)

    np.testing.assert_array_equal(reopened.get(keys), vectors)
    assert reopened._where == {} and len(reopened._index) == 9


def test_a_key_index_another_writer_replaced_meanwhile_loses_no_key(tmp_path, monkeypatch):
    from components.io import key_index

    keys = [content_key(f"view {i}") for i in range(7)]
    vectors = np.arange(28, dtype=np.float32).reshape(7, 4)
    _store_with_two_shards(tmp_path, keys[:6], vectors[:6])
    FeatureStore(tmp_path, "enc", dim=4)  # indexed
    newer = FeatureStore(tmp_path, "enc", dim=4)
    newer.add(keys[6:], vectors[6:])
    newer.flush()
    monkeypatch.setattr(key_index, "REBUILD_AFTER", 0)
    loaded, calls = key_index.load, []

    def replaced_after_the_first_read(store, files):
        calls.append(store)
        return loaded(store, files) if len(calls) == 1 else None  # the rewrite is gone

    monkeypatch.setattr(key_index, "load", replaced_after_the_first_read)

    reopened = FeatureStore(tmp_path, "enc", dim=4)

    assert len(calls) == 2  # read, rewritten, read again: not there
    np.testing.assert_array_equal(reopened.get(keys), vectors)
