"""The content-addressed feature store: round trip, reopen, interrupted writes."""

from __future__ import annotations

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
