"""The release a refresh builds on: a version of the production store, the files a step
needs from it brought once into a local cache and verified against its manifest (copied
from the workdir's own outputs where they are the files it was published from, else
downloaded).

The embed step reuses its vector of every listing whose views did not change
(`embed.reuse_current`); the index step updates its index in place of a full build
(`index.update_current`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.config import StepPaths
from components.contract import EMBEDDED_IDS, EMBEDDINGS, RELEASE_FILES
from components.io.embedding_files import Embeddings
from components.release import production

ADDED, CHANGED, REUSED = "added", "changed", "reused"


@dataclass(frozen=True)
class BaseRelease:
    version: str
    manifest: dict
    local: Path  # the downloaded files

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model['name']}/{self.model['version']}"


def current(paths: StepPaths, cache: Path, names: tuple[str, ...]) -> BaseRelease:
    """The store's CURRENT version with the files `names` (`embeddings/` for every part).

    Raises:
        ValueError: nothing was promoted yet (a refresh needs a release to build on).
    """
    storage = production.open_store(paths)
    pointer = production.read_pointer(storage)
    if pointer is None:
        raise ValueError(
            f"nothing was promoted to {storage.uri} yet: a refresh builds on the current "
            "release, so run a retrain first (make run, or the retrain DAG)"
        )
    return _fetch(storage, pointer.version, pointer.manifest_sha256, cache, names, paths)


def version(paths: StepPaths, name: str, cache: Path, names: tuple[str, ...]) -> BaseRelease:
    """A given version (the one the embed step built on), with the files `names`."""
    return _fetch(production.open_store(paths), name, None, cache, names, paths)


def _fetch(
    storage, name: str, manifest_sha256: str | None, cache: Path, names, paths: StepPaths
) -> BaseRelease:
    """The version's files `names` in `cache/<name>`: copied from this workdir's own
    outputs where they are the very files it was published from (most often: the last
    run's; a gigabyte of index and of embeddings at a million listings not downloaded
    again), else downloaded."""
    manifest = production.read_manifest(storage, name, manifest_sha256)
    wanted = [f for f in manifest["files"] if any(_named(f, n) for n in names)]
    production.download(
        storage, name, manifest, wanted, cache / name, lambda file: _in_workdir(paths, file)
    )
    # one release in the cache at a time, the older removed only now: the workdir's files
    # are often hard links to its copies, and an unlink moves their change time, so the
    # hash cache would no longer know them when they were looked at
    for older in cache.iterdir() if cache.is_dir() else ():
        if older.name != name:
            shutil.rmtree(older, ignore_errors=True)
    return BaseRelease(name, manifest, cache / name)


_RELEASED = {artifact.name: artifact for artifact in RELEASE_FILES}


def _in_workdir(paths: StepPaths, name: str) -> Path | None:
    """Where this workdir's steps write the release file `name` (promote publishes a
    version from there)."""
    folder, _, part = name.partition("/")
    if part and folder == EMBEDDINGS.name:
        return paths.path(EMBEDDINGS) / part
    artifact = _RELEASED.get(name)
    return paths.path(artifact) if artifact is not None else None


def _named(file: str, name: str) -> bool:
    return file == name or file.startswith(f"{name}/")


class ReusableVectors:
    """The base release's vector of each listing, found by listing id and fingerprint
    (memory-mapped: only the rows reused are read). Its ids are held in Arrow beside their
    64-bit hashes, sorted for lookups: about 110 bytes a listing where a dictionary of
    Python objects took about 290 (and took longer to build and to search)."""

    def __init__(self, base: BaseRelease) -> None:
        table = pq.read_table(base.local / EMBEDDED_IDS.name)
        self._ids = table.column("listing_id").combine_chunks().cast(pa.string())
        # a release from before fingerprints were recorded: nothing can be reused
        self._prints = (
            table.column("fingerprint").combine_chunks().cast(pa.string())
            if "fingerprint" in table.column_names
            else pa.nulls(len(self._ids), pa.string())
        )
        self.base = base
        self.embeddings = Embeddings(base.local / EMBEDDINGS.name)
        if len(self.embeddings) != len(self._ids):
            raise ValueError(
                f"release {base.version}: {len(self.embeddings)} embeddings for "
                f"{len(self._ids)} listings"
            )
        self._stored = self.embeddings.stored_rows()
        hashes = _hashes(self._ids.to_pylist())
        self._order = np.argsort(hashes)
        self._hashes = hashes[self._order]

    def __len__(self) -> int:
        return len(self._ids)

    def owned(self, owns: Callable[[str], bool]) -> int:
        """How many of its listings `owns` (a shard's test) accepts."""
        return sum(1 for listing_id in self._ids.to_pylist() if owns(listing_id))

    def lookup(self, listing_ids: list[str], fingerprints: list[str]):
        """Per listing: reused (same id and fingerprint: its vector is the release's),
        changed (same id, other views) or added; and the stored row of each reused one in
        the release's embeddings (-1 for the others)."""
        ids = pa.array(listing_ids, pa.string())
        if not len(self._ids) or not len(ids):
            return [ADDED] * len(ids), np.full(len(ids), -1, np.int64)
        hashes = _hashes(listing_ids)
        ascending = np.argsort(hashes)  # sorted keys: each search starts where the last ended
        at = np.empty(len(hashes), np.int64)
        at[ascending] = np.searchsorted(self._hashes, hashes[ascending])
        at = np.minimum(at, len(self._hashes) - 1)
        row = self._order[at]
        # the same hash and the same id (of two release ids with one hash, about 3 in 10^8
        # at 10^6 listings, only one is found: the other is embedded again and counted as
        # added, its vector still right)
        found = (self._hashes[at] == hashes) & _true(pc.equal(self._ids.take(row), ids))
        same = found & _true(pc.equal(self._prints.take(row), pa.array(fingerprints, pa.string())))
        statuses = np.where(found, np.where(same, REUSED, CHANGED), ADDED)
        return statuses.tolist(), np.where(same, self._stored[row], -1).astype(np.int64)


def _hashes(ids: list[str]) -> np.ndarray:
    """64-bit hashes of listing ids for lookups within this process (Python's own string
    hash: salted per process, so never stored; each string's is computed once)."""
    return np.fromiter(map(hash, ids), np.int64, len(ids))


def _true(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, null as False."""
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def kept_rows(release_ids: Path, today_ids: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """From the release's and today's ids files (listing id and fingerprint per row): per
    release row, today's row of the same listing with the same fingerprint (the same
    vector under the same model), else -1; and today's rows whose vectors the release
    did not hold. None when either file lacks fingerprints."""
    release, today = (pq.read_table(p) for p in (release_ids, today_ids))
    if any("fingerprint" not in t.column_names for t in (release, today)):
        return None
    release_keys, today_keys = _keys(release), _keys(today)
    kept = pc.index_in(release_keys, value_set=today_keys).fill_null(-1)
    held = pc.is_in(today_keys, value_set=release_keys).to_numpy(zero_copy_only=False)
    return kept.to_numpy().astype(np.int64), np.flatnonzero(~held)


def _keys(table: pa.Table) -> pa.Array:
    fingerprints = pc.fill_null(table["fingerprint"], "")
    return pc.binary_join_element_wise(table["listing_id"], fingerprints, "\x1f")
