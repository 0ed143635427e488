"""A content-addressed, append-only store of feature vectors, in shards on disk.

Keys are sha256 digests of what was encoded (image bytes, text), one store per encoder
id, so an unchanged view is never encoded twice and a catalog that grows only encodes
its new views. Vectors are buffered up to `shard_rows` and written as one `.npy` shard
plus its keys; a shard becomes visible only once both files are renamed into place,
so an interrupted run loses at most its unflushed buffer, never the store. The keys file
records the sha256 of its vectors, checked when a process first reads the shard: a shard
altered on disk is an error naming it, never read silently.

Several processes may add to one store at once (the shards of a sharded featurize): each
writes files of its own (`writer`: `shard-<writer>-NNNNNN`) and reads what the others had
committed when it opened the store. Nothing is shared but the folder, so they never
overwrite one another; a content encoded by two of them is kept twice and read once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.io import key_index
from components.io.manifest import AlteredFile, sha256_file

_DIGEST = b"vectors_sha256"  # keys-file metadata: sha256 of the shard's .npy

log = logging.getLogger(__name__)


def unit_hash(text: str) -> float:
    """A deterministic pseudo-random number in [0, 1) from a string (splits, held-out names)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def content_key(data: bytes | str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()


class FeatureStore:
    """Vectors of one encoder (`dim` floats each) addressed by content key."""

    def __init__(
        self,
        root: Path,
        encoder_id: str,
        dim: int,
        shard_rows: int = 8192,
        writer: str = "",
    ) -> None:
        """`writer`: a tag in the names of the files this process writes, distinct per
        concurrent writer (the featurize shard); empty for a single writer."""
        self.dir = root / encoder_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.shard_rows = shard_rows
        self._prefix = f"shard-{writer}-" if writer else "shard-"
        self._where: dict[str, tuple[str, int]] = {}
        self._shards: dict[str, np.ndarray] = {}
        self._digests: dict[str, str | None] = {}  # None: a shard written before digests
        self._pending_keys: dict[str, None] = {}  # insertion-ordered set
        self._pending: list[np.ndarray] = []
        self._pending_since = 0.0  # time.monotonic() of the oldest buffered vector
        self._next_shard = 0
        self._index: key_index.KeyIndex | None = None
        self._load_index()

    def _load_index(self) -> None:
        """Find the committed shards: those the key index covers (components/io/key_index.py)
        from it, the others from their keys files; rewrite the index when it is missing,
        stale or leaves more than `key_index.REBUILD_AFTER` shards out."""
        mine = re.compile(re.escape(self._prefix) + r"(\d{6})")
        keys_files = {}
        for keys_file in sorted(self.dir.glob("shard-*.keys.parquet")):
            shard = keys_file.name.removesuffix(".keys.parquet")
            if self._vectors_path(shard).is_file():  # else an interrupted write: ignore it
                keys_files[shard] = keys_file
            if (number := mine.fullmatch(shard)) is not None:
                self._next_shard = max(self._next_shard, int(number.group(1)) + 1)
        self._index = key_index.load(self.dir, keys_files)
        covered = self._index.covers() if self._index is not None else {}
        for shard in covered.values():
            self._digests[shard.name] = shard.digest
        read: dict[str, list[str]] = {}
        for shard, keys_file in keys_files.items():
            if shard in covered:
                continue
            table = pq.read_table(keys_file)
            digest = (table.schema.metadata or {}).get(_DIGEST)
            self._digests[shard] = digest.decode() if digest else None
            read[shard] = table.column("key").to_pylist()
            for row, key in enumerate(read[shard]):
                self._where.setdefault(key, (shard, row))
        if len(read) > (key_index.REBUILD_AFTER if self._index is not None else 0):
            self._reindex(keys_files, read)

    def _reindex(self, keys_files: dict[str, Path], read: dict[str, list[str]]) -> None:
        """Write the key index of every committed shard, then use it."""
        shards, keys = [], []
        covered = self._index.covers() if self._index is not None else {}
        for shard, keys_file in keys_files.items():
            indexed = covered.get(shard)
            if indexed is None:
                indexed = key_index.Shard(shard, self._digests[shard], key_index.stamp(keys_file))
            shards.append(indexed)
            keys.append(read[shard] if shard in read else self._index_keys(shard))
        try:
            key_index.save(self.dir, key_index.build(shards, keys))
        except OSError as err:  # a store this process may not write to: use the keys files
            log.info("%s: key index not written (%s)", self.dir, err)
            return
        # another writer may have replaced it already: then keep what this one holds
        if (written := key_index.load(self.dir, keys_files)) is not None:
            self._index, self._where = written, {}

    def _index_keys(self, shard: str) -> list[str]:
        return pq.read_table(self.dir / f"{shard}.keys.parquet").column("key").to_pylist()

    def _find(self, key: str) -> tuple[str, int] | None:
        found = self._where.get(key)
        if found is None and self._index is not None:
            found = self._index.find(key)
        return found

    def _vectors_path(self, shard: str) -> Path:
        return self.dir / f"{shard}.npy"

    def __contains__(self, key: str) -> bool:
        return key in self._pending_keys or self._find(key) is not None

    def __len__(self) -> int:
        """Distinct keys committed."""
        indexed = len(self._index) if self._index is not None else 0
        return indexed + sum(
            1 for key in self._where if self._index is None or self._index.find(key) is None
        )

    def files(self) -> set[str]:
        """The shards committed so far, as `<encoder id>/<shard>`."""
        return {f"{self.dir.name}/{shard}" for shard in self._digests}

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """Buffer new vectors; write a shard whenever `shard_rows` are buffered."""
        if vectors.ndim != 2 or vectors.shape != (len(keys), self.dim):
            raise ValueError(
                f"expected vectors of shape ({len(keys)}, {self.dim}), got {vectors.shape}"
            )
        if not self._pending_keys:
            self._pending_since = time.monotonic()
        self._pending_keys.update(dict.fromkeys(keys))
        if len(self._pending_keys) != sum(len(p) for p in self._pending) + len(keys):
            raise ValueError("keys must be new and distinct: check `key in store` before add()")
        self._pending.append(vectors.astype(np.float32, copy=False))
        if len(self._pending_keys) >= self.shard_rows:
            self.flush()

    def flush_stale(self, seconds: float) -> None:
        """`flush` when the oldest buffered vector is `seconds` old: a writer that calls
        this as it goes loses at most that much work if killed, and a run that adds a few
        vectors at a time does not write a shard for each few."""
        if self._pending_keys and time.monotonic() - self._pending_since >= seconds:
            self.flush()

    def flush(self) -> None:
        """Write buffered vectors as a new shard (vectors first, keys last: keys commit it)."""
        if not self._pending_keys:
            return
        shard = f"{self._prefix}{self._next_shard:06d}"
        vectors = np.concatenate(self._pending)
        tmp = self.dir / f".{shard}.npy.tmp"
        with tmp.open("wb") as handle:
            np.save(handle, vectors)
        digest = sha256_file(tmp)
        os.replace(tmp, self._vectors_path(shard))
        keys_tmp = self.dir / f".{shard}.keys.tmp"
        keys = pa.table({"key": list(self._pending_keys)})
        pq.write_table(keys.replace_schema_metadata({_DIGEST: digest}), keys_tmp)
        os.replace(keys_tmp, self.dir / f"{shard}.keys.parquet")
        for row, key in enumerate(self._pending_keys):
            self._where.setdefault(key, (shard, row))
        self._pending_keys, self._pending = {}, []
        self._digests[shard] = digest
        self._next_shard += 1

    def get(self, keys: list[str]) -> np.ndarray:
        """Vectors for `keys` in order (memory-mapped shards); a missing key is a KeyError."""
        self.flush()
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        shards, rows = self._locate(keys)
        for shard, at in _positions_by_value(shards).items():
            out[at] = self._shard(shard)[rows[at]]
        return out

    def _locate(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The shard (name) and row of each of `keys`: the keys files' own from the
        dictionary, the key index's in one search."""
        shards = np.empty(len(keys), dtype=object)
        rows = np.empty(len(keys), np.int64)
        rest = []
        for i, key in enumerate(keys):
            found = self._where.get(key)
            if found is None:
                rest.append(i)
            else:
                shards[i], rows[i] = found
        if rest:
            index = self._index
            where = index.find_all([keys[i] for i in rest]) if index is not None else None
            if where is None or (where < 0).any():
                missing = rest[0] if where is None else rest[int(np.argmax(where < 0))]
                raise KeyError(keys[missing])
            names = np.array([shard.name for shard in index.shards], dtype=object)
            shards[rest], rows[rest] = names[where >> 32], where & 0xFFFFFFFF
        return shards, rows

    def _shard(self, shard: str) -> np.ndarray:
        if shard not in self._shards:
            path = self._vectors_path(shard)
            expected = self._digests.get(shard)
            if expected is not None and (actual := sha256_file(path)) != expected:
                raise AlteredFile(
                    f"{path}: sha256 {actual[:16]}... is not the {expected[:16]}... its keys "
                    "file recorded; the feature shard was altered or damaged: delete "
                    f"{path.name} and its .keys.parquet, then run featurize again to encode "
                    "its views anew"
                )
            self._shards[shard] = np.load(path, mmap_mode="r")
        return self._shards[shard]


def _positions_by_value(values: np.ndarray) -> dict[object, np.ndarray]:
    """Where each distinct value of `values` is."""
    if not len(values):
        return {}
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return {
        ordered[start]: order[start:end]
        for start, end in zip(starts, [*starts[1:], len(values)], strict=True)
    }
