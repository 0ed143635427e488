"""Removals that take effect now: tombstones in the production store.

`python -m components remove LISTING_ID ...` writes one object under `tombstones/` of the
production store: the listing ids, when and why. The search service reads them with
`CURRENT` and keeps those listings out of every answer within `serve.poll_s`; every embed
(retrain or refresh) leaves them out of its release (in `missing.parquet`, reason
`removed`).

A removal holds until the catalog no longer lists the listing or an operator restores it:
promote retires a tombstone only once none of its listings is in the catalog the release
was built from (clean or quarantined: `settled`), so a sold listing the catalog still lists
never comes back with the next refresh. `python -m components restore LISTING_ID ...`
(`restore`) takes listings out of the tombstones that hold them and records that decision
under `restores/`; the next release embeds them again. Writing either needs the store's
write credentials; the service only reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from components.release.storage import MissingObject, Storage

PREFIX = "tombstones/"
RESTORES = "restores/"  # operators' restore decisions, kept as a record
MAX_ID_CHARS = 256  # as validate.max_listing_id_chars
_STAMP = "%Y%m%dT%H%M%S%fZ"  # keys sort by time


class CorruptTombstone(ValueError):
    """A tombstone object that is not what `write` writes; the message names it."""


@dataclass(frozen=True)
class Tombstone:
    key: str
    listing_ids: tuple[str, ...]
    removed_at: str
    reason: str | None


def write(storage: Storage, listing_ids: list[str], reason: str | None = None) -> Tombstone:
    """One tombstone for `listing_ids` (deduplicated, order kept).

    Raises:
        ValueError: no listing id, or one that is blank or too long (named).
    """
    ids = checked_ids(listing_ids)
    now = datetime.now(UTC)
    body = {"listing_ids": ids, "removed_at": now.isoformat(timespec="seconds"), "reason": reason}
    key = _put(storage, PREFIX, now.strftime(_STAMP), body)
    return Tombstone(key, tuple(ids), body["removed_at"], reason)


@dataclass(frozen=True)
class Restored:
    key: str  # the record under restores/
    listing_ids: tuple[str, ...]  # those that were removed and are no longer
    not_removed: tuple[str, ...]  # those no tombstone held


def restore(storage: Storage, listing_ids: list[str], reason: str | None = None) -> Restored:
    """Take `listing_ids` out of every tombstone that holds them and record the decision
    under `restores/`. Each such tombstone is replaced by one without them (written before
    the old one is deleted, so a reader never sees the other listings unremoved).

    Raises:
        ValueError: no listing id, or one that is blank or too long (named).
    """
    ids = checked_ids(listing_ids)
    wanted = set(ids)
    amended = []
    for tombstone in read_all(storage):
        kept = [i for i in tombstone.listing_ids if i not in wanted]
        if len(kept) == len(tombstone.listing_ids):
            continue
        if kept:  # the same removal, for the listings it still holds; sorts where it did
            stamp = tombstone.key.removeprefix(PREFIX).split("-", 1)[0]
            body = {"listing_ids": kept, "removed_at": tombstone.removed_at}
            _put(storage, PREFIX, stamp, body | {"reason": tombstone.reason})
        storage.delete([tombstone.key])
        amended.append(tombstone)
    was_removed = removed_ids(amended) & wanted
    now = datetime.now(UTC)
    record = {
        "listing_ids": [i for i in ids if i in was_removed],
        "not_removed": [i for i in ids if i not in was_removed],
        "restored_at": now.isoformat(timespec="seconds"),
        "reason": reason,
        "tombstones": [tombstone.key for tombstone in amended],
    }
    key = _put(storage, RESTORES, now.strftime(_STAMP), record)
    return Restored(key, tuple(record["listing_ids"]), tuple(record["not_removed"]))


def settled(tombstones: list[Tombstone], listed: set[str]) -> list[str]:
    """The keys of the tombstones none of whose listings the catalog lists (`listed`: those
    of their listings it still does): the removal has nothing left to hold back."""
    return [t.key for t in tombstones if not any(i in listed for i in t.listing_ids)]


def checked_ids(listing_ids: list[str]) -> list[str]:
    """The ids, each once (the caller names the command in its error)."""
    ids = list(dict.fromkeys(listing_ids))
    if not ids:
        raise ValueError("no listing id given: name them, or pass --from FILE")
    for listing_id in ids:
        if not listing_id.strip() or len(listing_id) > MAX_ID_CHARS:
            raise ValueError(f"{listing_id[:80]!r} is not a listing id")
    return ids


def _put(storage: Storage, prefix: str, stamp: str, body: dict) -> str:
    """Write `body` as `<prefix><stamp>-<its hash>.json`; returns the key."""
    raw = (json.dumps(body, ensure_ascii=False) + "\n").encode()
    key = f"{prefix}{stamp}-{hashlib.sha256(raw).hexdigest()[:12]}.json"
    storage.put_bytes(key, raw)
    return key


def read_all(storage: Storage) -> list[Tombstone]:
    """Every tombstone in the store, oldest first (one deleted meanwhile is skipped).

    Raises:
        CorruptTombstone: naming the object.
    """
    found = []
    for key in storage.list_keys(PREFIX):
        try:
            raw = storage.get_bytes(key)
        except MissingObject:  # retired by a promotion between the listing and the read
            continue
        try:
            body = json.loads(raw)
            found.append(
                Tombstone(key, tuple(body["listing_ids"]), body["removed_at"], body.get("reason"))
            )
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptTombstone(f"{storage.locate(key)} is not a tombstone: {err}") from err
    return found


def removed_ids(tombstones: list[Tombstone]) -> frozenset[str]:
    return frozenset(i for tombstone in tombstones for i in tombstone.listing_ids)


def retire(storage: Storage, keys: list[str]) -> None:
    """Delete tombstones that are settled (`settled`): the catalog no longer lists their
    listings."""
    storage.delete([key for key in keys if key.startswith(PREFIX)])
