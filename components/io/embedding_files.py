"""The embed step's output on disk: unit float32 embeddings in part files and the listing
id of each live row (`listing_ids.parquet`).

The parts hold rows in order; `embeddings/deleted.npy`, when present, names the stored
rows (counted across the parts in order) that are no longer live. A retrain writes every
part anew and deletes nothing. A refresh keeps the parts of the release it builds on as
they are, byte for byte, deletes the rows of listings removed or changed, and appends a
part of the new and changed listings' vectors: the way Lance writes a version, so a
release shares every unchanged part with the one before it and uploads only the new part
(components/embed.py says when a refresh rewrites everything instead). Every reader goes
through `Embeddings`, which shows only the live rows, in order: row i of `Embeddings` is
row i of `listing_ids.parquet`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.config import StepPaths
from components.contract import EMBEDDED_IDS, EMBEDDINGS
from components.io import atomic
from components.io.manifest import verify_outputs

EMBED_OUTPUTS = (EMBEDDINGS.name, EMBEDDED_IDS.name)
DELETED = "deleted.npy"  # in embeddings/: int64 stored rows no longer live, ascending
PART = "part-{:06d}.npy"
KEPT = "kept.npy"  # in a refresh shard's embeddings/: the release's stored rows it kept
PART_ROWS = 8192  # rows per part a refresh appends or compacts into (8 MiB at 256-d)
ID_SCHEMA = pa.schema([("listing_id", pa.string()), ("fingerprint", pa.string())])
# hex fingerprints are half entropy: zstd halves the file every refresh uploads (1M: 17 MiB)
IDS_COMPRESSION = "zstd"


class Embeddings:
    """The live rows of an embeddings folder, read part by part (memory-mapped: a row is
    read when it is asked for)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parts = sorted(folder.glob("part-*.npy"))
        if not self.parts:
            raise FileNotFoundError(f"{folder}: no embeddings; run the embed step")
        self._arrays = [np.load(part, mmap_mode="r") for part in self.parts]
        dims = {array.shape[1] for array in self._arrays}
        if len(dims) != 1:
            raise ValueError(f"{folder}: embedding parts disagree on the dimension: {sorted(dims)}")
        self.dim = dims.pop()
        self.starts = np.cumsum([0] + [len(array) for array in self._arrays])
        self.stored = int(self.starts[-1])
        deleted = folder / DELETED
        self.deleted = np.load(deleted) if deleted.is_file() else np.zeros(0, np.int64)
        if len(self.deleted) and (
            self.deleted[0] < 0
            or self.deleted[-1] >= self.stored
            or np.any(np.diff(self.deleted) <= 0)
        ):
            raise ValueError(
                f"{deleted}: not ascending stored rows below {self.stored}: the embeddings "
                "are damaged; run the embed step again"
            )

    def __len__(self) -> int:
        return self.stored - len(self.deleted)

    @property
    def files(self) -> list[Path]:
        """Every file of the folder: the parts, then the deletions if any."""
        deleted = self.folder / DELETED
        return self.parts + ([deleted] if deleted.is_file() else [])

    def stored_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The stored row of each live row (all of them when `rows` is None)."""
        if not len(self.deleted):
            return np.arange(self.stored, dtype=np.int64) if rows is None else rows.astype(np.int64)
        live = np.ones(self.stored, dtype=bool)
        live[self.deleted] = False
        where = np.flatnonzero(live)
        return where if rows is None else where[rows]

    def chunks(self) -> Iterator[np.ndarray]:
        """The live rows, part by part, as contiguous float32 arrays."""
        for first, array in zip(self.starts, self._arrays, strict=False):
            gone = self.deleted[(self.deleted >= first) & (self.deleted < first + len(array))]
            vectors = np.asarray(array)
            if len(gone):
                vectors = np.delete(vectors, gone - first, axis=0)
            yield np.ascontiguousarray(vectors, dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The live rows `rows` [len(rows), dim], read part by part."""
        return self.take_stored(self.stored_rows(np.asarray(rows, dtype=np.int64)))

    def take_stored(self, stored: np.ndarray) -> np.ndarray:
        """The stored rows `stored` [len(stored), dim], read part by part."""
        out = np.zeros((len(stored), self.dim), np.float32)
        part = np.searchsorted(self.starts, stored, side="right") - 1
        for number in np.unique(part):
            mine = part == number
            out[mine] = self._arrays[number][stored[mine] - self.starts[number]]
        return out

    def all(self) -> np.ndarray:
        """Every live row [len(self), dim] in memory."""
        return np.concatenate(list(self.chunks())) if self.stored else np.zeros((0, self.dim))


def embedding_parts(embed_dir: Path) -> list[Path]:
    """The embed step's embedding part files, in stored order."""
    return Embeddings(embed_dir / EMBEDDINGS.name).parts


def verify_embeddings(embed_dir: Path, manifest: dict | None = None) -> dict:
    """Check the embeddings and their ids against the embed step's manifest (sha256);
    returns the manifest. Raises AlteredFile naming what changed."""
    return verify_outputs(embed_dir, EMBED_OUTPUTS, manifest)


def read_embeddings(paths: StepPaths) -> tuple[list[str], np.ndarray]:
    """The embed step's listing ids and their embeddings [n, dim], in memory, checked
    against its manifest first."""
    verify_embeddings(paths.step_dir("embed"))
    ids = pq.read_table(paths.path(EMBEDDED_IDS)).column("listing_id").to_pylist()
    vectors = Embeddings(paths.path(EMBEDDINGS)).all()
    if len(vectors) != len(ids):
        raise ValueError(
            f"{paths.path(EMBEDDINGS)}: {len(vectors)} live embeddings for {len(ids)} listings"
        )
    return ids, vectors


class _Writer:
    """An embeddings folder and its ids file being written: the folder emptied first, the
    ids file renamed into place only when writing finished without an error."""

    def __init__(self, out: Path, schema: pa.Schema) -> None:
        self.folder = out / EMBEDDINGS.name
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.schema = schema
        self._ids_path = out / EMBEDDED_IDS.name
        self._kept: list[np.ndarray] = []

    def __enter__(self):
        self._stack = ExitStack()
        self._ids_tmp = self._stack.enter_context(atomic.writing(self._ids_path))
        self._ids_out = self._stack.enter_context(
            pq.ParquetWriter(self._ids_tmp, self.schema, compression=IDS_COMPRESSION)
        )
        return self

    def __exit__(self, kind, value, trace) -> bool:
        """Finish, then close the ids file and rename it into place; on an error, in the
        body or in `finish`, remove it instead."""
        if kind is not None:
            return self._stack.__exit__(kind, value, trace)
        with self._stack:
            self.finish()
        return False

    def keep(self, stored_rows: np.ndarray) -> None:
        """Rows of the release built on that stay (a refresh)."""
        self._kept.append(np.asarray(stored_rows, dtype=np.int64))

    def _save(self, name: str, array: np.ndarray) -> None:
        with atomic.writing(self.folder / name) as tmp, tmp.open("wb") as handle:
            np.save(handle, array)

    def finish(self) -> None:
        raise NotImplementedError


class ChunkParts(_Writer):
    """One part per chunk (a retrain; a shard's files until they are gathered): `add`
    saves part `number` and appends its rows' ids. A refresh shard's parts hold only its
    new and changed listings, and the rows it kept go to `kept.npy`."""

    def add(self, number: int, ids: pa.Table, vectors: np.ndarray) -> None:
        self._save(PART.format(number), vectors)
        self._ids_out.write_table(ids.cast(self.schema))

    def finish(self) -> None:
        if self._kept:
            self._save(KEPT, np.sort(np.concatenate(self._kept)))


class AppendedParts(_Writer):
    """A refresh's embeddings: the parts of the release it builds on (`base`: its
    embeddings folder and ids file), linked unchanged, the rows not kept deleted, and the
    new and changed listings' vectors appended in parts of `PART_ROWS`. Should more than
    `compact_above` of the rows stored be deleted, every live row is written anew instead,
    in the same order (the ids file is the same either way).

    The ids file lists the kept listings in stored order, then the appended ones in the
    order they were added."""

    def __init__(self, out: Path, base: Path, base_ids: Path, compact_above: float) -> None:
        super().__init__(out, ID_SCHEMA)
        self.base = Embeddings(base)
        table = pq.read_table(base_ids)
        if "fingerprint" not in table.column_names:
            table = table.append_column("fingerprint", pa.nulls(table.num_rows, pa.string()))
        self._base_ids = table.select(ID_SCHEMA.names).cast(ID_SCHEMA)
        self._base_ids_path = base_ids
        if self._base_ids.num_rows != len(self.base):
            raise ValueError(
                f"{base_ids}: {self._base_ids.num_rows} listings for {len(self.base)} embeddings"
            )
        self.compact_above = compact_above
        for part in self.base.parts:
            _link_or_copy(part, self.folder / part.name)
        self._next = int(self.base.parts[-1].stem.split("-")[1]) + 1
        self._pending: list[np.ndarray] = []
        self._added: list[pa.Table] = []
        self.compacted = False

    def add(self, number: int, ids: pa.Table, vectors: np.ndarray) -> None:
        """Append new or changed listings (`number`, the chunk, does not matter here)."""
        if not len(vectors):
            return
        self._added.append(ids.select(ID_SCHEMA.names).cast(ID_SCHEMA))
        self._pending.append(np.asarray(vectors, dtype=np.float32))
        while sum(len(v) for v in self._pending) >= PART_ROWS:
            self._flush(PART_ROWS)

    def _flush(self, rows: int) -> None:
        block = np.concatenate(self._pending)
        self._save(PART.format(self._next), block[:rows])
        self._next += 1
        self._pending = [block[rows:]] if len(block) > rows else []

    def finish(self) -> None:
        if self._pending:
            self._flush(sum(len(v) for v in self._pending))
        kept = np.sort(np.concatenate(self._kept)) if self._kept else np.zeros(0, np.int64)
        if len(np.unique(kept)) != len(kept) or np.isin(kept, self.base.deleted).any():
            raise ValueError("a refresh kept a row of the release twice, or a deleted one")
        live = self.base.stored_rows()
        if not self._added and np.array_equal(kept, live):  # nothing new: the release's
            self._ids_out.close()
            shutil.copyfile(self._base_ids_path, self._ids_tmp)
            if len(self.base.deleted):
                shutil.copyfile(self.base.folder / DELETED, self.folder / DELETED)
            return
        self._ids_out.write_table(self._base_ids.take(np.searchsorted(live, kept)))
        for table in self._added:
            self._ids_out.write_table(table)
        stored = np.zeros(self.base.stored + sum(t.num_rows for t in self._added), dtype=bool)
        stored[kept] = True
        stored[self.base.stored :] = True
        deleted = np.flatnonzero(~stored).astype(np.int64)
        if len(deleted) > self.compact_above * len(stored):
            self._compact(deleted)
        elif len(deleted):
            self._save(DELETED, deleted)

    def _compact(self, deleted: np.ndarray) -> None:
        """Every live row, in order, written into new parts of PART_ROWS."""
        if len(deleted):
            self._save(DELETED, deleted)
        current = Embeddings(self.folder)
        fresh = self.folder.with_name(f".{self.folder.name}.compacting")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir()
        pending, number = [], 0
        for vectors in current.chunks():
            pending.append(vectors)
            while sum(len(v) for v in pending) >= PART_ROWS:
                block = np.concatenate(pending)
                np.save(fresh / PART.format(number), block[:PART_ROWS])
                number += 1
                pending = [block[PART_ROWS:]]
        if number == 0 or sum(len(v) for v in pending):  # the rest; an empty part if none
            block = np.concatenate(pending) if pending else np.zeros((0, current.dim), np.float32)
            np.save(fresh / PART.format(number), block)
        shutil.rmtree(self.folder)
        os.replace(fresh, self.folder)
        self.compacted = True


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (both are only ever replaced, never written
    in place), or a copy where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
