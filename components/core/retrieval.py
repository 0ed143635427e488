"""Retrieval evaluation: one path for train's validation and the evaluate step.

Two tasks, each a set of queries with the listings relevant to each:
- `query_to_listing`: text queries through the query tower;
- `view_to_listing`: photos held out of their listings, embedded as photos.

Queries are embedded by the model, listings are its fused unit embeddings, and exact
search is the inner product (`diagnostics.scored_top_k`, chunked over listings).

A task without queries (a catalog with one photo per listing has no held-out photos) is
absent: its only metric is `<task>/queries` = 0, and gates on it are skipped.

The frozen encoders alone are the baseline every model must beat (`frozen_metrics`): a
text query's feature against each listing's text-view features, a held-out photo's
feature against the listing's other photos, scored by cosine with the mean of the unit
view features (`<task>/frozen/...`) and with the best single view (`<task>/frozen_max/...`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from components.core.diagnostics import TopK, scored_top_k
from components.core.metrics import (
    bootstrap_mean_ci,
    per_query_recall,
    ranks_from_top_k,
    recall_at_k,
    top_k_metrics,
)
from components.core.model import Views

QUERY_TO_LISTING = "query_to_listing"
VIEW_TO_LISTING = "view_to_listing"
TASKS = (QUERY_TO_LISTING, VIEW_TO_LISTING)
FROZEN = ("frozen", "frozen_max")  # the no-training baselines: mean of the views, best view
BATCH = 1024  # queries per forward pass


@dataclass
class QuerySet:
    """One task's queries: the model's inputs and the relevant listing rows of each."""

    task: str
    features: np.ndarray  # [Q, F] text features, or image features / activations
    relevant: list[set[int]]
    ids: list[str] = field(default_factory=list)  # query ids (text queries)
    rows: list[int] = field(default_factory=list)  # rows of `features` in their table
    languages: list[str | None] = field(default_factory=list)  # per query, when known


def present(sets: list[QuerySet]) -> list[QuerySet]:
    """The tasks that have queries."""
    return [queries for queries in sets if queries.relevant]


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


def evaluate_tasks(
    model,
    sets: list[QuerySet],
    listings: np.ndarray,
    ks: list[int],
    depth: int,
    device: torch.device,
) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Exact retrieval for every task: flat metrics (`<task>/recall@10`, ...), and per
    task with queries the query embeddings and the top-`depth` lists."""
    vectors = {queries.task: embed_queries(model, queries, device) for queries in present(sets)}
    tops = {task: scored_top_k(v, listings, depth) for task, v in vectors.items()}
    return task_metrics(sets, tops, ks), vectors, tops


def task_metrics(
    sets: list[QuerySet], tops: dict[str, np.ndarray], ks: list[int]
) -> dict[str, float]:
    """Flat metrics of every task (`<task>/recall@10`, ..., `<task>/queries`, per language)
    from each present task's exact top lists (`tops`, [Q, depth] listing rows)."""
    metrics: dict[str, float] = {f"{queries.task}/queries": 0 for queries in sets}
    for queries in present(sets):
        top = tops[queries.task]
        found = top_k_metrics(top, queries.relevant, ks) | {"queries": len(queries.relevant)}
        metrics |= {f"{queries.task}/{name}": value for name, value in found.items()}
        metrics |= language_metrics(queries, top, queries.task)
    return metrics


def language_metrics(queries: QuerySet, top: np.ndarray, prefix: str) -> dict[str, float]:
    """Recall@10 and the number of queries per query language (`<prefix>/lang/<xx>/...`),
    when the queries' languages are known."""
    out: dict[str, float] = {}
    for language in sorted({lang for lang in queries.languages if lang}):
        rows = [i for i, lang in enumerate(queries.languages) if lang == language]
        ranks = ranks_from_top_k(top[rows], [queries.relevant[i] for i in rows])
        out[f"{prefix}/lang/{language}/recall@10"] = recall_at_k(ranks, min(10, top.shape[1]))
        out[f"{prefix}/lang/{language}/queries"] = len(rows)
    return out


def frozen_view_scores(queries: torch.Tensor, views: Views) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of each unit query [Q, F] with the mean of each listing's unit view features
    of the same modality, and with its best view: two [Q, B] score matrices."""
    if queries.shape[1] != views.features.shape[2]:
        raise ValueError(
            f"queries of {queries.shape[1]} features against views of {views.features.shape[2]}"
        )
    features = F.normalize(views.features.float(), dim=-1) * views.mask[..., None]
    mean = F.normalize(features.sum(dim=1), dim=-1)
    per_view = torch.einsum("qf,bvf->qbv", queries, features)
    per_view = per_view.masked_fill(~views.mask[None], float("-inf"))
    return queries @ mean.T, per_view.amax(dim=-1)


def frozen_metrics(
    sets: list[QuerySet],
    listings: Iterable[tuple[Views, Views]],
    ks: list[int],
    depth: int,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The frozen encoders' own retrieval for every task with queries: `sets` hold the
    queries' frozen features, `listings` yields (image views, text views) of frozen
    features for consecutive listings, in listing-row order. Returns flat metrics
    (`<task>/frozen/recall@10`, `<task>/frozen_max/...`) and the top lists per key."""
    tasks = present(sets)
    queries = {s.task: F.normalize(torch.from_numpy(s.features).float(), dim=-1) for s in tasks}
    best = {(s.task, b): TopK(len(s.relevant), depth) for s in tasks for b in FROZEN}
    first = 0
    for images, texts in listings:
        for task, vectors in queries.items():
            views = texts if task == QUERY_TO_LISTING else images
            for baseline, scores in zip(FROZEN, frozen_view_scores(vectors, views), strict=True):
                best[task, baseline].add(scores, first)
        first += images.features.shape[0]
    metrics, tops = {}, {}
    for s in tasks:
        for baseline in FROZEN:
            key = f"{s.task}/{baseline}"
            tops[key] = best[s.task, baseline].result()
            found = top_k_metrics(tops[key], s.relevant, ks)
            metrics |= {f"{key}/{name}": value for name, value in found.items()}
            metrics |= language_metrics(s, tops[key], key)
    return metrics, tops


def index_metrics(
    sets: list[QuerySet],
    vectors: dict[str, np.ndarray],
    index,
    exact_tops: dict[str, np.ndarray],
    ks: list[int],
    depth: int,
    latency_queries: int,
    latency_seconds: float = float("inf"),
    sample: int | None = None,
) -> dict[str, float]:
    """Metrics through an ANN `index` (anything with faiss's `search`), its recall@10
    against exact search (`exact_tops`), and the p50/p99 latency of one-query searches
    of the first task's first `latency_queries` queries (tasks without queries skipped),
    stopped once `latency_seconds` of searching is spent (`_latency`). With `sample`, each
    task's index metrics are of that many of its queries, evenly spaced, and the exact
    recall@10 of the same queries is `<task>/index/exact_recall@10` (what the ANN-loss
    gate compares them with)."""
    metrics = {}
    overlaps = []
    for queries in present(sets):
        task, count = queries.task, len(queries.relevant)
        picked = np.arange(count)
        if sample is not None and sample < count:
            picked = np.unique(np.linspace(0, count - 1, sample).round().astype(np.int64))
        relevant = [queries.relevant[i] for i in picked]
        _, found = index.search(vectors[task][picked], depth)
        named = top_k_metrics(found, relevant, ks)
        metrics |= {f"{task}/index/{name}": value for name, value in named.items()}
        if len(picked) < count:
            exact = top_k_metrics(exact_tops[task][picked], relevant, [10])
            metrics[f"{task}/index/exact_recall@10"] = exact["recall@10"]
            metrics[f"{task}/index/queries"] = float(len(picked))
        overlaps += _overlap(found[:, :10], exact_tops[task][picked][:, :10])
    metrics["index/ann_recall@10"] = float(np.mean(overlaps)) if overlaps else 1.0
    if not present(sets):
        return metrics
    first = vectors[present(sets)[0].task][:latency_queries]
    return metrics | _latency(index, first, min(10, depth), latency_seconds)


def _overlap(found: np.ndarray, exact: np.ndarray) -> list[float]:
    return [len(set(f) & set(e)) / max(1, len(e)) for f, e in zip(found, exact, strict=True)]


LATENCY_MIN_QUERIES = 10  # searched whatever the time budget


def _latency(index, vectors: np.ndarray, k: int, seconds: float) -> dict[str, float]:
    """p50 / p99 of one-query searches, in milliseconds, and how many were timed: every
    row of `vectors`, or as many as `seconds` of searching allows (at least
    LATENCY_MIN_QUERIES)."""
    times = []
    for row in vectors:
        start = time.perf_counter()
        index.search(row[None, :], k)
        times.append((time.perf_counter() - start) * 1000)
        if len(times) >= LATENCY_MIN_QUERIES and sum(times) >= seconds * 1000:
            break
    if not times:
        return {}
    return {
        "index/latency_p50_ms": float(np.percentile(times, 50)),
        "index/latency_p99_ms": float(np.percentile(times, 99)),
        "index/latency_queries": float(len(times)),
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
    for queries in present(sets):
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
