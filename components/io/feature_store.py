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
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.io.manifest import AlteredFile, sha256_file

_DIGEST = b"vectors_sha256"  # keys-file metadata: sha256 of the shard's .npy


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
        self._load_index()

    def _load_index(self) -> None:
        mine = re.compile(re.escape(self._prefix) + r"(\d{6})")
        for keys_file in sorted(self.dir.glob("shard-*.keys.parquet")):
            shard = keys_file.name.removesuffix(".keys.parquet")
            if not self._vectors_path(shard).is_file():
                continue  # keys without vectors: an interrupted write; ignore it
            table = pq.read_table(keys_file)
            digest = (table.schema.metadata or {}).get(_DIGEST)
            self._digests[shard] = digest.decode() if digest else None
            for row, key in enumerate(table.column("key").to_pylist()):
                self._where.setdefault(key, (shard, row))
            if (number := mine.fullmatch(shard)) is not None:
                self._next_shard = max(self._next_shard, int(number.group(1)) + 1)

    def _vectors_path(self, shard: str) -> Path:
        return self.dir / f"{shard}.npy"

    def __contains__(self, key: str) -> bool:
        return key in self._where or key in self._pending_keys

    def __len__(self) -> int:
        return len(self._where)

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
        for i, key in enumerate(keys):
            shard, row = self._where[key]
            out[i] = self._shard(shard)[row]
        return out

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
