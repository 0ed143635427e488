"""Removals that take effect now: tombstones in the production store.

`python -m components remove LISTING_ID ...` writes one object under `tombstones/` of the
production store: the listing ids, when and why. The search service reads them with
`CURRENT` and keeps those listings out of every answer within `serve.poll_s`; the embed
step leaves them out of the next release (in `missing.parquet`, reason `removed`), and
promote retires the tombstones that release folded in. Writing one needs the store's
write credentials; the service only reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from components.release.storage import MissingObject, Storage

PREFIX = "tombstones/"
MAX_ID_CHARS = 256  # as validate.max_listing_id_chars


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
    ids = list(dict.fromkeys(listing_ids))
    if not ids:
        raise ValueError("remove: no listing id given")
    for listing_id in ids:
        if not listing_id.strip() or len(listing_id) > MAX_ID_CHARS:
            raise ValueError(f"remove: {listing_id[:80]!r} is not a listing id")
    now = datetime.now(UTC)
    body = {"listing_ids": ids, "removed_at": now.isoformat(timespec="seconds"), "reason": reason}
    raw = (json.dumps(body, ensure_ascii=False) + "\n").encode()
    digest = hashlib.sha256(raw).hexdigest()[:12]
    key = f"{PREFIX}{now.strftime('%Y%m%dT%H%M%S%fZ')}-{digest}.json"
    storage.put_bytes(key, raw)
    return Tombstone(key, tuple(ids), body["removed_at"], reason)


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
    """Delete the tombstones a release has folded in."""
    storage.delete([key for key in keys if key.startswith(PREFIX)])
