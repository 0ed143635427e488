"""Sets of listing ids at catalog scale: 64-bit hashes in numpy arrays, 8 bytes a listing
where a Python set of strings takes about a hundred (10^8 listings: 0.8 GB, not 10 GB)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """uint64 hashes of listing ids (blake2b, 8 bytes)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids),
        dtype=np.uint64,
    )


class IdSet:
    """Listing ids added batch by batch, as hashes. A hash stands for its id: two ids with
    the same hash (about 3 in 10^6 for 10^7 ids) look alike, which callers detect by
    counting (`embed`'s missing listings) where it matters."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._sorted: np.ndarray | None = None

    def add(self, ids: Iterable[str]) -> None:
        self._parts.append(id_hashes(ids))
        self._sorted = None

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts)

    def _all(self) -> np.ndarray:
        if self._sorted is None:
            joined = np.concatenate(self._parts) if self._parts else np.zeros(0, np.uint64)
            joined.sort()  # in place: the set is held once, 8 bytes a listing
            self._parts, self._sorted = [joined], joined
        return self._sorted

    def first_repeated(self) -> int | None:
        """A hash added more than once, or None."""
        values = self._all()
        repeated = values[1:][values[1:] == values[:-1]]
        return int(repeated[0]) if len(repeated) else None

    def contains(self, ids: list[str]) -> np.ndarray:
        """[len(ids)] bool: whether each id is in the set."""
        values = self._all()
        hashes = id_hashes(ids)
        where = np.clip(np.searchsorted(values, hashes), 0, max(0, len(values) - 1))
        return (values[where] == hashes) if len(values) else np.zeros(len(ids), bool)
