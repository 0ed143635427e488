"""A file's sha256 is read again only when the file changed (components/io/hash_cache.py)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time

import pytest

from components.io import hash_cache
from components.io.manifest import sha256_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own, trusting files however recently they changed."""
    path = tmp_path / "sha256.sqlite"
    monkeypatch.setenv(hash_cache.ENV, str(path))
    monkeypatch.setattr(hash_cache, "_opened", {})
    monkeypatch.setattr(hash_cache, "RACY_SECONDS", 0.0)
    monkeypatch.setattr(hash_cache, "FINE_RACY_SECONDS", 0.0)
    return path


def _planted(cache_path, digest: str) -> None:
    """What the cache remembers, replaced: a later answer of `digest` came from it."""
    with sqlite3.connect(cache_path) as db:
        db.execute("UPDATE sha256 SET digest = ?", (digest,))


def test_an_untouched_file_is_not_read_again(cache, tmp_path):
    path = tmp_path / "index.faiss"
    path.write_bytes(b"vectors" * 1000)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()

    _planted(cache, "remembered")
    assert sha256_file(path) == "remembered"


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_read_again(cache, tmp_path):
    path = tmp_path / "part-000000.npy"
    path.write_bytes(b"a" * 4096)
    status = path.stat()
    sha256_file(path)
    _planted(cache, "remembered")

    path.write_bytes(b"b" * 4096)  # same size; its mtime set back below, its ctime moves
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))

    assert path.stat().st_mtime_ns == status.st_mtime_ns
    assert sha256_file(path) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_a_file_changed_just_now_is_not_remembered(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(hash_cache, "RACY_SECONDS", 60.0)
    monkeypatch.setattr(hash_cache, "FINE_RACY_SECONDS", 60.0)
    path = tmp_path / "ids.parquet"
    path.write_bytes(b"x" * 100)
    sha256_file(path)

    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM sha256").fetchone() == (0,)


def test_a_step_output_hashed_right_after_writing_is_remembered(tmp_path, monkeypatch):
    """With the default windows: on a filesystem with sub-second timestamps a file hashed
    a tenth of a second after it was written is remembered (the next step reads it no
    more); a change time on a whole second waits the coarse window."""
    monkeypatch.setenv(hash_cache.ENV, str(tmp_path / "sha256.sqlite"))
    monkeypatch.setattr(hash_cache, "_opened", {})
    path = tmp_path / "embeddings.npy"
    path.write_bytes(b"v" * 4096)
    if path.stat().st_ctime_ns % 1_000_000_000 == 0:
        pytest.skip("this filesystem keeps whole-second timestamps")
    time.sleep(0.1)
    sha256_file(path)
    with sqlite3.connect(tmp_path / "sha256.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM sha256").fetchone() == (1,)
    assert hash_cache.racy_seconds(1_733_212_345_000_000_000) == hash_cache.RACY_SECONDS
    assert hash_cache.racy_seconds(1_733_212_345_004_000_000) == hash_cache.FINE_RACY_SECONDS


def test_without_a_usable_cache_files_are_hashed_as_before(tmp_path, monkeypatch):
    monkeypatch.setattr(hash_cache, "_opened", {})
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(hash_cache.ENV, str(blocker / "sha256.sqlite"))
    path = tmp_path / "f"
    path.write_bytes(b"data")
    assert sha256_file(path) == hashlib.sha256(b"data").hexdigest()
    monkeypatch.setenv(hash_cache.ENV, "off")
    monkeypatch.setattr(hash_cache, "_opened", {})
    assert (
        hash_cache.location() is None and sha256_file(path) == hashlib.sha256(b"data").hexdigest()
    )
