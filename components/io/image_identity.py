"""What an image is without opening it, and what reading it found before.

An image's identity is its size and modification time for a local file (one `stat`), its
size and ETag for an S3 object (from a LIST of the catalog's prefix, 1,000 objects a call;
a HEAD for an object outside it). As sync tools do (rsync, DVC, git-annex), an image whose
identity has not moved is taken to hold what it held: validate keeps each image's verdict
and featurize its content key (`ImageRecords`), and trust them while the identity holds,
so a refresh opens only new and changed images. A catalog that rewrites an image keeping
its size and mtime is caught only by `validate.verify_content`, which reads everything (the
retrain's default).

`ReadCounter` counts what a step really read from the catalog: images opened, bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.io import atomic
from components.io.catalog_reader import CatalogRoot, ImageLocation
from components.io.images import ImageRefError
from components.io.s3 import is_missing_key_error, s3_client, split_s3_uri

SCHEMA = pa.schema([("location", pa.string()), ("identity", pa.string()), ("value", pa.string())])
BLOCK = 65536  # references whose identities are looked up at a time
# mean microseconds an `lstat` took over a block past which the inode cache is taken to be
# cold: 1.6 us warm here, 24 us cold, where 8 threads made it 13 us (warm: 2.9 us, slower)
COLD_US = 5.0
THREADS = 8
FORK_AT = 500_000  # references per process past which the lookup is split across processes
PROCESSES = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
FINGERPRINT = b"records.fingerprint"  # parquet metadata: what the values depend on

log = logging.getLogger(__name__)


class Identities:
    """Identities of a catalog's images; thread-safe (validate and featurize ask from
    their worker threads)."""

    def __init__(self, root: CatalogRoot) -> None:
        self.root = root
        self._listed: dict[tuple[str, str], str] | None = None
        self._lock = threading.Lock()
        self._base = None if root.is_s3 else str(Path(root.uri).resolve())

    def of_ref(self, ref: object, resolve: Callable[[str], ImageLocation]) -> str | None:
        """The identity of the image `ref` names, found the cheap way, for an image
        recorded before (its reference resolved inside the catalog then): a plain relative
        path to a regular file under a local catalog takes one `lstat` and no path
        resolution; an S3 reference its LISTed identity. None: not found this way (no such
        file, a symbolic link, a URI, a path with `..`, a reference `resolve` refuses): the
        caller checks it in full, resolving links."""
        if self._base is not None:
            return self.of_refs([ref], resolve)[0]
        if not isinstance(ref, str):
            return None
        try:
            return self.of(resolve(ref))
        except ImageRefError:
            return None

    def of_refs(
        self,
        refs: list[object],
        resolve: Callable[[str], ImageLocation],
        texts: pa.Array | None = None,
    ) -> list[str | None]:
        """`of_ref` of each of `refs`, the local catalog's in tight loops (1M listings
        hold 3.3M images: per-image call and path-join overhead was a third of a refresh's
        validate), split across `PROCESSES` processes past `FORK_AT` references (the loop
        holds the interpreter: threads do not share it out), each going `BLOCK`
        references at a time: one thread while `lstat` answers from the inode cache,
        `THREADS` once a block shows it going to the disk (COLD_US). `texts`: `refs` as an
        Arrow string array, when the caller has one (saves a pass over them)."""
        base = self._base
        if base is None:
            return [self.of_ref(ref, resolve) for ref in refs]
        plain = _plain_all(refs) if texts is None else _plain_texts(texts)
        processes = min(PROCESSES, -(-len(refs) // FORK_AT))
        if processes > 1 and _may_fork():
            return _in_processes(base, refs, plain, processes)
        return _identities(base, refs, plain, 0, len(refs))

    def of(self, location: ImageLocation) -> str | None:
        """`size:mtime_ns` (a local file) or `size:etag` (an S3 object); None when there is
        nothing there (the read that follows says what is wrong)."""
        if location.path is not None:
            try:
                status = os.stat(location.path)
            except OSError:
                return None
            return f"{status.st_size}:{status.st_mtime_ns}" if _regular(status) else None
        listed = self._catalog_objects()
        found = listed.get((location.bucket, location.key))
        if found is not None or self._under_root(location):
            return found
        return _head(location)

    def _catalog_objects(self) -> dict[tuple[str, str], str]:
        """Every object under the catalog's S3 prefix: one paginated LIST, made once."""
        with self._lock:
            if self._listed is None:
                self._listed = _list_prefix(self.root) if self.root.is_s3 else {}
            return self._listed

    def _under_root(self, location: ImageLocation) -> bool:
        if not self.root.is_s3:
            return False
        bucket, prefix = split_s3_uri(self.root.uri)
        prefix = prefix.strip("/")
        return location.bucket == bucket and (not prefix or location.key.startswith(prefix + "/"))


def _plain(ref: object) -> bool:
    """A relative path with no scheme and no `..`: one `lstat` under the root finds it."""
    return isinstance(ref, str) and not (ref.startswith(("/", "\\")) or ":" in ref or ".." in ref)


def _identities(base: str, refs: list[object], plain: list[bool], start: int, end: int):
    """`size:mtime_ns` of refs[start:end], `BLOCK` at a time, on `THREADS` threads from
    the first block whose `lstat`s average over COLD_US."""
    found: list[str | None] = []
    pool = None
    try:
        for first in range(start, end, BLOCK):
            last = min(end, first + BLOCK)
            if pool is None:
                began = time.perf_counter()
                found += _lstat_identities(base, refs, plain, first, last)
                if (time.perf_counter() - began) / (last - first) * 1e6 > COLD_US:
                    pool = ThreadPoolExecutor(THREADS, thread_name_prefix="lstat")
                continue
            step = -(-(last - first) // THREADS)
            bounds = [(lo, min(last, lo + step)) for lo in range(first, last, step)]
            for part in pool.map(lambda b: _lstat_identities(base, refs, plain, *b), bounds):
                found += part
    finally:
        if pool is not None:
            pool.shutdown()
    return found


_JOB: tuple | None = None  # (base, refs, plain) of `_in_processes`, inherited by its forks


def _may_fork() -> bool:
    """Whether this process may start forked workers (a daemonic process may not)."""
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon
    )


def _in_processes(base: str, refs: list[object], plain: list[bool], processes: int):
    """`_identities` of every reference, the first of `processes` slices in this process
    and each other in a forked one (which inherits the references: nothing is sent but
    the answers)."""
    global _JOB
    step = -(-len(refs) // processes)
    bounds = [(lo, min(len(refs), lo + step)) for lo in range(0, len(refs), step)]
    _JOB = (base, refs, plain)
    try:
        with multiprocessing.get_context("fork").Pool(len(bounds) - 1) as pool:
            pending = [pool.apply_async(_slice_of_job, bound) for bound in bounds[1:]]
            found = _identities(base, refs, plain, *bounds[0])
            for part in pending:
                found += part.get()
    finally:
        _JOB = None
    return found


def _slice_of_job(start: int, end: int) -> list[str | None]:
    return _identities(*_JOB, start, end)


def _lstat_identities(
    base: str, refs: list[object], plain: list[bool], start: int, end: int
) -> list[str | None]:
    """`size:mtime_ns` of refs[start:end] under `base` (None: not plain, not there, or
    not a regular file)."""
    found: list[str | None] = []
    lstat, regular = os.lstat, stat.S_ISREG
    for index in range(start, end):
        if not plain[index]:
            found.append(None)
            continue
        try:
            status = lstat(f"{base}/{refs[index]}")
        except OSError:
            found.append(None)
            continue
        regular_file = regular(status.st_mode)  # not a link, say: checked in full
        found.append(f"{status.st_size}:{status.st_mtime_ns}" if regular_file else None)
    return found


def _plain_all(refs: list[object]) -> list[bool]:
    """`_plain` of each of `refs`, in Arrow when they are all strings."""
    if not all(type(ref) is str for ref in refs):
        return [_plain(ref) for ref in refs]
    return _plain_texts(pa.array(refs, pa.string()))


def _plain_texts(strings: pa.Array) -> list[bool]:
    """`_plain` of each of a string array's values (null: not plain)."""
    rooted = pc.or_(pc.starts_with(strings, "/"), pc.starts_with(strings, "\\"))
    odd = pc.or_(pc.match_substring(strings, ":"), pc.match_substring(strings, ".."))
    return pc.fill_null(pc.invert(pc.or_(rooted, odd)), False).to_pylist()


def _regular(status: os.stat_result) -> bool:
    return stat.S_ISREG(status.st_mode)


def _list_prefix(root: CatalogRoot) -> dict[tuple[str, str], str]:
    bucket, prefix = split_s3_uri(root.uri)
    prefix = prefix.strip("/")
    found = {}
    pages = s3_client().get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for item in page.get("Contents", []):
            found[(bucket, item["Key"])] = f"{item['Size']}:{item['ETag'].strip(chr(34))}"
    log.debug("listed %d objects under %s", len(found), root.uri)
    return found


def _head(location: ImageLocation) -> str | None:
    try:
        head = s3_client().head_object(Bucket=location.bucket, Key=location.key)
    except Exception as err:
        if is_missing_key_error(err) or "404" in str(err):
            return None
        raise
    return f"{head['ContentLength']}:{head['ETag'].strip(chr(34))}"


@dataclass
class ImageRecords:
    """What reading each image found, under the identity it had then: a file of (location,
    identity, value) rows, the location being the image's reference as the catalog writes
    it (relative to the catalog's root, or a URI), so a catalog copied with its files'
    times, or a workdir moved, keeps its records. Values recorded under another `fingerprint` (other
    rules, another version of this code) are not used.

    The previous file stays an Arrow table: `lookup_all` matches millions of references
    in one join, `focus` loads the few a run checks one by one (`get`), `keep_others` keeps the
    records of references a run took whole from its previous output. `save` writes what
    this run found, trusted or carried: the images of today's catalog only.

    `trusted=False` (verify_content): nothing recorded is used, every image is read, and
    what it finds is recorded for the next run."""

    path: Path
    fingerprint: str
    trusted: bool = True
    _table: pa.Table | None = None  # the previous run's records, when usable
    _known: dict[str, tuple[str, str]] = field(default_factory=dict)
    _found: dict[str, tuple[str, str]] = field(default_factory=dict)
    _carried: list[pa.Table] = field(default_factory=list)
    _kept: pa.Table | None = None  # `keep_others`: one row per location, none looked up
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.trusted and self.path.is_file():
            self._table = read_record_table(self.path, self.fingerprint)

    def focus(self, refs: list[str]) -> None:
        """Make what was recorded for `refs` available to `get`, `get_ref` and `lookup`."""
        if self._table is None or not refs:
            return
        wanted = pa.array(refs, pa.string())
        hit = self._table.filter(pc.is_in(self._table.column("location"), value_set=wanted))
        self._known.update(_entries(hit))

    def lookup_all(self, refs: list[str], identities: list[str | None]) -> list[str | None]:
        """The value recorded for each reference whose identity is still the recorded one
        (None: not recorded, or moved), in one join; every match is kept for `save`."""
        values: list[str | None] = [None] * len(refs)
        if self._table is None or not refs:
            return values
        current = pa.table(
            {
                "location": pa.array(refs, pa.string()),
                "identity": pa.array(identities, pa.string()),
                "at": pa.array(range(len(refs)), pa.int64()),
            }
        )
        matched = current.join(self._table, keys=["location", "identity"], join_type="inner")
        for at, value in zip(
            matched.column("at").to_pylist(), matched.column("value").to_pylist(), strict=True
        ):
            values[at] = value
        self._carried.append(matched.select(SCHEMA.names))
        return values

    def keep_others(self, looked_up: list[str], catalog: list[str] | pa.Array) -> None:
        """Keep the previous records of every reference but `looked_up` (the images of
        the listings a run worked on; the others' verdicts or views were taken by their
        state) for `save`. Records of images no longer in the `catalog` (the references
        of the run's listings) go once they would be a tenth of the file."""
        if self._table is None or len(looked_up) == len(catalog):
            return  # every reference was looked up: what still holds is kept already
        rest = self._table
        if looked_up:
            gone = pc.is_in(rest.column("location"), value_set=pa.array(looked_up, pa.string()))
            rest = rest.filter(pc.invert(gone))
        if rest.num_rows > len(catalog) * 1.1:
            today = catalog if isinstance(catalog, pa.Array) else pa.array(catalog, pa.string())
            rest = rest.filter(pc.is_in(rest.column("location"), value_set=today))
        self._kept = rest

    def get(self, location: ImageLocation, identity: str | None) -> str | None:
        """The value recorded for `location` if its identity is still `identity` (after
        `focus` on its reference)."""
        return self.get_ref(location.ref, identity)

    def get_ref(self, ref: str, identity: str | None) -> str | None:
        """The value recorded for the reference `ref` if its identity is still `identity`."""
        if identity is None:
            return None
        known = self._known.get(ref)
        return known[1] if known is not None and known[0] == identity else None

    def lookup(self, refs: list[str], identities: list[str | None]) -> list[str | None]:
        """`get_ref` of each reference and identity."""
        known = self._known
        values = []
        for ref, identity in zip(refs, identities, strict=True):
            entry = known.get(ref) if identity is not None else None
            values.append(entry[1] if entry is not None and entry[0] == identity else None)
        return values

    def keep(self, refs: list[str], identities: list[str | None], values: list[str]) -> None:
        """`put_ref` of each, under one hold of the lock."""
        with self._lock:
            for ref, identity, value in zip(refs, identities, values, strict=True):
                if identity is not None:
                    self._found[ref] = (identity, value)

    def put(self, location: ImageLocation, identity: str | None, value: str) -> None:
        """Record `value` (found, or trusted) for the file written next."""
        self.put_ref(location.ref, identity, value)

    def put_ref(self, ref: str, identity: str | None, value: str) -> None:
        if identity is not None:
            with self._lock:
                self._found[ref] = (identity, value)

    def save(self, path: Path | None = None) -> int:
        """Write what this run found, trusted or carried (the images of today's catalog
        only, so the file follows the catalog's size); returns the rows written."""
        # what this run found first: of two rows for one reference, the first is kept
        table = pa.concat_tables([_as_table(self._found), *self._carried])
        return write_record_table(path or self.path, table, self.fingerprint, self._kept)


def _entries(table: pa.Table) -> dict[str, tuple[str, str]]:
    return dict(
        zip(
            table.column("location").to_pylist(),
            zip(
                table.column("identity").to_pylist(),
                table.column("value").to_pylist(),
                strict=True,
            ),
            strict=True,
        )
    )


def _as_table(found: dict[str, tuple[str, str]]) -> pa.Table:
    return pa.table(
        {
            "location": pa.array(list(found), pa.string()),
            "identity": pa.array([entry[0] for entry in found.values()], pa.string()),
            "value": pa.array([entry[1] for entry in found.values()], pa.string()),
        },
        schema=SCHEMA,
    )


def read_record_table(path: Path, fingerprint: str) -> pa.Table | None:
    """The records in `path`, or None when they were recorded under other rules."""
    table = pq.read_table(path)
    recorded = (table.schema.metadata or {}).get(FINGERPRINT, b"").decode()
    if recorded != fingerprint:
        log.info("%s was recorded under other rules: every image is read again", path)
        return None
    return table.select(SCHEMA.names)


def read_records(path: Path, fingerprint: str) -> dict[str, tuple[str, str]]:
    table = read_record_table(path, fingerprint)
    return {} if table is None else _entries(table)


def write_records(path: Path, found: dict[str, tuple[str, str]], fingerprint: str) -> None:
    write_record_table(path, _as_table(found), fingerprint)


def write_record_table(
    path: Path, table: pa.Table, fingerprint: str, kept: pa.Table | None = None
) -> int:
    """Rows sorted by location, one per location (the first given): the same records give
    the same file; then `kept` as it is (records of other locations, one each: a run's
    previous file less what it looked up, not sorted again). Returns the rows written."""
    table = table.cast(SCHEMA).sort_by("location")  # a stable sort
    locations = table.column("location").combine_chunks()
    if len(locations) > 1:
        repeated = pc.equal(locations.slice(1), locations.slice(0, len(locations) - 1))
        first = pa.concat_arrays([pa.array([True]), pc.invert(repeated)])
        table = table.filter(first)
    if kept is not None:
        table = pa.concat_tables([table, kept.cast(SCHEMA)])
    atomic.write_table(table.replace_schema_metadata({FINGERPRINT: fingerprint.encode()}), path)
    return table.num_rows


def fingerprint(**rules) -> str:
    """A short hash of what recorded values depend on."""
    raw = json.dumps(rules, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass
class ReadCounter:
    """What a step read from the catalog's images (thread-safe)."""

    images_opened: int = 0
    bytes_read: int = 0
    images_trusted: int = 0  # taken from the records without being opened
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def opened(self, size: int) -> None:
        with self._lock:
            self.images_opened += 1
            self.bytes_read += size

    def trusted(self, images: int = 1) -> None:
        with self._lock:
            self.images_trusted += images

    def as_dict(self) -> dict[str, int]:
        return {
            "images_opened": self.images_opened,
            "bytes_read": self.bytes_read,
            "images_trusted": self.images_trusted,
        }
