"""Retrieval evaluation against plain full-matrix references on seeded tiny inputs: the
frozen baselines (mean and best view), per-language recall, and absent tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.batching import ListingViews, pad_views
from components.core.metrics import ranks_of_relevant, recall_at_k
from components.core.model import KIND, ListingModel
from components.core.retrieval import (
    QUERY_TO_LISTING,
    VIEW_TO_LISTING,
    QuerySet,
    evaluate_tasks,
    frozen_metrics,
    index_metrics,
    language_metrics,
)

RNG = np.random.default_rng(7)


def _listings(n: int, dim: int) -> tuple[np.ndarray, list[ListingViews]]:
    """n listings with 1..4 views each, as rows into one feature table."""
    views, table, row = [], [], 0
    for _ in range(n):
        count = int(RNG.integers(1, 5))
        table.append(RNG.normal(size=(count, dim)))
        views.append(ListingViews(tuple(range(row, row + count)), (KIND["title"],) * count))
        row += count
    return np.concatenate(table).astype(np.float32), views


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_frozen_baselines_equal_a_full_matrix_reference():
    text_table, texts = _listings(30, 8)
    image_table, images = _listings(30, 5)
    queries = QuerySet(
        QUERY_TO_LISTING,
        RNG.normal(size=(12, 8)).astype(np.float32),
        [{int(i)} for i in RNG.integers(0, 30, size=12)],
    )
    photos = QuerySet(
        VIEW_TO_LISTING, RNG.normal(size=(9, 5)).astype(np.float32), [{i} for i in range(9)]
    )
    rng = np.random.default_rng(0)
    batches = [
        (
            pad_views(image_table, images[s : s + 7], None, rng),
            pad_views(text_table, texts[s : s + 7], None, rng),
        )
        for s in range(0, 30, 7)
    ]

    metrics, _ = frozen_metrics([queries, photos], batches, [1, 10], depth=30)

    for queryset, table, views in ((queries, text_table, texts), (photos, image_table, images)):
        q = _unit(queryset.features)
        unit = _unit(table)
        mean = _unit(np.stack([unit[list(v.rows)].mean(axis=0) for v in views]))
        best = np.stack([(q @ unit[list(v.rows)].T).max(axis=1) for v in views], axis=1)
        for name, scores in (("frozen", q @ mean.T), ("frozen_max", best)):
            ranks = ranks_of_relevant(scores, queryset.relevant)
            expected = recall_at_k(ranks, 10)
            assert metrics[f"{queryset.task}/{name}/recall@10"] == pytest.approx(expected)


def test_recall_per_language_is_recall_on_that_language_s_queries():
    queries = QuerySet(
        QUERY_TO_LISTING,
        np.zeros((4, 2), np.float32),
        [{0}, {1}, {2}, {3}],
        languages=["en", "es", "es", None],
    )
    top = np.array([[0, 9], [9, 8], [2, 9], [3, 9]])  # en hit, es one of two, unknown hit

    found = language_metrics(queries, top, "query_to_listing")

    assert found == {
        "query_to_listing/lang/en/recall@10": 1.0,
        "query_to_listing/lang/en/queries": 1,
        "query_to_listing/lang/es/recall@10": 0.5,
        "query_to_listing/lang/es/queries": 2,
    }


def test_a_task_without_queries_is_absent_not_zero():
    torch.manual_seed(0)
    model = ListingModel(image_dim=5, text_dim=8, dim=4, hidden=8).eval()
    listings = _unit(RNG.normal(size=(6, 4))).astype(np.float32)
    sets = [
        QuerySet(QUERY_TO_LISTING, RNG.normal(size=(3, 8)).astype(np.float32), [{0}, {1}, {2}]),
        QuerySet(VIEW_TO_LISTING, np.zeros((0, 5), np.float32), []),
    ]

    metrics, vectors, tops = evaluate_tasks(model, sets, listings, [1, 10], 6, torch.device("cpu"))

    assert metrics["view_to_listing/queries"] == 0
    assert not [
        k for k in metrics if k.startswith("view_to_listing/") and k != "view_to_listing/queries"
    ]
    assert set(vectors) == set(tops) == {QUERY_TO_LISTING}
    assert metrics["query_to_listing/queries"] == 3


@pytest.mark.parametrize(("seconds", "timed"), [(float("inf"), 200), (1e-9, 10)])
def test_the_latency_measurement_stops_at_its_time_budget(seconds, timed):
    """An exhaustive index over millions of listings takes a third of a second a query:
    500 of them would be most of a refresh's evaluate. The budget stops it (10 at least)."""
    import faiss

    listings = RNG.standard_normal((300, 8)).astype(np.float32)
    queries = RNG.standard_normal((200, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(listings)
    _, exact = index.search(queries, 10)
    sets = [QuerySet(QUERY_TO_LISTING, queries, [{0}] * len(queries))]
    vectors, tops = {QUERY_TO_LISTING: queries}, {QUERY_TO_LISTING: exact}
    metrics = index_metrics(sets, vectors, index, tops, [10], 10, 500, seconds)
    assert metrics["index/latency_queries"] == timed
    assert metrics["index/ann_recall@10"] == 1.0


def test_the_ann_check_on_a_sample_compares_the_index_with_exact_on_those_queries():
    """A refresh searches a fixed sample of the test queries through the index (a Flat
    index scans every listing per query); its exact recall is of the same queries."""
    import faiss

    listings = RNG.standard_normal((300, 8)).astype(np.float32)
    queries = RNG.standard_normal((40, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(listings)
    _, exact = index.search(queries, 10)
    relevant = [{int(exact[i, 0])} if i % 2 else {-5} for i in range(40)]  # odd ones found
    sets = [QuerySet(QUERY_TO_LISTING, queries, relevant)]
    vectors, tops = {QUERY_TO_LISTING: queries}, {QUERY_TO_LISTING: exact}

    every = index_metrics(sets, vectors, index, tops, [10], 10, 1)
    sampled = index_metrics(sets, vectors, index, tops, [10], 10, 1, sample=5)

    assert every["query_to_listing/index/recall@10"] == 0.5
    assert "query_to_listing/index/exact_recall@10" not in every
    # queries 0, 10, 20, 29, 39: two of the five found
    assert sampled["query_to_listing/index/queries"] == 5
    assert sampled["query_to_listing/index/recall@10"] == pytest.approx(0.4)
    assert sampled["query_to_listing/index/exact_recall@10"] == pytest.approx(0.4)
    assert sampled["index/ann_recall@10"] == 1.0
