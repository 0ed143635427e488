"""Sets of listing ids at catalog scale: 64-bit hashes in numpy arrays, 8 bytes a listing
where a Python set of strings takes about a hundred (10^8 listings: 0.8 GB, not 10 GB)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def id_hashes(ids: Iterable[str] | pa.Array) -> np.ndarray:
    """uint64 hashes of listing ids (64-bit FNV-1a of the UTF-8 bytes, then a splitmix64
    finaliser), computed for all ids of one length at once: 1M ids in a fraction of a
    second, where a hash call per id took seconds."""
    strings = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
    strings = strings.cast(pa.large_string()).fill_null("")
    n = len(strings)
    _, offsets, data = strings.buffers()
    starts = np.frombuffer(offsets, np.int64, n + 1, strings.offset * 8)
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(starts)
    hashes = np.full(n, _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            found = hashes[rows]
            bytes_ = raw[starts[rows][:, None] + np.arange(length)].astype(np.uint64)
            for column in bytes_.T:
                found = (found ^ column) * _FNV_PRIME
            hashes[rows] = found
        hashes ^= hashes >> np.uint64(30)
        hashes *= np.uint64(0xBF58476D1CE4E5B9)
        hashes ^= hashes >> np.uint64(27)
        hashes *= np.uint64(0x94D049BB133111EB)
        hashes ^= hashes >> np.uint64(31)
    return hashes


class IdSet:
    """Listing ids added batch by batch, as hashes. A hash stands for its id: two ids with
    the same hash (about 3 in 10^6 for 10^7 ids) look alike, which callers detect by
    counting (`embed`'s missing listings) where it matters."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._sorted: np.ndarray | None = None

    def add(self, ids: Iterable[str] | pa.Array) -> None:
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

    def contains(self, ids: list[str] | pa.Array) -> np.ndarray:
        """[len(ids)] bool: whether each id is in the set."""
        values = self._all()
        hashes = id_hashes(ids)
        where = np.clip(np.searchsorted(values, hashes), 0, max(0, len(values) - 1))
        return (values[where] == hashes) if len(values) else np.zeros(len(ids), bool)
