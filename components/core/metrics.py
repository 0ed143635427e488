"""Retrieval metrics over a score matrix. Pure numpy; a query may have several relevant items.

`scores[q, i]` is the similarity of query q to item i; `relevant[q]` is the set of item
indices relevant to q. Ties are broken by item index (stable sort), so results are
deterministic.
"""

from __future__ import annotations

import numpy as np


def ranks_of_relevant(scores: np.ndarray, relevant: list[set[int]]) -> list[np.ndarray]:
    """1-based rank of every relevant item of every query."""
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise ValueError(f"expected scores [Q, N] with Q = {len(relevant)}, got {scores.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    position = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    position[rows, order] = np.arange(1, scores.shape[1] + 1)[None, :]
    return [position[q, sorted(items)] for q, items in enumerate(relevant)]


def recall_at_k(ranks: list[np.ndarray], k: int) -> float:
    """Mean over queries of the share of relevant items ranked in the top k."""
    return float(np.mean([np.mean(r <= k) for r in ranks])) if ranks else 0.0


def ranks_from_top_k(top_k: np.ndarray, relevant: list[set[int]]) -> list[np.ndarray]:
    """1-based rank of every relevant item from ranked result lists `top_k[q]` (item
    indices, -1 for an empty slot); a relevant item not in the list gets rank inf."""
    if top_k.ndim != 2 or top_k.shape[0] != len(relevant):
        raise ValueError(f"expected top_k [Q, k] with Q = {len(relevant)}, got {top_k.shape}")
    ranks = []
    for row, items in zip(top_k, relevant, strict=True):
        position = {int(item): rank for rank, item in enumerate(row, start=1) if item >= 0}
        ranks.append(np.array([position.get(item, np.inf) for item in sorted(items)]))
    return ranks


def ndcg_at_k(ranks: list[np.ndarray], k: int) -> float:
    """Mean binary-relevance nDCG@k: DCG of the relevant items' ranks over the ideal DCG
    (all relevant items at the top)."""
    if not ranks:
        return 0.0
    scores = []
    for r in ranks:
        hits = r[r <= k]
        dcg = float(np.sum(1.0 / np.log2(hits + 1)))
        ideal = float(np.sum(1.0 / np.log2(np.arange(1, min(len(r), k) + 1) + 1)))
        scores.append(dcg / ideal if ideal else 0.0)
    return float(np.mean(scores))


def per_query_recall(ranks: list[np.ndarray], k: int) -> np.ndarray:
    """Recall@k of each query (for bootstrap comparisons)."""
    return np.array([np.mean(r <= k) for r in ranks], dtype=np.float64)


def top_k_metrics(top_k: np.ndarray, relevant: list[set[int]], ks: list[int]) -> dict:
    """Recall@K for each K (capped at the list length), MRR and nDCG@10 from result lists.
    MRR counts a query whose relevant items all fall outside the list as 0."""
    ranks = ranks_from_top_k(top_k, relevant)
    depth = top_k.shape[1]
    out = {f"recall@{k}": recall_at_k(ranks, min(k, depth)) for k in ks}
    out["mrr"] = float(np.mean([1.0 / r.min() for r in ranks])) if ranks else 0.0
    out["ndcg@10"] = ndcg_at_k(ranks, min(10, depth))
    return out


def bootstrap_mean_ci(
    values: np.ndarray, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `values` (e.g. per-query
    recall differences between two models on the same queries)."""
    if len(values) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    per_batch = max(1, 10_000_000 // len(values))  # bounds memory for many queries
    means = np.concatenate(
        [
            rng.choice(values, size=(min(per_batch, resamples - done), len(values))).mean(axis=1)
            for done in range(0, resamples, per_batch)
        ]
    )
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
