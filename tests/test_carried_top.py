"""Top lists carried from a release to a refresh (core/carried_top.py) give the exact top of
a full search, and say when they cannot."""

from __future__ import annotations

import numpy as np
import pytest

from components.core.carried_top import full_top, refreshed
from components.core.diagnostics import scored_top_k


def _unit(rng, n: int, dim: int = 16) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _change(rng, before: np.ndarray, removed: int, changed: int, added: int):
    """Today's listings from `before`: some removed, some changed (a new vector, kept in
    place of the old one's row order), some added at the end; with the release-row ->
    today-row map and today's rows of new vectors, as top_lists.kept_rows gives them."""
    n = len(before)
    order = rng.permutation(n)
    gone, moved = order[:removed], order[removed : removed + changed]
    kept_old = np.setdiff1d(np.arange(n), gone)  # today's rows: the kept, in order
    today = before[kept_old].copy()
    row_today = {int(old): new for new, old in enumerate(kept_old)}
    changed_rows = np.array([row_today[int(old)] for old in moved], np.int64)
    today[changed_rows] = _unit(rng, len(changed_rows), before.shape[1])
    today = np.concatenate([today, _unit(rng, added, before.shape[1])])
    kept = np.full(n, -1, np.int64)
    for old, new in row_today.items():
        kept[old] = new
    kept[moved] = -1
    new_rows = np.concatenate([changed_rows, np.arange(len(kept_old), len(today))])
    return today, kept, np.sort(new_rows)


@pytest.mark.parametrize("rounds", [1, 3])
def test_carried_lists_are_the_exact_top_of_a_full_search_after_changes(rounds):
    rng = np.random.default_rng(rounds)
    listings, queries = _unit(rng, 3000), _unit(rng, 40)
    depth, width = 20, 60
    lists = full_top(queries, listings, width)
    for _ in range(rounds):
        listings, kept, new_rows = _change(rng, listings, removed=60, changed=40, added=50)
        lists = refreshed(lists, kept, new_rows, listings[new_rows], queries)
        assert lists.exact_depth() >= depth
        assert np.array_equal(lists.top(depth), scored_top_k(queries, listings, depth))
        # each whole list is the exact top of its length, and nothing unlisted beats it
        full = scored_top_k(queries, listings, width)
        scores = queries @ listings.T
        for q, listed in enumerate(lists.rows):
            listed = listed[listed >= 0]
            assert np.array_equal(listed, full[q, : len(listed)])
            unlisted = np.setdiff1d(np.arange(len(listings)), listed)
            assert scores[q, unlisted].max() <= lists.floor[q] + 1e-6


def test_removals_that_empty_a_list_below_the_depth_say_so():
    rng = np.random.default_rng(0)
    listings, queries = _unit(rng, 500), _unit(rng, 5)
    lists = full_top(queries, listings, 30)
    # remove query 0's whole list but 10: 10 listed above a floor others may beat
    gone = lists.rows[0][10:]
    kept = np.arange(len(listings), dtype=np.int64)
    kept[gone] = -1
    survivors = np.flatnonzero(kept >= 0)
    kept[survivors] = np.arange(len(survivors))
    after = refreshed(lists, kept, np.zeros(0, np.int64), listings[:0], queries)
    assert after.exact_depth() == 10
    assert np.array_equal(after.top(10)[0], scored_top_k(queries[:1], listings[survivors], 10)[0])


def test_a_catalog_smaller_than_the_lists_is_listed_whole():
    rng = np.random.default_rng(1)
    listings, queries = _unit(rng, 12), _unit(rng, 3)
    lists = full_top(queries, listings, 50)
    assert np.isneginf(lists.floor).all() and lists.exact_depth() > 12
    assert np.array_equal(lists.top(12), scored_top_k(queries, listings, 12))
    today, kept, new_rows = _change(rng, listings, removed=5, changed=2, added=1)
    after = refreshed(lists, kept, new_rows, today[new_rows], queries)
    assert np.array_equal(after.top(len(today)), scored_top_k(queries, today, len(today)))
