"""A file's sha256 remembered by the file's identity, so that a file nobody touched since it
was last hashed is not read again: the steps of one run hash the same gigabyte of
embeddings and index several times (written, checked by the next step, checked and
published by promote).

Identity is what `os.stat` says of the file: device, inode, size, modification time and
change time, to the nanosecond. DVC and git-annex decide "unchanged" on (inode, size,
mtime); the change time (ctime) is added here because no writer can set it: writing the
file, or setting its mtime back (`os.utime`), moves it to the present. A file whose ctime
is too recent is never remembered, nor one that changed while it was read: timestamps come
from a coarse clock, so a second write in the same tick would not move them. Too recent is
FINE_RACY_SECONDS (a few of Linux's clock ticks, 4-10 ms each) on a filesystem that keeps
sub-second timestamps, RACY_SECONDS where the ctime falls on a whole second (a filesystem
that keeps seconds, or two of them). So a file hashed right after it was written (a step's
output, hashed for its manifest) is remembered, and the next step does not read it again.

The cache is a SQLite file shared by every process of this machine (`ENV` names another
file, or `off`); a cache that cannot be opened or written is left alone and files are
hashed as if there were none.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

ENV = "LISTING_EMBEDDINGS_HASH_CACHE"
RACY_SECONDS = 2.0  # timestamps in whole seconds
FINE_RACY_SECONDS = 0.05  # sub-second timestamps

log = logging.getLogger(__name__)
_opened: dict[int, sqlite3.Connection | None] = {}  # per process: none crosses a fork
_lock = threading.Lock()  # one connection per process, shared by its threads


def _after_fork() -> None:  # a lock held by another thread at the fork stays held
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _identity(status: os.stat_result) -> tuple[int, int, int, int, int]:
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


def location() -> Path | None:
    """The cache file: `$LISTING_EMBEDDINGS_HASH_CACHE`, else under the user's cache folder
    (`$XDG_CACHE_HOME`, ~/.cache); None when it is `off`."""
    named = os.environ.get(ENV)
    if named == "off":
        return None
    if named:
        return Path(named)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "listing-embeddings" / "sha256.sqlite"


def _connection() -> sqlite3.Connection | None:
    pid = os.getpid()
    with _lock:
        if pid not in _opened:
            _opened[pid] = _open(location())
        return _opened[pid]


def _open(path: Path | None) -> sqlite3.Connection | None:
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS sha256 (dev INTEGER, ino INTEGER, size INTEGER, "
            "mtime_ns INTEGER, ctime_ns INTEGER, digest TEXT, PRIMARY KEY (dev, ino))"
        )
        return connection
    except (OSError, sqlite3.Error) as err:
        log.debug("no sha256 cache at %s: %s", path, err)
        return None


def known(status: os.stat_result) -> str | None:
    """The sha256 remembered for a file of this identity, if any."""
    connection = _connection()
    if connection is None:
        return None
    dev, ino, size, mtime, ctime = _identity(status)
    try:
        with _lock:
            row = connection.execute(
                "SELECT size, mtime_ns, ctime_ns, digest FROM sha256 WHERE dev = ? AND ino = ?",
                (dev, ino),
            ).fetchone()
    except sqlite3.Error:
        return None
    return row[3] if row is not None and tuple(row[:3]) == (size, mtime, ctime) else None


def remember(path: Path, before: os.stat_result, digest: str) -> None:
    """Remember `digest` for `path`, hashed from `before` (its stat when reading began),
    unless it changed meanwhile or its ctime is too recent to be trusted."""
    connection = _connection()
    if connection is None:
        return
    try:
        after = os.stat(path)
    except OSError:
        return
    fresh = time.time_ns() - after.st_ctime_ns < racy_seconds(after.st_ctime_ns) * 1e9
    if _identity(after) != _identity(before) or fresh:
        return
    try:
        with _lock:
            connection.execute(
                "INSERT OR REPLACE INTO sha256 VALUES (?, ?, ?, ?, ?, ?)",
                (*_identity(after), digest),
            )
    except sqlite3.Error as err:
        log.debug("sha256 cache not written: %s", err)


def racy_seconds(ctime_ns: int) -> float:
    """How old a change time must be before a file's hash is remembered: RACY_SECONDS for
    one on a whole second (its filesystem may keep only seconds), else FINE_RACY_SECONDS."""
    return RACY_SECONDS if ctime_ns % 1_000_000_000 == 0 else FINE_RACY_SECONDS
