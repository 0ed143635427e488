"""The production store on both backends: a local directory and a real S3 protocol server
(moto_server on 127.0.0.1): publish, load, conflicts, failures, corruption, retention."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.config import StorageConfig
from components.release import production
from components.release.storage import LocalStorage, PointerConflict, S3Storage, open_storage

MODEL = {"name": "listing-encoder", "version": "1", "run_id": "r1", "sha256": "m" * 64}


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return _bucket_store()


def _bucket_store(**settings) -> S3Storage:
    from components.io.s3 import s3_client

    bucket = f"prod-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=bucket)
    return open_storage(StorageConfig(uri=f"s3://{bucket}/listings", **settings))


def release(root: Path, seed: int, n: int = 40, dim: int = 8) -> dict[str, Path]:
    """The files of one release: a Flat index, its id map and the embeddings."""
    root.mkdir(parents=True, exist_ok=True)
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    faiss.write_index(index, str(root / "index.faiss"))
    ids = pa.table({"listing_id": [f"L{seed}-{i}" for i in range(n)]})
    pq.write_table(ids, root / "ids.parquet")
    np.save(root / "part-000000.npy", vectors)
    return {
        "index.faiss": root / "index.faiss",
        "ids.parquet": root / "ids.parquet",
        "embeddings/part-000000.npy": root / "part-000000.npy",
    }


def publish(storage, tmp_path, seed: int, **kwargs) -> production.Published:
    model = MODEL | {"version": str(seed), "sha256": f"{seed:064d}"}
    extra = {"metrics": {"query_to_listing/recall@10": seed / 10}}
    return production.publish(storage, release(tmp_path / f"r{seed}", seed), extra, model, **kwargs)


def test_a_published_version_loads_back_verified_and_searchable(storage, tmp_path):
    published = publish(storage, tmp_path, 1)

    loaded = production.load_current_index(storage, tmp_path / "cache")

    assert published.changed and loaded.version == published.version
    assert loaded.ids.listing_ids == [f"L1-{i}" for i in range(40)] and loaded.index.ntotal == 40
    vectors = np.load(tmp_path / "r1" / "part-000000.npy")
    _, found = loaded.index.search(vectors[:5], 1)
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4]
    manifest = loaded.manifest
    assert set(manifest["files"]) == {"index.faiss", "ids.parquet", "embeddings/part-000000.npy"}
    assert manifest["model"]["version"] == "1" and manifest["previous"] is None
    assert manifest["metrics"] == {"query_to_listing/recall@10": 0.1}
    assert production.version_time(published.version) is not None


def test_promoting_the_same_content_again_is_a_no_op(storage, tmp_path):
    first = publish(storage, tmp_path, 1)
    uploads = []

    again = publish(storage, tmp_path, 1, progress=uploads.append)

    assert not again.changed and again.version == first.version and uploads == []
    assert [v.version for v in production.list_versions(storage)] == [first.version]
    files = release(tmp_path / "r1", 1)
    (tmp_path / "metrics.json").write_text('{"index/latency_p50_ms": 0.2}')  # re-evaluated
    files["metrics.json"] = tmp_path / "metrics.json"
    model = MODEL | {"sha256": f"{1:064d}"}
    assert not production.publish(storage, files, {}, model).changed


def test_an_update_lands_only_on_the_release_it_updates(storage, tmp_path):
    first = publish(storage, tmp_path, 1)
    second = publish(storage, tmp_path, 2)  # promoted since the update started from first

    with pytest.raises(production.PromotionConflict, match=f"not {first.version}, the release"):
        publish(storage, tmp_path, 3, built_on=first.version)

    assert production.read_pointer(storage).version == second.version
    assert len(production.list_versions(storage)) == 2  # nothing uploaded
    updated = publish(storage, tmp_path, 3, built_on=second.version)
    assert updated.changed and production.read_pointer(storage).version == updated.version
    again = publish(storage, tmp_path, 3, built_on=second.version)  # a rerun once it landed
    assert not again.changed and again.version == updated.version


def test_two_promotions_then_rollback_and_roll_forward(storage, tmp_path):
    first = publish(storage, tmp_path, 1)
    second = publish(storage, tmp_path, 2)
    assert second.previous == first.version
    assert production.read_pointer(storage).version == second.version

    old, new = production.rollback(storage)

    assert (old.version, new.version) == (second.version, first.version)
    assert new.reason == "rollback" and new.model["version"] == "1"
    assert production.load_current_index(storage).ids.listing_ids[0] == "L1-0"
    _, forward = production.rollback(storage, to=second.version)
    assert forward.version == second.version
    with pytest.raises(ValueError, match="not a complete version"):
        production.rollback(storage, to="20200101T000000000000Z-nope")
    with pytest.raises(ValueError, match="already current"):
        production.rollback(storage, to=second.version)


def test_rollback_before_any_promotion_says_so(storage):
    with pytest.raises(ValueError, match="nothing was promoted yet"):
        production.rollback(storage)
    with pytest.raises(ValueError, match="nothing was promoted yet"):
        production.load_current_index(storage)


def test_the_pointer_is_only_replaced_from_the_state_it_was_read_in(storage):
    storage.write_pointer("p", b"one", None)
    _, token = storage.read_pointer("p")
    with pytest.raises(PointerConflict):
        storage.write_pointer("p", b"two", None)  # "create" when it exists
    storage.write_pointer("p", b"two", token)
    with pytest.raises(PointerConflict):
        storage.write_pointer("p", b"three", token)  # a stale token
    assert storage.read_pointer("p")[0] == b"two"


def test_concurrent_promotions_have_exactly_one_winner_per_pointer_state(
    storage, tmp_path, monkeypatch
):
    base = publish(storage, tmp_path, 1)
    files = {seed: release(tmp_path / f"r{seed}", seed) for seed in range(2, 8)}
    start = threading.Barrier(len(files))
    outcomes: dict[int, object] = {}
    # every promotion reaches its conditional write of CURRENT before any makes it: all six
    # read the same pointer, so exactly one may win and five must find it moved
    before_write = threading.Barrier(len(files))
    write_pointer = storage.write_pointer

    def racing(key: str, data: bytes, token: str | None) -> None:
        if key == production.POINTER:
            before_write.wait(timeout=120)
        write_pointer(key, data, token)

    monkeypatch.setattr(storage, "write_pointer", racing)

    def promote(seed: int) -> None:
        start.wait()
        try:
            model = MODEL | {"version": str(seed), "sha256": f"{seed:064d}"}
            outcomes[seed] = production.publish(storage, files[seed], {}, model)
        except production.PromotionConflict as err:
            outcomes[seed] = err

    threads = [threading.Thread(target=promote, args=(seed,)) for seed in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [o for o in outcomes.values() if isinstance(o, production.Published)]
    losers = [o for o in outcomes.values() if isinstance(o, production.PromotionConflict)]
    assert (len(winners), len(losers)) == (1, len(files) - 1)
    assert winners[0].previous == base.version
    assert all("a concurrent promotion won" in str(err) for err in losers)
    stored = {v.version for v in production.list_versions(storage)}
    assert stored == {base.version} | {w.version for w in winners}  # losers left nothing
    current = production.read_pointer(storage)
    assert current.version in {w.version for w in winners}
    assert production.load_current_index(storage).version == current.version


def test_a_failure_after_some_uploads_leaves_current_alone_and_the_next_run_succeeds(
    storage, tmp_path, monkeypatch
):
    first = publish(storage, tmp_path, 1)
    real_put = storage.put_file
    calls = []

    def dies_on_the_second_upload(key, path):
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionError("connection reset by peer")
        real_put(key, path)

    monkeypatch.setattr(storage, "put_file", dies_on_the_second_upload)
    with pytest.raises(ConnectionError):
        publish(storage, tmp_path, 2)
    monkeypatch.undo()

    assert production.read_pointer(storage).version == first.version
    assert [v.version for v in production.list_versions(storage)] == [first.version]
    second = publish(storage, tmp_path, 2)
    assert production.read_pointer(storage).version == second.version
    assert production.load_current_index(storage).ids.listing_ids[0] == "L2-0"


def test_a_corrupted_object_is_caught_and_named(storage, tmp_path):
    published = publish(storage, tmp_path, 1)
    prefix = production.prefix_of(published.version)
    storage.put_bytes(published.manifest["files"]["index.faiss"]["object"], b"not an index")

    with pytest.raises(production.CorruptObject, match="index.faiss"):
        production.load_current_index(storage, tmp_path / "cache")
    with pytest.raises(production.CorruptObject, match="index.faiss.*12 bytes"):
        production.verify(storage, published.version, published.manifest)

    storage.put_bytes(prefix + "manifest.json", b'{"files": {}}')
    with pytest.raises(production.CorruptObject, match="manifest.json"):
        production.load_current_index(storage, tmp_path / "cache")


def test_a_corrupted_cached_copy_is_downloaded_again(storage, tmp_path):
    published = publish(storage, tmp_path, 1)
    cache = tmp_path / "cache"
    production.load_current_index(storage, cache)
    (cache / published.version / "ids.parquet").write_bytes(b"garbage")

    assert production.load_current_index(storage, cache).ids.listing_ids[0] == "L1-0"


def test_retention_keeps_the_newest_the_current_and_the_previous(storage, tmp_path):
    versions = [publish(storage, tmp_path, seed).version for seed in range(1, 6)]
    production.rollback(storage, to=versions[0])  # current: the oldest; previous: the newest
    stale = "20200101T000000000000Z-deadbeef0000"
    fresh = production.new_version("f" * 64)
    storage.put_bytes(production.prefix_of(stale) + "index.faiss", b"half")
    storage.put_bytes(production.prefix_of(fresh) + "index.faiss", b"in flight")

    deleted = production.apply_retention(storage, keep=2, abandoned_after=timedelta(hours=24))

    assert deleted == sorted([versions[1], versions[2], stale])
    left = {v.version: v.complete for v in production.list_versions(storage)}
    assert left == {versions[0]: True, versions[3]: True, versions[4]: True, fresh: False}
    assert production.load_current_index(storage).version == versions[0]


def test_retention_keeps_the_release_the_current_model_was_trained_on(storage, tmp_path):
    trained = publish(storage, tmp_path, 1).version
    refreshes = [trained]
    for seed in range(2, 7):  # hourly refreshes, each built on the one before
        files = release(tmp_path / f"r{seed}", seed)
        extra = {"kind": "refresh", "trained_on": trained}
        published = production.publish(storage, files, extra, MODEL, built_on=refreshes[-1])
        refreshes.append(published.version)

    deleted = production.apply_retention(storage, keep=2, abandoned_after=timedelta(hours=24))

    assert deleted == sorted(refreshes[1:-2])  # not the training release, older than them
    left = {v.version for v in production.list_versions(storage)}
    assert left == {trained, *refreshes[-2:]}


def test_versions_table_marks_the_current_and_incomplete_versions(storage, tmp_path):
    first = publish(storage, tmp_path, 1)
    publish(storage, tmp_path, 2)
    production.rollback(storage)
    storage.put_bytes(production.prefix_of("20990101T000000000000Z-x") + "a", b"x")

    table = production.versions_table(storage, ("query_to_listing/recall@10",))

    lines = table.splitlines()
    assert lines[0] == f"store: {storage.uri}"
    current = [line for line in lines if line.startswith("*  ")]
    assert len(current) == 1 and first.version in current[0] and "0.100" in current[0]
    assert any("(incomplete)" in line for line in lines)
    assert "rollback" in lines[-1]


def test_large_files_go_up_in_multipart_parts_and_verify(s3_env, tmp_path):
    storage = _bucket_store(multipart_threshold_mb=5)
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(12 << 20))

    storage.put_file("big.bin", big)

    head = storage.client.head_object(Bucket=storage.bucket, Key=storage._key("big.bin"))
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5, 5 and 2 MiB
    from components.io.manifest import sha256_file

    assert storage.sha256("big.bin") == sha256_file(big)


def test_storage_uris(tmp_path):
    assert isinstance(open_storage(StorageConfig(uri=f"file://{tmp_path}")), LocalStorage)
    assert open_storage(StorageConfig(), str(tmp_path)).uri == tmp_path.as_posix()
    with pytest.raises(ValueError, match="unsupported scheme 'gs'"):
        open_storage(StorageConfig(uri="gs://bucket/x"))
    with pytest.raises(ValueError, match="file:///abs/path"):
        open_storage(StorageConfig(uri="file://host/x"))
    with pytest.raises(ValueError, match="leaves the store"):
        LocalStorage(tmp_path).put_bytes("../escape", b"x")


def test_version_names_sort_by_time():
    early = production.new_version("b" * 64, datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
    late = production.new_version("a" * 64, datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=UTC))
    assert early == "20260102T030405000006Z-bbbbbbbbbbbb" and early < late
    assert production.version_time(early) == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)


def test_a_server_that_ignores_conditional_writes_is_refused_before_the_pointer_moves(s3_env):
    storage = _bucket_store()

    def drop_conditions(request, **_):  # what a server that ignores the headers sees
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    storage.client.meta.events.register("before-sign.s3.PutObject", drop_conditions)
    try:
        with pytest.raises(ValueError, match="ignored If-None-Match"):
            storage.write_pointer(production.POINTER, b"{}", None)
    finally:
        storage.client.meta.events.unregister("before-sign.s3.PutObject", drop_conditions)
    assert storage.read_pointer(production.POINTER) == (None, None)


def test_a_missing_bucket_is_a_one_line_error_naming_it(s3_env, capsys):
    from components.cli import main

    assert main(["versions", "--set", "storage.uri=s3://no-such-bucket-here/prod"]) == 1

    err = capsys.readouterr().err
    assert "error: versions: S3:" in err and "NoSuchBucket" in err
    assert "s3://no-such-bucket-here/prod" in err


def test_overrides_as_a_json_list_reach_the_params_and_bad_json_is_named(tmp_path, capsys):
    from components.cli import main

    store = tmp_path / "elsewhere"
    assert main(["create-store", "--set-json", json.dumps([f"storage.uri={store}"])]) == 0
    assert main(["versions", "--set-json", json.dumps([f"storage.uri={store}"])]) == 0
    assert f"store: {store.as_posix()}" in capsys.readouterr().out

    assert main(["versions", "--set-json", "storage.uri=x"]) == 2
    assert "--set-json: not JSON" in capsys.readouterr().err
    assert main(["versions", "--set-json", '{"storage.uri": "x"}']) == 2
    assert "expected a JSON list" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["versions", "rollback", "serve"])
def test_a_store_uri_where_no_store_was_created_is_an_error_not_an_empty_store(
    tmp_path, capsys, command
):
    from components.cli import main

    typo = tmp_path / "prodution"

    code = main([command, "--set", f"storage.uri={typo}", "--set", f"paths.workdir={tmp_path}"])

    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert f"storage.uri '{typo}': no production store there" in err
    assert f"create-store --set storage.uri={typo}" in err
    assert not typo.exists()  # nothing was started at the typo


def test_create_store_makes_an_empty_store_once_on_both_backends(storage):
    assert not production.is_store(storage)

    assert production.create_store(storage)
    assert not production.create_store(storage)  # a second creator changes nothing

    assert production.is_store(storage)
    assert production.read_pointer(storage) is None
    assert "no version is current (nothing promoted yet)" in production.versions_table(storage, ())


def test_a_store_from_before_store_json_is_still_a_store(storage, tmp_path):
    publish(storage, tmp_path, 1)
    storage.delete([production.STORE_RECORD])

    assert production.is_store(storage)


def test_the_default_local_store_reads_empty_until_promote_creates_it(tmp_path):
    from components.config import StepPaths

    paths = StepPaths(workdir=tmp_path / "work", catalog="unused")

    store = production.open_store(paths)
    assert production.read_pointer(store) is None and not production.is_store(store)

    created = production.open_store(paths, create=True)
    assert production.is_store(created) and created.uri == (tmp_path / "work/production").as_posix()


def test_promote_never_starts_a_store_at_an_explicit_uri(tmp_path):
    from components.config import StepPaths

    paths = StepPaths(
        workdir=tmp_path / "work", catalog="unused", storage=StorageConfig(uri=str(tmp_path / "x"))
    )

    with pytest.raises(production.NoStore, match="no production store there"):
        production.open_store(paths, create=True)
    assert not (tmp_path / "x").exists()


def _an_update_of(tmp_path: Path, seed: int) -> dict[str, Path]:
    """The files of release `seed` with another index of the same vectors (in reverse):
    what a refresh that changed the index but no embedding part or id map publishes."""
    files = release(tmp_path / f"r{seed}", seed)
    vectors = np.load(files["embeddings/part-000000.npy"])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors[::-1]))
    updated = tmp_path / f"u{seed}" / "index.faiss"
    updated.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(updated))
    return files | {"index.faiss": updated}


def test_a_version_stores_only_what_is_new_and_stays_whole_on_its_own(storage, tmp_path):
    first = publish(storage, tmp_path, 1)
    files = _an_update_of(tmp_path, 1)
    uploads = []

    second = production.publish(storage, files, {}, MODEL | {"version": "2"}, uploads.append)

    index_bytes = files["index.faiss"].stat().st_size
    assert second.uploaded_bytes == index_bytes == second.manifest["added_bytes"]
    assert [line.split()[2] for line in uploads if line.startswith("uploaded")] == ["index.faiss"]
    assert first.manifest["added_bytes"] == sum(
        p.stat().st_size for p in release(tmp_path / "r1", 1).values()
    )
    shared = second.manifest["files"]["ids.parquet"]["object"]
    assert shared == first.manifest["files"]["ids.parquet"]["object"]
    assert len(storage.list_keys(production.OBJECTS)) == 4  # three, and the new index
    for published in (first, second):  # each verifiable by its own manifest, every byte
        production.verify(storage, published.version, published.manifest)
    assert production.load_current_index(storage).index.ntotal == 40


def test_retention_deletes_an_object_only_when_no_retained_version_names_it(storage, tmp_path):
    first = publish(storage, tmp_path, 1)
    second = production.publish(storage, _an_update_of(tmp_path, 1), {}, MODEL | {"version": "2"})
    third = publish(storage, tmp_path, 3)  # nothing shared with the others
    in_flight = production.new_version("e" * 64)
    orphan = production.object_key("a" * 64)  # an upload in flight will need it
    storage.put_bytes(orphan, b"being shared")
    storage.put_bytes(
        production.prefix_of(in_flight) + production.PENDING, json.dumps([orphan]).encode()
    )
    abandoned = production.object_key("b" * 64)  # a failed upload's, named by nothing
    storage.put_bytes(abandoned, b"left behind")

    deleted = production.apply_retention(storage, keep=2, abandoned_after=timedelta(hours=24))

    assert first.version in deleted and second.version not in deleted
    left = set(storage.list_keys(production.OBJECTS))
    assert first.manifest["files"]["index.faiss"]["object"] not in left  # only v1 had it
    assert {entry["object"] for entry in second.manifest["files"].values()} <= left
    assert {entry["object"] for entry in third.manifest["files"].values()} <= left
    assert orphan in left and abandoned not in left
    production.verify(storage, second.version, second.manifest)


def test_a_version_of_the_old_layout_is_read_where_it_is_and_kept_by_retention(storage, tmp_path):
    old = "20240101T000000000000Z-0123456789ab"
    files = release(tmp_path / "old", 7)
    described = {
        name: {"sha256": production.sha256_file(path), "bytes": path.stat().st_size}
        for name, path in files.items()
    }
    for name, path in files.items():  # layout 1: every file under the version's prefix
        storage.put_file(production.prefix_of(old) + name, path)
    model = MODEL | {"version": "7"}
    manifest = {
        "version": old,
        "content_sha256": production.content_hash(described, model),
        "files": described,
        "model": model,
        "previous": None,
    }
    raw = json.dumps(manifest).encode()
    storage.put_bytes(production.prefix_of(old) + "manifest.json", raw)
    pointer = production._pointer_to(manifest, raw, None, "promote")
    storage.write_pointer(production.POINTER, pointer.to_bytes(), None)

    assert production.load_current_index(storage, tmp_path / "cache").ids.listing_ids[0] == "L7-0"
    new = publish(storage, tmp_path, 8)
    production.apply_retention(storage, keep=5, abandoned_after=timedelta(hours=24))

    production.verify(storage, old, manifest)  # its files were not taken for orphans
    assert production.read_pointer(storage).version == new.version
    assert new.manifest["layout"] == production.LAYOUT


def test_the_download_cache_reuses_what_an_earlier_version_brought(storage, tmp_path):
    publish(storage, tmp_path, 1)
    cache = tmp_path / "cache"
    production.load_current_index(storage, cache)
    production.publish(storage, _an_update_of(tmp_path, 1), {}, MODEL | {"version": "2"})
    fetched = _counting_fetches(storage)
    loaded = production.load_current_index(storage, cache)

    assert loaded.version != production.list_versions(storage)[0].version
    assert fetched == [loaded.manifest["files"]["index.faiss"]["object"]]  # ids.parquet: local


def test_a_download_copies_the_file_it_was_published_from_instead_of_fetching_it(storage, tmp_path):
    """`local_copies` names where this machine may hold a version's file (the workdir
    it was published from): used when its sha256 is the manifest's, fetched otherwise."""
    files = release(tmp_path / "r1", 1)
    published = production.publish(storage, files, {}, MODEL | {"version": "1"})
    fetched = _counting_fetches(storage)
    files["ids.parquet"].write_bytes(b"written again since it was published")
    local = tmp_path / "cache" / published.version
    names = ["index.faiss", "ids.parquet", "embeddings/part-000000.npy"]
    production.download(storage, published.version, published.manifest, names, local, files.get)

    assert fetched == [published.manifest["files"]["ids.parquet"]["object"]]
    for name in names:
        expected = published.manifest["files"][name]["sha256"]
        assert production.sha256_file(local / name) == expected, name


def _counting_fetches(storage) -> list[str]:
    """The keys `storage.get_file` fetches from now on, in order (it still fetches)."""
    fetched = []
    real_get = storage.get_file

    def counting(key, dest):
        fetched.append(key)
        real_get(key, dest)

    storage.get_file = counting
    return fetched
