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


def mrr(ranks: list[np.ndarray]) -> float:
    """Mean reciprocal rank of each query's best-ranked relevant item."""
    return float(np.mean([1.0 / r.min() for r in ranks])) if ranks else 0.0


def retrieval_metrics(scores: np.ndarray, relevant: list[set[int]], ks: list[int]) -> dict:
    """Recall@K for each K (capped at the number of items) and MRR."""
    ranks = ranks_of_relevant(scores, relevant)
    n_items = scores.shape[1]
    out = {f"recall@{k}": recall_at_k(ranks, min(k, n_items)) for k in ks}
    out["mrr"] = mrr(ranks)
    return out
