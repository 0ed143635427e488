"""Retrieval metrics against a plain, loop-based reference on seeded tiny data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.core.metrics import (
    bootstrap_mean_ci,
    ndcg_at_k,
    ranks_from_top_k,
    ranks_of_relevant,
    recall_at_k,
    top_k_metrics,
)


def _reference_ranking(scores_row: np.ndarray, ties_to_lower: bool = True) -> list[int]:
    """Items by decreasing score, ties to the lower index (or the higher one)."""
    order = 1 if ties_to_lower else -1
    return sorted(range(len(scores_row)), key=lambda i: (-scores_row[i], order * i))


def _reference(
    scores: np.ndarray, relevant: list[set[int]], k: int, ties_to_lower: bool = True
) -> dict:
    recalls, reciprocal, ndcgs = [], [], []
    for row, items in zip(scores, relevant, strict=True):
        ranking = _reference_ranking(row, ties_to_lower)
        top = ranking[: min(k, len(ranking))]
        recalls.append(sum(1 for i in items if i in top) / len(items))
        first = min(ranking.index(i) for i in items) + 1
        reciprocal.append(1 / first)
        dcg = sum(1 / math.log2(r + 2) for r, item in enumerate(ranking[:10]) if item in items)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(len(items), 10)))
        ndcgs.append(dcg / ideal)
    return {"recall": np.mean(recalls), "mrr": np.mean(reciprocal), "ndcg": np.mean(ndcgs)}


def _tiny(seed: int, queries: int = 7, items: int = 12, ties: bool = False):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(queries, items))
    if ties:  # coarse scores: many equal values per row
        scores = np.round(scores)
    relevant = [
        set(rng.choice(items, size=rng.integers(1, 4), replace=False)) for _ in range(queries)
    ]
    return scores, relevant


def test_top_k_metrics_from_the_full_ranking_match_the_reference():
    scores, relevant = _tiny(seed=3)
    ranking = np.array([_reference_ranking(row) for row in scores])

    got = top_k_metrics(ranking, relevant, [1, 5, 10, 50])
    want = {k: _reference(scores, relevant, k) for k in (1, 5, 10, 50)}

    for k in (1, 5, 10, 50):
        assert got[f"recall@{k}"] == pytest.approx(want[k]["recall"])
    assert got["mrr"] == pytest.approx(want[1]["mrr"])
    assert got["ndcg@10"] == pytest.approx(want[1]["ndcg"])


@pytest.mark.parametrize("ties", [False, True])
def test_ranks_from_scores_match_the_reference_with_ties_to_the_lower_index(ties):
    scores, relevant = _tiny(seed=3, ties=ties)

    ranks = ranks_of_relevant(scores, relevant)

    for k in (1, 3, 5):
        assert recall_at_k(ranks, k) == pytest.approx(_reference(scores, relevant, k)["recall"])
    reference = _reference(scores, relevant, 10)
    assert np.mean([1 / r.min() for r in ranks]) == pytest.approx(reference["mrr"])
    assert ndcg_at_k(ranks, 10) == pytest.approx(reference["ndcg"])
    # with ties the order among equal scores decides: the other order gives other values
    other = [_reference(scores, relevant, k, ties_to_lower=False)["recall"] for k in (1, 3, 5)]
    mine = [recall_at_k(ranks, k) for k in (1, 3, 5)]
    assert (other != pytest.approx(mine)) == ties


def test_truncated_lists_count_missing_items_as_not_found():
    top_k = np.array([[4, 2, -1], [0, 1, 2]])
    relevant = [{2, 9}, {7}]

    ranks = ranks_from_top_k(top_k, relevant)
    got = top_k_metrics(top_k, relevant, [1, 2, 3])

    assert ranks[0].tolist() == [2, math.inf] and ranks[1].tolist() == [math.inf]
    assert got["recall@1"] == 0.0
    assert got["recall@2"] == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert got["mrr"] == pytest.approx(0.25)  # (1/2 + 0) / 2
    assert got["ndcg@10"] == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3))) / 2)


def test_perfect_ranking_scores_one():
    top_k = np.array([[0, 1, 2], [1, 0, 2]])
    relevant = [{0}, {1, 0}]

    got = top_k_metrics(top_k, relevant, [1, 2])

    assert got["recall@2"] == 1.0 and got["mrr"] == 1.0 and got["ndcg@10"] == pytest.approx(1.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected top_k"):
        ranks_from_top_k(np.zeros(3), [{0}])
    with pytest.raises(ValueError, match="expected scores"):
        ranks_of_relevant(np.zeros((2, 3)), [{0}])


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    small = rng.normal(0.1, 1.0, size=50)
    large = rng.normal(0.1, 1.0, size=5000)

    low_s, high_s = bootstrap_mean_ci(small, 500, seed=1)
    low_l, high_l = bootstrap_mean_ci(large, 500, seed=1)

    assert low_s < small.mean() < high_s and low_l < large.mean() < high_l
    assert high_l - low_l < (high_s - low_s) / 3
    assert bootstrap_mean_ci(np.zeros(20), 100, seed=0) == (0.0, 0.0)
