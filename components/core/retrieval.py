"""Retrieval evaluation: one path for train's validation and the evaluate step.

Two tasks, each a set of queries with the listings relevant to each:
- `query_to_listing`: text queries through the query tower;
- `view_to_listing`: photos held out of their listings, embedded as photos.

Queries are embedded by the model, listings are its fused unit embeddings, and exact
search is the inner product (`diagnostics.scored_top_k`, chunked over listings).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from components.core.diagnostics import scored_top_k
from components.core.metrics import (
    bootstrap_mean_ci,
    per_query_recall,
    ranks_from_top_k,
    top_k_metrics,
)

QUERY_TO_LISTING = "query_to_listing"
VIEW_TO_LISTING = "view_to_listing"
TASKS = (QUERY_TO_LISTING, VIEW_TO_LISTING)
BATCH = 1024  # queries per forward pass


@dataclass
class QuerySet:
    """One task's queries: the model's inputs and the relevant listing rows of each."""

    task: str
    features: np.ndarray  # [Q, F] text features, or image features / activations
    relevant: list[set[int]]
    ids: list[str] = field(default_factory=list)  # query ids (text queries)
    rows: list[int] = field(default_factory=list)  # rows of `features` in their table


@torch.inference_mode()
def embed_queries(model, queries: QuerySet, device: torch.device) -> np.ndarray:
    """Unit query embeddings [Q, dim] float32: text queries through the query tower,
    photos as photos."""
    if queries.task not in TASKS:
        raise ValueError(f"unknown task {queries.task!r}; tasks are {TASKS}")
    text = queries.task == QUERY_TO_LISTING
    embed = model.embed_text_queries if text else model.embed_image_queries
    out = [np.zeros((0, model.dim), np.float32)]
    for start in range(0, len(queries.features), BATCH):
        batch = torch.from_numpy(queries.features[start : start + BATCH]).float().to(device)
        out.append(torch.nn.functional.normalize(embed(batch).float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def exact_metrics(
    queries: QuerySet, vectors: np.ndarray, listings: np.ndarray, ks: list[int], depth: int
) -> tuple[dict[str, float], np.ndarray]:
    """Recall@K, MRR and nDCG@10 of exact search for one task's embedded queries
    (`vectors`), with the number of queries, and the top-`depth` lists [Q, depth]."""
    top = scored_top_k(vectors, listings, depth)
    found = top_k_metrics(top, queries.relevant, ks)
    return found | {"queries": len(queries.relevant)}, top


def evaluate_tasks(
    model,
    sets: list[QuerySet],
    listings: np.ndarray,
    ks: list[int],
    depth: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Exact retrieval for every task: flat metrics (`<task>/recall@10`, ...), and per
    task the query embeddings and the top-`depth` lists."""
    metrics, vectors, tops = {}, {}, {}
    for queries in sets:
        vectors[queries.task] = embed_queries(model, queries, device)
        found, tops[queries.task] = exact_metrics(
            queries, vectors[queries.task], listings, ks, depth
        )
        metrics |= {f"{queries.task}/{name}": value for name, value in found.items()}
    return metrics, vectors, tops


def index_metrics(
    sets: list[QuerySet],
    vectors: dict[str, np.ndarray],
    index,
    exact_tops: dict[str, np.ndarray],
    ks: list[int],
    depth: int,
    latency_queries: int,
) -> dict[str, float]:
    """Metrics through an ANN `index` (anything with faiss's `search`), its recall@10
    against exact search (`exact_tops`), and the p50/p99 latency of one-query searches
    of the first task's first `latency_queries` queries."""
    metrics = {}
    overlaps = []
    for queries in sets:
        _, found = index.search(vectors[queries.task], depth)
        named = top_k_metrics(found, queries.relevant, ks)
        metrics |= {f"{queries.task}/index/{name}": value for name, value in named.items()}
        overlaps += _overlap(found[:, :10], exact_tops[queries.task][:, :10])
    metrics["index/ann_recall@10"] = float(np.mean(overlaps)) if overlaps else 1.0
    first = vectors[sets[0].task][:latency_queries]
    return metrics | _latency(index, first, min(10, depth))


def _overlap(found: np.ndarray, exact: np.ndarray) -> list[float]:
    return [len(set(f) & set(e)) / max(1, len(e)) for f, e in zip(found, exact, strict=True)]


def _latency(index, vectors: np.ndarray, k: int) -> dict[str, float]:
    """p50 / p99 of one-query searches, in milliseconds."""
    times = []
    for row in vectors:
        start = time.perf_counter()
        index.search(row[None, :], k)
        times.append((time.perf_counter() - start) * 1000)
    if not times:
        return {}
    return {
        "index/latency_p50_ms": float(np.percentile(times, 50)),
        "index/latency_p99_ms": float(np.percentile(times, 99)),
    }


def champion_comparison(
    sets: list[QuerySet],
    challenger_tops: dict[str, np.ndarray],
    champion_tops: dict[str, np.ndarray],
    champion_metrics: dict[str, float],
    resamples: int,
    seed: int,
) -> dict[str, float]:
    """Per task: the champion's recall@10, and the challenger's mean per-query
    difference in recall@10 with a percentile-bootstrap 95% CI (same queries)."""
    flat = {}
    for queries in sets:
        task = queries.task
        mine = per_query_recall(ranks_from_top_k(challenger_tops[task], queries.relevant), 10)
        theirs = per_query_recall(ranks_from_top_k(champion_tops[task], queries.relevant), 10)
        low, high = bootstrap_mean_ci(mine - theirs, resamples, seed=seed)
        key = f"champion/{task}"
        flat[f"{key}/recall@10"] = champion_metrics[f"{task}/recall@10"]
        flat[f"{key}/delta_recall@10"] = float(np.mean(mine - theirs)) if len(mine) else 0.0
        flat[f"{key}/delta_recall@10_ci_low"] = low
        flat[f"{key}/delta_recall@10_ci_high"] = high
    return flat
