"""Embedding-space diagnostics. Pure functions over arrays.

- modality gap: the Wasserstein-2 distance between the cloud of image-view embeddings and
  the cloud of text-view embeddings (exact OT with uniform weights, POT);
- alignment (mean squared distance of positive pairs) and uniformity (log of the mean
  Gaussian potential over all pairs), after Wang & Isola (2020);
- top-k retrieval under cosine, Euclidean, Manhattan or chi-square scoring, computed chunk
  by chunk so the score matrix is never whole in memory. Chi-square compares
  histograms, so each embedding is first made one: its positive and negative parts side by
  side ([max(x, 0), max(-x, 0)], 2d non-negative values that keep all of x), scaled to
  sum 1; the score is minus sum (p - q)^2 / (p + q).
"""

from __future__ import annotations

import numpy as np
import torch

from components.core.metrics import ranks_from_top_k, recall_at_k

SCORINGS = ("cosine", "euclidean", "manhattan", "chi_square")
CHI_SQUARE_BLOCK = (32, 2048)  # queries x items per chi-square step: [32, 2048, 2d] floats


def modality_gap(image_views: np.ndarray, text_views: np.ndarray) -> float:
    """W2 between two point clouds [n, d] and [m, d] with uniform weights."""
    import ot

    if image_views.ndim != 2 or text_views.ndim != 2 or len(image_views) * len(text_views) == 0:
        raise ValueError(
            f"expected two non-empty [n, d] clouds, got {image_views.shape}, {text_views.shape}"
        )
    a = np.full(len(image_views), 1.0 / len(image_views))
    b = np.full(len(text_views), 1.0 / len(text_views))
    cost = ot.dist(image_views.astype(np.float64), text_views.astype(np.float64))
    return float(np.sqrt(max(ot.emd2(a, b, cost), 0.0)))


def alignment(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared Euclidean distance between matched rows of two [n, d] arrays."""
    if a.shape != b.shape:
        raise ValueError(f"alignment needs matched pairs, got {a.shape} and {b.shape}")
    return float(np.mean(np.sum((a - b) ** 2, axis=1)))


def uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """log E[exp(-t ||x_i - x_j||^2)] over distinct pairs (lower is more uniform)."""
    if len(x) < 2:
        raise ValueError("uniformity needs at least two points")
    squared = np.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1).astype(np.float64)
    pairs = squared[np.triu_indices(len(x), k=1)]
    return float(np.log(np.mean(np.exp(-t * pairs))))


class TopK:
    """The k best items per query over blocks of scored items, ties to the lower index
    (blocks must come in item order). Bounds memory to [Q, k + block]."""

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = torch.full((n_queries, 0), float("-inf"))
        self.items = torch.zeros((n_queries, 0), dtype=torch.long)

    def add(self, scores: torch.Tensor, first: int) -> None:
        """Merge the scores [Q, n] of items first .. first + n - 1.

        Only a block's candidates are sorted: per query, every item scoring at least its
        k-th best in the block (ties included, so the lower index still wins), in item
        order; an item below that is beaten by k others and cannot be in the top k."""
        scores = scores.float().cpu()
        if scores.shape[1] > self.k > 0:
            # the (k+1)-th best below the k-th for every query: no tie at the edge, the k
            # best are the candidates (no pass counting every score against the k-th)
            best = torch.topk(scores, self.k + 1, dim=1)
            edge = best.values[:, self.k - 1 : self.k]
            if bool((best.values[:, self.k :] < edge).all()):
                keep = best.indices[:, : self.k]
            else:
                width = int((scores >= edge).sum(dim=1).max())
                keep = torch.topk(scores, width, dim=1).indices
            keep = keep.sort(dim=1).values
            scores, ids = scores.gather(1, keep), keep + first
        else:
            ids = torch.arange(first, first + scores.shape[1]).expand(scores.shape[0], -1)
        merged_scores = torch.cat([self.scores, scores], dim=1)
        merged_items = torch.cat([self.items, ids], dim=1)
        # stable sort on score keeps the lower index first among equal scores
        order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices
        order = order[:, : self.k]
        self.scores = merged_scores.gather(1, order)
        self.items = merged_items.gather(1, order)

    def result(self) -> np.ndarray:
        """Item indices [Q, min(k, items seen)], best first."""
        return self.items.numpy()


def scored_top_k(
    queries: np.ndarray, items: np.ndarray, k: int, scoring: str = "cosine", chunk: int = 65536
) -> np.ndarray:
    """Indices [Q, k] of each query's k best items under `scoring` (dot product for
    cosine on unit vectors; negative L2 or L1 distance), ties to the lower index."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best = TopK(len(q), min(k, len(items)))
    if scoring == "chi_square":
        chunk = min(chunk, CHI_SQUARE_BLOCK[1])
    for start in range(0, len(items), chunk):
        block = torch.from_numpy(np.ascontiguousarray(items[start : start + chunk], np.float32))
        best.add(_scores(q, block, scoring), start)
    return best.result()


def _scores(q: torch.Tensor, block: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "cosine":
        return q @ block.T
    if scoring == "chi_square":
        return _chi_square_scores(histograms(q), histograms(block))
    return -torch.cdist(q, block, p=2.0 if scoring == "euclidean" else 1.0)


def histograms(x: torch.Tensor) -> torch.Tensor:
    """[n, d] embeddings -> [n, 2d] non-negative rows summing to 1 (see the module doc)."""
    split = torch.cat([x.clamp(min=0), (-x).clamp(min=0)], dim=1)
    return split / split.sum(dim=1, keepdim=True).clamp(min=1e-12)


def _chi_square_scores(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    out = torch.empty(len(p), len(q))
    for start in range(0, len(p), CHI_SQUARE_BLOCK[0]):
        a = p[start : start + CHI_SQUARE_BLOCK[0], None, :]
        out[start : start + len(a)] = -(((a - q[None]) ** 2) / (a + q[None]).clamp(min=1e-12)).sum(
            dim=-1
        )
    return out


def embedding_diagnostics(
    image_views: np.ndarray,
    text_views: np.ndarray,
    primary_pairs: tuple[np.ndarray, np.ndarray],
    listings: np.ndarray,
    sets: list,
    vectors: dict[str, np.ndarray],
    sample_size: int,
) -> dict[str, float]:
    """Modality gap, alignment of (primary photo, title) pairs, uniformity of a seeded
    sample of listings, and recall@10 of each task's first `sample_size` queries (`sets`,
    embedded as `vectors[task]`) under every scoring."""
    rng = np.random.default_rng(0)
    sample = listings[rng.choice(len(listings), min(sample_size, len(listings)), replace=False)]
    out = {
        "diagnostics/modality_gap_w2": modality_gap(image_views, text_views),
        "diagnostics/alignment": alignment(*primary_pairs),
        "diagnostics/uniformity": uniformity(sample),
    }
    for queries in (q for q in sets if q.relevant):
        embedded = vectors[queries.task][:sample_size]
        relevant = queries.relevant[:sample_size]
        for scoring in SCORINGS:
            top = scored_top_k(embedded, listings, min(10, len(listings)), scoring)
            recall = recall_at_k(ranks_from_top_k(top, relevant), 10)
            out[f"diagnostics/{queries.task}/recall@10_{scoring}"] = recall
    return out
