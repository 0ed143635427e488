"""Exact top lists that a refresh carries forward instead of searching every listing again.

Exact search of the test queries reads and scores every listing vector: at a million
listings that is most of what a refresh's evaluation costs, although a refresh keeps the
model and changes a few listings. So the evaluation keeps, per query, its `width` best
listings with their scores (`TopLists`), a little deeper than the deepest K it reports,
and a `floor`: every listing scoring above it is in the list. The next refresh, under the
same model, maps each listed listing whose vector it kept to its new row, drops the others
(removed or changed), and scores only the listings whose vectors are new (`refreshed`):
a listing it kept and that is not listed scores at most the floor, so the merged list is
still every listing above the floor, best first. Where removals leave a query fewer than
`depth` listed ones above its floor, its top `depth` is no longer known: `exact_depth`
says so, and the caller searches everything again, which also restores the margin.

Ties order by row, lower first, as `diagnostics.TopK` does for a full search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.core.diagnostics import TopK

BLOCK = 65536  # listing vectors scored at a time


@dataclass(frozen=True)
class TopLists:
    """Per query its best listings, best first: `rows` [Q, W] (-1 past its list) and their
    `scores` [Q, W] (-inf past it); `floor` [Q]: every listing scoring above it is listed
    (-inf when every listing is)."""

    rows: np.ndarray
    scores: np.ndarray
    floor: np.ndarray

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    def exact_depth(self) -> int:
        """How deep every query's list is known to be the exact top: its length, or
        unbounded (every listing listed) where its floor is -inf."""
        if not len(self.rows):
            return np.iinfo(np.int64).max
        lengths = (self.rows >= 0).sum(axis=1)
        lengths[np.isneginf(self.floor)] = np.iinfo(np.int64).max
        return int(lengths.min())

    def top(self, depth: int) -> np.ndarray:
        """The listing rows [Q, depth] of each query's `depth` best."""
        return self.rows[:, :depth]


def full_top(queries: np.ndarray, listings: np.ndarray, width: int) -> TopLists:
    """Each query's `width` best of every listing (unit vectors, dot product)."""
    best = TopK(len(queries), min(width, len(listings)))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    for start in range(0, len(listings), BLOCK):
        block = np.ascontiguousarray(listings[start : start + BLOCK], dtype=np.float32)
        best.add(q @ torch.from_numpy(block).T, start)
    rows, scores = best.result(), best.scores.numpy()
    rows, scores = _padded(rows, scores, width)
    everything = len(listings) <= width
    floor = np.full(len(queries), -np.inf if everything else 0.0, np.float32)
    if not everything:
        floor[:] = scores[:, width - 1]
    return TopLists(rows, scores, floor)


def refreshed(
    carried: TopLists,
    kept: np.ndarray,
    new_rows: np.ndarray,
    new_vectors: np.ndarray,
    queries: np.ndarray,
) -> TopLists:
    """`carried` (lists over an earlier set of listings, under the same model and
    queries) for today's listings: `kept` maps each earlier row to today's row of the same
    vector (-1: removed or changed), `new_rows` are today's rows whose vectors are new and
    `new_vectors` those vectors, in the same order."""
    listed = carried.rows >= 0
    rows = np.where(listed, kept[np.where(listed, carried.rows, 0)], -1)
    scores = np.where(rows >= 0, carried.scores, -np.inf).astype(np.float32)
    rows, scores = _best(rows, scores, carried.width)
    floor = carried.floor.copy()
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    for start in range(0, len(new_rows), BLOCK):
        block = np.ascontiguousarray(new_vectors[start : start + BLOCK], dtype=np.float32)
        found = (q @ torch.from_numpy(block).T).numpy()
        # a new listing at or below the floor may be beaten by an unlisted kept one
        found[found <= floor[:, None]] = -np.inf
        block_rows = np.broadcast_to(new_rows[start : start + BLOCK], found.shape)
        block_rows = np.where(np.isneginf(found), -1, block_rows)
        rows, scores = _best(
            np.concatenate([rows, block_rows], axis=1),
            np.concatenate([scores, found], axis=1),
            carried.width,
            floor,
        )
    return TopLists(rows, scores, floor)


def _best(rows: np.ndarray, scores: np.ndarray, width: int, floor: np.ndarray | None = None):
    """The `width` best (score descending, then row ascending; unlisted last) of each
    query's candidates. A query with more than `width` candidates raises its `floor` (in
    place) to the last one kept: what was cut scores no higher."""
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    if floor is not None and rows.shape[1] > width:
        cut = rows[:, width] >= 0
        floor[cut] = np.maximum(floor[cut], scores[cut, width - 1])
    return _padded(rows[:, :width], scores[:, :width], width)


def _padded(rows: np.ndarray, scores: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` (int64) and `scores` (float32) `width` wide: -1 / -inf past a list's end."""
    out_rows = np.full((len(rows), width), -1, np.int64)
    out_scores = np.full((len(rows), width), -np.inf, np.float32)
    n = min(width, rows.shape[1])
    out_rows[:, :n], out_scores[:, :n] = rows[:, :n], scores[:, :n]
    out_scores[out_rows < 0] = -np.inf
    return out_rows, out_scores
