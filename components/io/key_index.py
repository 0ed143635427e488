"""The keys of a feature store's shards in one sorted, memory-mapped table.

Opening a store used to read every shard's keys file and build a dictionary of every key:
at a million listings about 3M keys and, after hourly refreshes, thousands of small files,
seconds per step that opened the store, growing with the catalog. The key index holds the
keys of the shards it covers sorted (`<store>/key-index/<token>.keys.npy`, one fixed-width
byte string each) beside where each one is (`.where.npy`: shard number << 32 | row), named
by `key-index.json`; a lookup is a binary search that touches a few pages of the mapped
file, whatever the store's size.

It is a cache of the keys files, never the truth: it is used only while every shard it
covers is still there with the keys file it had (size and mtime, `os.stat`) and its own
files hash to what `key-index.json` records; anything else and the store reads the keys
files, as before, and writes the index anew. Shards written after it are read from their
keys files until there are more than `REBUILD_AFTER` of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.io import atomic
from components.io.manifest import sha256_file

INDEX = "key-index.json"
FOLDER = "key-index"
REBUILD_AFTER = 64  # shards outside the index past which opening the store rewrites it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """A committed shard as the index records it."""

    name: str
    digest: str | None  # sha256 of its vectors, from its keys file (None: written before)
    keys_stamp: tuple[int, int]  # size and mtime_ns of its keys file


@dataclass(frozen=True)
class KeyIndex:
    keys: np.ndarray  # sorted, distinct, dtype S<width>
    where: np.ndarray  # int64: shard number << 32 | row
    shards: tuple[Shard, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: str) -> tuple[str, int] | None:
        """The shard and row holding `key`, or None."""
        raw = key.encode()
        if len(raw) > self.keys.dtype.itemsize or not len(self.keys):
            return None
        at = int(np.searchsorted(self.keys, raw))
        if at == len(self.keys) or self.keys[at] != raw:
            return None
        packed = int(self.where[at])
        return self.shards[packed >> 32].name, packed & 0xFFFFFFFF

    def find_all(self, keys: list[str]) -> np.ndarray:
        """`where` of each of `keys` (shard number << 32 | row), -1 for a key not held:
        one vectorised binary search."""
        found = np.full(len(keys), -1, np.int64)
        if not len(self.keys) or not keys:
            return found
        raw = [key.encode() for key in keys]
        fits = np.array([len(key) <= self.keys.dtype.itemsize for key in raw], bool)
        wanted = np.array(raw, dtype=self.keys.dtype)  # a longer key is cut: `fits` says so
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        hit = fits & (np.asarray(self.keys[at]) == wanted)
        found[hit] = self.where[at[hit]]
        return found

    def covers(self) -> dict[str, Shard]:
        return {shard.name: shard for shard in self.shards}


def stamp(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def load(store: Path, keys_files: dict[str, Path]) -> KeyIndex | None:
    """The index of `store` when every shard it covers is among `keys_files` (shard name
    -> its keys file) unchanged and its files are whole; None otherwise (said why)."""
    pointer = store / INDEX
    if not pointer.is_file():
        return None
    try:
        record = json.loads(pointer.read_text())
        shards = tuple(
            Shard(name, digest, (size, mtime)) for name, digest, size, mtime in record["shards"]
        )
        for shard in shards:
            if shard.name not in keys_files or stamp(keys_files[shard.name]) != shard.keys_stamp:
                log.info("%s: shard %s changed since it was indexed: not used", pointer, shard.name)
                return None
        arrays = {}
        for part in ("keys", "where"):
            path = store / FOLDER / record[part]["file"]
            if sha256_file(path) != record[part]["sha256"]:
                log.info("%s: %s is not the file it names: not used", pointer, path.name)
                return None
            arrays[part] = np.load(path, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.info("%s unreadable (%s): not used", pointer, err)
        return None
    return KeyIndex(arrays["keys"], arrays["where"], shards)


def build(shards: list[Shard], keys: list[list[str]]) -> KeyIndex:
    """The index of `shards` holding `keys` (per shard, in row order); of a key held twice,
    the first shard's row."""
    width = max((len(key.encode()) for part in keys for key in part), default=1)
    flat = np.array([key for part in keys for key in part], dtype=f"S{max(width, 1)}")
    counts = np.array([len(part) for part in keys], np.int64)
    shard_no = np.repeat(np.arange(len(keys), dtype=np.int64), counts)
    row = np.arange(len(flat), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    order = np.argsort(flat, kind="stable")  # of equal keys, the earlier shard first
    flat, where = flat[order], (shard_no[order] << 32) | row[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    return KeyIndex(flat[first], where[first], tuple(shards))


def save(store: Path, index: KeyIndex) -> None:
    """Write `index` under a new name, point `key-index.json` at it, remove what it
    replaced (a reader still mapping an old file keeps it until it closes)."""
    folder = store / FOLDER
    folder.mkdir(exist_ok=True)
    token = secrets.token_hex(8)
    record: dict = {
        "shards": [[s.name, s.digest, *s.keys_stamp] for s in index.shards],
        "keys_count": len(index),
    }
    for part, array in (("keys", index.keys), ("where", index.where)):
        name = f"{token}.{part}.npy"
        with atomic.writing(folder / name) as tmp, tmp.open("wb") as handle:
            np.save(handle, np.ascontiguousarray(array))
        record[part] = {"file": name, "sha256": sha256_file(folder / name)}
    atomic.write_text(store / INDEX, json.dumps(record) + "\n")
    keep = {record["keys"]["file"], record["where"]["file"]}
    for old in folder.iterdir():
        if old.name not in keep and not old.name.startswith("."):
            with contextlib.suppress(OSError):
                os.unlink(old)
