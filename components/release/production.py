"""The production store: versioned, verified index releases and the `CURRENT` pointer.

Layout under the store's root (`storage.uri`):

    store.json                        written once, when the store is created
    objects/sha256/<ab>/<sha256>      every file of every version, stored once by content
                                      (index.faiss, delta.faiss, ids.parquet, embeddings/part-*.npy,
                                      listing_ids.parquet, model.json, metrics.json, ...)
    indices/<version>/pending.json    while a version uploads: the objects it will need
    indices/<version>/manifest.json   written last: name, sha256, size and object of every
                                      file the version holds
    indices/CURRENT                   {"version", "manifest_sha256", ...}; replaced only by
                                      a conditional write

A version stores only what is new: a file whose content an earlier version stored is not
uploaded again (its object is shared), so a refresh uploads its id map, the
embedding parts that changed, and its index delta (the index file it keeps is the
release's: components/io/faiss_index.py). Each manifest still names and checksums every file the
version needs, so a version stays whole and verifiable on its own. Retention deletes an
object only when no retained version (and no upload in flight: `pending.json`) names it.
Versions written before objects were shared (layout 1: their files under
`indices/<version>/`) are read where they are; the next promotion writes the new layout.

A version is `<UTC timestamp to the microsecond>Z-<content hash>`: unique and sortable. A
version without a manifest is incomplete (an upload that died) and is never pointed at.
Readers start from `CURRENT` and check every byte against the manifest, and the manifest
against the pointer, so a reader gets the whole current version or an error naming the
object that is wrong.

A store exists once it is created (`open_store`): the local default store
(`<workdir>/production`, `storage.uri: null`) by its first promotion, a store at an
explicit `storage.uri` by `python -m components create-store`. Every reader and writer
refuses an explicit URI where no store exists, so a mistyped URI is an error, never an
empty store that hides the champion or a second store that promote starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from components.config import StepPaths
from components.contract import (
    INDEX,
    INDEX_DELTA,
    INDEX_IDS,
    MANIFEST,
    RELEASE_MODEL,
    RELEASE_REPORTS,
)
from components.errors import StepFailed
from components.io.faiss_index import IndexIds, live_index, read_ids
from components.io.manifest import sha256_file
from components.release.storage import MissingObject, PointerConflict, Storage, open_storage

STORE_RECORD = "store.json"  # a store's birth certificate, written once by create_store
INDICES = "indices"
POINTER = f"{INDICES}/CURRENT"
OBJECTS = "objects/sha256/"  # content-addressed files, shared by the versions holding them
PENDING = "pending.json"  # an upload in flight: the objects its version will need
LAYOUT = 2  # versions whose files are shared objects (1: files under the version's prefix)
_STAMP = "%Y%m%dT%H%M%S%fZ"
REPORTS = tuple(a.name for a in RELEASE_REPORTS)  # stored with a version, not its content

log = logging.getLogger(__name__)


class CorruptObject(ValueError):
    """A stored object whose size or sha256 is not what its manifest says."""


class NoStore(ValueError):
    """An explicit `storage.uri` where no production store was created."""


class PromotionConflict(StepFailed):
    """`CURRENT` moved while this promotion or rollback ran; it changed nothing."""


@dataclass(frozen=True)
class Pointer:
    """What `CURRENT` says, and the token its conditional replacement needs."""

    version: str
    manifest_sha256: str
    content_sha256: str
    previous: str | None
    model: dict
    updated_at: str
    reason: str
    token: str | None = field(default=None, compare=False)

    def to_bytes(self) -> bytes:
        body = {k: v for k, v in self.__dict__.items() if k != "token"}
        return (json.dumps(body, indent=2) + "\n").encode()


@dataclass(frozen=True)
class VersionInfo:
    version: str
    manifest: dict | None  # None: incomplete

    @property
    def complete(self) -> bool:
        return self.manifest is not None


@dataclass(frozen=True)
class Published:
    version: str
    changed: bool  # False: the content was already current
    previous: str | None
    manifest: dict
    uploaded_bytes: int = 0  # what this publication added to the store


@dataclass(frozen=True)
class CurrentIndex:
    version: str
    index: Any  # faiss.Index
    ids: IndexIds
    manifest: dict
    files: Path  # local copies of the version's files


def open_store(paths: StepPaths, create: bool = False) -> Storage:
    """The production store of `paths` (`storage.uri`, or the local default store).

    The local default store reads as empty until its first promotion creates it
    (`create=True`, promote's call). At an explicit `storage.uri` a store must exist.

    Raises:
        NoStore: `storage.uri` is set and no store was created there; the message says
            how to create one.
    """
    storage = open_storage(paths.storage, paths.storage_uri)
    if is_store(storage):
        return storage
    if paths.storage.uri is not None:
        raise NoStore(
            f"storage.uri {paths.storage.uri!r}: no production store there (no "
            f"{STORE_RECORD}); check the URI, or create a store there once with: python -m "
            f"components create-store --set storage.uri={paths.storage.uri}"
        )
    if create:
        create_store(storage)
    return storage


def is_store(storage: Storage) -> bool:
    """A store was created at `storage` (or holds releases made before `store.json`).
    Reads with GET, so a missing S3 bucket is the server's error, not "no store"."""
    if storage.read_pointer(STORE_RECORD)[0] is not None:
        return True
    return read_pointer(storage) is not None or bool(storage.list_folders(f"{INDICES}/"))


def create_store(storage: Storage) -> bool:
    """Create an empty store at `storage`: `store.json`, written only if absent (a
    conditional write, so two creators cannot both make one). False when a store was
    already there."""
    if is_store(storage):
        return False
    record = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), "layout": 1}
    try:
        storage.write_pointer(STORE_RECORD, (json.dumps(record) + "\n").encode(), None)
    except PointerConflict:
        return False
    log.info("created the production store %s", storage.uri)
    return True


def prefix_of(version: str) -> str:
    return f"{INDICES}/{version}/"


def object_key(sha256: str) -> str:
    return f"{OBJECTS}{sha256[:2]}/{sha256}"


def file_key(version: str, name: str, entry: dict) -> str:
    """Where a file of `version` is stored: its shared object, or (a version written before
    objects were shared) under the version's own prefix."""
    return entry.get("object") or prefix_of(version) + name


def new_version(content_sha256: str, now: datetime | None = None) -> str:
    return f"{(now or datetime.now(UTC)).strftime(_STAMP)}-{content_sha256[:12]}"


def version_time(version: str) -> datetime | None:
    try:
        return datetime.strptime(version.split("-", 1)[0], _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


def content_hash(files: dict[str, dict], model: dict) -> str:
    """sha256 over what a version serves: its files' hashes (not the reports: the
    evaluation's, which change with every evaluation, e.g. latency, and the list of what a
    refresh changed, which depends on the release it built on; nor the model reference's
    bytes, which say where this run loaded the model from) and the model's registered
    identity and weights."""
    digest = hashlib.sha256()
    for name in sorted(set(files) - set(REPORTS) - {RELEASE_MODEL.name}):
        digest.update(f"{name}\0{files[name]['sha256']}\n".encode())
    identity = "\0".join(str(model.get(key)) for key in ("name", "version", "sha256"))
    digest.update(f"model\0{identity}\n".encode())
    return digest.hexdigest()


def read_pointer(storage: Storage) -> Pointer | None:
    raw, token = storage.read_pointer(POINTER)
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        return Pointer(**body, token=token)
    except (ValueError, TypeError) as err:
        raise CorruptObject(f"{storage.locate(POINTER)} is not a valid pointer: {err}") from err


def read_manifest(storage: Storage, version: str, expected_sha256: str | None = None) -> dict:
    """A version's manifest; checked against `expected_sha256` (the pointer's) when given.

    Raises:
        MissingObject: the version has no manifest (incomplete or deleted).
        CorruptObject: the manifest's bytes are not the ones the pointer names.
    """
    key = prefix_of(version) + MANIFEST
    raw = storage.get_bytes(key)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise CorruptObject(
            f"{storage.locate(key)}: sha256 {hashlib.sha256(raw).hexdigest()[:16]}... is not "
            f"{expected_sha256[:16]}... that {POINTER} names; the manifest was changed"
        )
    return json.loads(raw)


def list_versions(storage: Storage) -> list[VersionInfo]:
    """Every version folder in the store, oldest first; incomplete ones have no manifest."""
    found = []
    for version in storage.list_folders(f"{INDICES}/"):
        try:
            found.append(VersionInfo(version, read_manifest(storage, version)))
        except MissingObject:
            found.append(VersionInfo(version, None))
    return found


def verify(
    storage: Storage, version: str, manifest: dict, read_back: set[str] | None = None
) -> None:
    """Check size and sha256 of every file of `version` in the store, reading each back
    (only the objects in `read_back`, when given: those just uploaded; the others are
    checked by size, their content having been read back when they were uploaded).

    Raises:
        CorruptObject: naming the first file that is missing, short or different.
    """
    for name, expected in sorted(manifest["files"].items()):
        key = file_key(version, name, expected)
        where = _named(storage, version, name, key)
        size = storage.size(key)
        if size is None:
            raise CorruptObject(f"{where} is missing")
        if size != expected["bytes"]:
            raise CorruptObject(f"{where}: {size} bytes, the manifest says {expected['bytes']}")
        if read_back is not None and key not in read_back:
            continue
        digest = storage.sha256(key)
        if digest != expected["sha256"]:
            raise CorruptObject(
                f"{where}: sha256 {digest[:16]}... is not the manifest's "
                f"{expected['sha256'][:16]}...; the stored file is corrupted"
            )


def _named(storage: Storage, version: str, name: str, key: str) -> str:
    """A file of a version, for messages: its name, and where it is stored."""
    return f"{name} of version {version} ({storage.locate(key)})"


def publish(
    storage: Storage,
    files: dict[str, Path],
    manifest: dict,
    model: dict,
    progress: Callable[[str], None] = log.info,
    built_on: str | None = None,
) -> Published:
    """Upload the files the store does not hold yet as shared objects, write the new
    version's manifest last, verify what landed, then point `CURRENT` at it with a
    conditional write.

    `manifest` holds the extra fields of the version's manifest (lineage, params, metrics);
    `model` the model reference. The same content as the current version is a no-op.
    `built_on`: the version this one updates (a refresh); it must still be current.

    Raises:
        PromotionConflict: `CURRENT` moved since this call read it (a concurrent
            promotion won), or is not `built_on`; this call's version folder is removed (or
            never made) and nothing it did is visible (objects it uploaded go with the next
            retention that finds no version naming them).
        Any storage error: `CURRENT` is unchanged and the version folder is removed, as
            above.
    """
    current = read_pointer(storage)  # read first: a promotion that lands meanwhile wins
    described = {
        name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in files.items()
    }
    content = content_hash(described, model)
    if current is not None and current.content_sha256 == content:
        existing = read_manifest(storage, current.version, current.manifest_sha256)
        return Published(current.version, False, current.previous, existing)
    if built_on is not None and (current is None or current.version != built_on):
        raise PromotionConflict(
            f"{storage.locate(POINTER)} names {current.version if current else None}, not "
            f"{built_on}, the release this one updates (another release was promoted or "
            "rolled back to since): nothing was uploaded. Run the refresh again to build on "
            "the current release."
        )
    version = new_version(content)
    prefix = prefix_of(version)
    for entry in described.values():
        entry["object"] = object_key(entry["sha256"])
    needed = sorted({entry["object"] for entry in described.values()})
    try:
        # named before anything is looked up or uploaded: retention keeps these objects
        storage.put_bytes(prefix + PENDING, (json.dumps(needed) + "\n").encode())
        fresh = {
            name: path
            for name, path in files.items()
            if storage.size(described[name]["object"]) != described[name]["bytes"]
        }
        full = {
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "content_sha256": content,
            "layout": LAYOUT,
            "files": described,
            "model": model,
            "previous": current.version if current else None,
            "added_bytes": sum(described[name]["bytes"] for name in fresh),
            **manifest,
        }
        raw = (json.dumps(full, indent=2, ensure_ascii=False) + "\n").encode()
        pointer = _pointer_to(full, raw, current, "promote")
        for done, (name, path) in enumerate(sorted(fresh.items()), start=1):
            storage.put_file(described[name]["object"], path)
            progress(f"uploaded {done}/{len(fresh)} {name} ({path.stat().st_size:,} bytes)")
        storage.put_bytes(prefix + MANIFEST, raw)
        read_manifest(storage, version, pointer.manifest_sha256)
        storage.delete([prefix + PENDING])  # the manifest names the objects now
        verify(storage, version, full, {described[name]["object"] for name in fresh})
        progress(
            f"verified {len(files)} files of {version} ({len(fresh)} uploaded and read back, "
            f"{len(files) - len(fresh)} shared with earlier versions)"
        )
        _swap(storage, pointer, current)
    except BaseException as err:
        if _points_at(storage, version):  # the pointer write landed despite the error
            return Published(version, True, pointer.previous, full, full["added_bytes"])
        # its objects stay until retention finds no version naming them: another upload
        # may already share one
        removed = _remove_quietly(storage, prefix)
        if isinstance(err, PointerConflict):
            now = read_pointer(storage)
            raise PromotionConflict(
                f"{storage.locate(POINTER)} moved from {pointer.previous} to "
                f"{now.version if now else None} while this promotion ran (a concurrent "
                f"promotion won); {version} was not made current and its {removed} "
                "objects were removed. Run promote again to compare with the new champion."
            ) from err
        raise
    return Published(version, True, pointer.previous, full, full["added_bytes"])


def _pointer_to(manifest: dict, raw: bytes, current: Pointer | None, reason: str) -> Pointer:
    """The pointer that makes the version of `manifest` (whose bytes are `raw`) current."""
    return Pointer(
        version=manifest["version"],
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        content_sha256=manifest["content_sha256"],
        previous=current.version if current else None,
        model={k: manifest["model"].get(k) for k in ("name", "version", "run_id")},
        updated_at=datetime.now(UTC).isoformat(timespec="seconds"),
        reason=reason,
    )


def _swap(storage: Storage, pointer: Pointer, current: Pointer | None) -> None:
    storage.write_pointer(POINTER, pointer.to_bytes(), current.token if current else None)


def _points_at(storage: Storage, version: str) -> bool:
    try:
        now = read_pointer(storage)
    except Exception:  # the store is unreachable: assume it does not
        return False
    return now is not None and now.version == version


def _remove_quietly(storage: Storage, prefix: str) -> int:
    try:
        return storage.delete_prefix(prefix)
    except Exception as err:  # the original error matters more; retention cleans up later
        log.warning("could not remove the partial upload %s: %s", storage.locate(prefix), err)
        return 0


def rollback(storage: Storage, to: str | None = None) -> tuple[Pointer, Pointer]:
    """Point `CURRENT` at `to` (default: the newest complete version older than the
    current one) after verifying its files; returns (old pointer, new pointer).

    Raises:
        ValueError: no current version, no older version, or `to` is unknown/incomplete.
        CorruptObject: the target's files do not match its manifest.
        PromotionConflict: `CURRENT` moved meanwhile.
    """
    current = read_pointer(storage)
    if current is None:
        raise ValueError(f"{storage.locate(POINTER)} does not exist: nothing was promoted yet")
    complete = [v for v in list_versions(storage) if v.complete]
    names = [v.version for v in complete]
    if to is None:
        older = [v for v in names if v < current.version]
        if not older:
            raise ValueError(f"no complete version older than {current.version} to roll back to")
        to = older[-1]
    if to not in names:
        raise ValueError(
            f"version {to!r} is not a complete version in {storage.uri}; "
            f"versions: {', '.join(names) or 'none'}"
        )
    if to == current.version:
        raise ValueError(f"{to} is already current")
    raw = storage.get_bytes(prefix_of(to) + MANIFEST)
    target = json.loads(raw)
    verify(storage, to, target)
    pointer = _pointer_to(target, raw, current, "rollback")
    try:
        _swap(storage, pointer, current)
    except PointerConflict as err:
        raise PromotionConflict(
            f"{storage.locate(POINTER)} moved while rolling back; nothing changed"
        ) from err
    return current, pointer


def apply_retention(
    storage: Storage, keep: int, abandoned_after: timedelta, now: datetime | None = None
) -> list[str]:
    """Delete complete versions beyond the newest `keep` (never the current one, the one
    before it, the one it replaced, or the release their model was trained on, which a
    refresh measures staleness against) and incomplete ones older than `abandoned_after`.
    Returns the deleted versions."""
    now = now or datetime.now(UTC)
    current = read_pointer(storage)
    versions = list_versions(storage)
    complete = [v.version for v in versions if v.complete]
    protected = set(complete[-keep:])
    if current is not None:
        protected |= {current.version, current.previous}
        older = [v for v in complete if v < current.version]
        protected |= set(older[-1:])
        by_version = {v.version: v.manifest for v in versions if v.complete}
        for kept in (current.version, current.previous, *older[-1:]):
            trained_on = (by_version.get(kept) or {}).get("trained_on")
            if trained_on:
                protected.add(trained_on)
    doomed = [v for v in complete if v not in protected]
    for info in versions:
        started = version_time(info.version)
        stale = started is None or now - started > abandoned_after
        if not info.complete and stale and (current is None or info.version != current.version):
            doomed.append(info.version)
    for version in doomed:
        storage.delete_prefix(prefix_of(version))
        log.info("retention: deleted %s", storage.locate(prefix_of(version)))
    _collect_objects(storage)
    return sorted(doomed)


def _collect_objects(storage: Storage) -> int:
    """Delete the shared objects no version names: neither a complete version's manifest
    nor an upload in flight (`pending.json`). Objects are listed before the versions, so
    one an upload starts to share meanwhile is named by then (or, deleted in a narrower
    race, fails that upload's verification: it never becomes current)."""
    stored = storage.list_keys(OBJECTS)
    named: set[str] = set()
    for info in list_versions(storage):
        if info.complete:
            named.update(
                file_key(info.version, name, entry)
                for name, entry in info.manifest["files"].items()
            )
            continue
        try:
            named.update(json.loads(storage.get_bytes(prefix_of(info.version) + PENDING)))
        except MissingObject:  # an upload from before pending.json, or finished meanwhile
            continue
    unnamed = [key for key in stored if key not in named]
    storage.delete(unnamed)
    if unnamed:
        log.info("retention: deleted %d objects no retained version names", len(unnamed))
    return len(unnamed)


def load_current_index(storage: Storage, cache_dir: Path | None = None) -> CurrentIndex:
    """The current version's FAISS index, id map and manifest, every byte verified.

    Files are downloaded into `cache_dir/<version>/` (a temporary folder when None); files
    already there with the right sha256 are not downloaded again.

    Raises:
        ValueError: nothing was promoted yet.
        CorruptObject: the manifest or a file does not match (named).
    """
    current = read_pointer(storage)
    if current is None:
        raise ValueError(f"{storage.locate(POINTER)} does not exist: nothing was promoted yet")
    manifest = read_manifest(storage, current.version, current.manifest_sha256)
    local = Path(cache_dir or tempfile.mkdtemp(prefix="listing-index-")) / current.version
    # a version published before deltas has none
    delta = INDEX_DELTA.name if INDEX_DELTA.name in manifest["files"] else None
    names = (INDEX.name, INDEX_IDS.name, *([delta] if delta else []))
    download(storage, current.version, manifest, names, local)
    ids = read_ids(local / INDEX_IDS.name)
    index = live_index(local / INDEX.name, local / delta if delta else None, ids, mapped=False)
    if index.ntotal != len(ids):
        raise CorruptObject(f"version {current.version}: {index.ntotal} vectors but {len(ids)} ids")
    return CurrentIndex(current.version, index, ids, manifest, local)


def download(
    storage: Storage,
    version: str,
    manifest: dict,
    names: Iterable[str],
    local: Path,
    local_copies: Callable[[str], Path | None] = lambda name: None,
) -> None:
    """Copies of the named files of `version` in `local`, each checked against the
    manifest's sha256; one already there with the right sha256 is not downloaded again,
    nor one another version's folder beside `local` holds, nor one `local_copies(name)`
    names with that sha256 (the workdir's own output the version was published from):
    those are copied from there.

    Raises:
        CorruptObject: a stored file is not what the manifest says (named).
    """
    for name in names:
        expected = manifest["files"][name]
        path = local / name
        if path.is_file() and sha256_file(path) == expected["sha256"]:
            continue
        others = [local_copies(name), *local.parent.glob(f"*/{name}")]
        if _copy_same(others, expected, path):
            continue
        key = file_key(version, name, expected)
        storage.get_file(key, path)
        digest = sha256_file(path)
        if digest != expected["sha256"]:
            path.unlink()
            raise CorruptObject(
                f"{_named(storage, version, name, key)}: sha256 {digest[:16]}... is not "
                f"the manifest's {expected['sha256'][:16]}...; the stored file is corrupted"
            )


def _copy_same(others: list[Path | None], expected: dict, path: Path) -> bool:
    """Copy to `path` the first of `others` with the expected size and sha256 (the file
    the version was published from, its sha256 most often known to the hash cache; another
    version's copy in the local cache: a version shares most files with the one before it)."""
    for other in others:
        if other is None or other == path or not other.is_file():
            continue
        if other.stat().st_size != expected["bytes"]:
            continue
        if sha256_file(other) == expected["sha256"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(other, path)
            return True
    return False


def listing_count(manifest: dict) -> int | None:
    """Listings a version serves: the vectors of its index."""
    return manifest.get("index", {}).get("vectors")


def versions_table(storage: Storage, metric_keys: tuple[str, ...]) -> str:
    """One line per version, oldest first, numbered: current marker, kind, the version a
    refresh was built on (by its number; its name when retention deleted it) and what it
    changed there, model version, listings, listings held out by a removal, the bytes it
    added to the store, metrics, a refresh's staleness verdict (the reasons under the
    table for the current version) and why its run ran."""
    current = read_pointer(storage)
    metric_names = [k.replace("/recall@10", " R@10") for k in metric_keys]
    header = (
        *("", "#", "version", "kind", "built on", "changes", "model", "listings"),
        *("held out", "added", *metric_names, "stale", "trigger"),
    )
    rows = [header]
    reasons: list[str] = []
    found = list_versions(storage)
    number = {info.version: f"#{n}" for n, info in enumerate(found, start=1)}
    for info in found:
        mark = "*" if current and info.version == current.version else ""
        if not info.complete:
            rows.append((mark, number[info.version], info.version, "", "", "", "(incomplete)"))
            continue
        manifest = info.manifest
        staleness = manifest.get("staleness") or {}
        if mark and staleness.get("stale"):
            reasons = staleness.get("reasons", [])
        metrics = manifest.get("metrics", {})
        model = manifest.get("model", {})
        count = listing_count(manifest)
        built_on = manifest.get("built_on")
        rows.append(
            (
                mark,
                number[info.version],
                info.version,
                manifest.get("kind", "retrain"),
                "-" if built_on is None else number.get(built_on, built_on),
                _changes(manifest),
                f"{model.get('name')}/{model.get('version')}",
                "-" if count is None else f"{count:,}",
                _held_out(manifest),
                _added(manifest),
                *[f"{metrics[k]:.3f}" if k in metrics else "-" for k in metric_keys],
                "-" if not staleness else "yes" if staleness.get("stale") else "no",
                _trigger(manifest),
            )
        )
    rows = [row + ("",) * (len(header) - len(row)) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    where = f"store: {storage.uri}"
    if current is None:
        return "\n".join([where, "no version is current (nothing promoted yet)", *lines])
    stale = [f"the current model is stale: {reason}" for reason in reasons]
    return "\n".join(
        [where, *lines, f"* current ({current.reason} at {current.updated_at})", *stale]
    )


def _changes(manifest: dict) -> str:
    """A refresh's listings added, changed and removed since the version it was built on
    (`+a ~c -r`; the ids are in its changes.parquet); "-" for a retrain."""
    delta = manifest.get("delta")
    if not delta:
        return "-"
    return f"+{delta.get('added', 0):,} ~{delta.get('changed', 0):,} -{delta.get('removed', 0):,}"


def _trigger(manifest: dict, width: int = 48) -> str:
    """Why the version's run ran, cut to `width` ("-": a version from before releases
    recorded it); the manifest holds the whole text."""
    trigger = " ".join(str(manifest.get("trigger") or "-").split())
    return trigger if len(trigger) <= width else trigger[: width - 3] + "..."


def _held_out(manifest: dict) -> str:
    """Listings the catalog listed that a removal kept out of the version ("-": a version
    from before releases counted them)."""
    count = manifest.get("listings", {}).get("tombstoned")
    return "-" if count is None else f"{count:,}"


def _added(manifest: dict) -> str:
    """What the version added to the store ("-": one from before objects were shared,
    which stored every file of its own)."""
    added = manifest.get("added_bytes")
    return "-" if added is None else f"{added / 2**20:.1f} MiB"
