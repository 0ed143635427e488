"""`evaluate` step: recall on the test split, exact and through the index, diagnostics, the
champion comparison, and the recall gates.

Test queries are the train step's test split: text queries (`query_to_listing`) and the
image views held out of their listings for training and embedding (`view_to_listing`).
Listings are the embed step's embeddings; queries are embedded by the same model.

Writes to `<workdir>/evaluate/`:

    metrics.json        flat keys, e.g. query_to_listing/recall@10, .../index/recall@10,
                        index/ann_recall@10, index/latency_p50_ms, diagnostics/..., champion/...
    gates.json          each gate: metric, threshold, value, passed
    recall_curves.json  recall@K per task for challenger and champion (DVC plots)
    recall_at_k.png     the same as a figure
    manifest.json

and logs the metrics and figure to the model's training run in MLflow. A failed gate
raises StepFailed naming each failed gate, after everything is written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from components import diagnostics, gates, model_io, production
from components.batching import pad_views
from components.config import EvaluateConfig, StepPaths
from components.embed import ListingEmbedder, held_out_views
from components.encoders import pick_device
from components.errors import StepFailed
from components.index import embedding_parts, load_index
from components.manifest import Timer, describe_files, read_manifest, write_manifest
from components.metrics import (
    bootstrap_mean_ci,
    per_query_recall,
    ranks_from_top_k,
    recall_at_k,
    top_k_metrics,
)
from components.storage import open_storage

STEP = "evaluate"
METRICS_FILE = "metrics.json"
GATES_FILE = "gates.json"
CURVES_FILE = "recall_curves.json"
PLOT_FILE = "recall_at_k.png"
TASKS = gates.TASKS
CURRENT = "current"  # evaluate.champion: the model of the production store's CURRENT
BATCH = 1024

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    out_dir: Path
    metrics: dict
    gates: list
    summary: str


@dataclass
class QuerySet:
    """One task's test queries: the model's inputs and the relevant listing rows."""

    task: str
    features: np.ndarray
    relevant: list[set[int]]


def run(config: EvaluateConfig, paths: StepPaths) -> EvaluateResult:
    """Evaluate the embed step's model and index on the test split, then apply the gates."""
    timer = Timer()
    out = paths.step_dir(STEP)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    embed_dir, index_dir = paths.step_dir("embed"), paths.step_dir("index")
    embedded = read_manifest(embed_dir)
    challenger = _embed_model(embedded, paths, device)
    listing_ids = pq.read_table(embed_dir / "listing_ids.parquet").column(0).to_pylist()
    listings = np.concatenate([np.load(part) for part in embedding_parts(embed_dir)])
    embedder = _embedder(challenger, paths, device)
    held_out = held_out_views(paths.step_dir("train") / "splits.parquet")
    sets = test_split_queries(paths, embedder, {lid: i for i, lid in enumerate(listing_ids)})
    depth = min(max(config.ks), len(listing_ids))
    vectors = {s.task: embed_queries(challenger.model, s, device) for s in sets}
    metrics, exact = exact_metrics(sets, vectors, listings, config.ks, depth)
    index, index_ids, index_manifest = load_index(index_dir)
    if index_ids != listing_ids:
        raise ValueError(f"{index_dir}: the index was built from other embeddings; rebuild it")
    metrics |= index_metrics(sets, vectors, index, exact, config, depth)
    metrics |= diagnostic_metrics(
        challenger.model, embedder, held_out, listings, sets, vectors, config
    )
    champion = champion_metrics(
        config, paths, device, sets, held_out, depth, exact, (listing_ids, listings, challenger)
    )
    metrics |= champion.get("flat", {})
    results = gates.check_gates(metrics, champion.get("metrics"), config.gates)
    _write_outputs(out, metrics, results, champion, config.ks, len(listing_ids))
    _log_to_mlflow(paths, challenger.reference, out, metrics)
    report = gates.table(results)
    summary = _summary(metrics, results, champion)
    write_manifest(
        out,
        step=STEP,
        params=config,
        timer=timer,
        inputs={
            "embed": embedded["outputs"],
            "index": index_manifest["outputs"],
            "model": challenger.reference,
            "champion": champion.get("reference"),
        },
        outputs=describe_files(out, [METRICS_FILE, GATES_FILE, CURVES_FILE, PLOT_FILE]),
        counts={s.task: len(s.relevant) for s in sets} | {"listings": len(listing_ids)},
        extra={"summary": summary, "gates_passed": not gates.failed(results)},
    )
    if gates.failed(results):
        raise StepFailed(gates.failure_message(results), report=report)
    log.info("%s", summary)
    return EvaluateResult(out, metrics, [r.as_dict() for r in results], report + "\n" + summary)


def _embed_model(embedded: dict, paths: StepPaths, device) -> model_io.LoadedModel:
    """The model the embed step used (checked by its weights' hash)."""
    source = embedded["model"]["source"]
    loaded = model_io.load_model(source if source.startswith("models:/") else None, paths, device)
    if loaded.reference["sha256"] != embedded["model"]["sha256"]:
        raise ValueError(f"the model at {source} changed since the embed step ran; run embed again")
    return loaded


def _embedder(loaded: model_io.LoadedModel, paths: StepPaths, device) -> ListingEmbedder:
    featurize_dir = paths.step_dir("featurize")
    return ListingEmbedder(loaded, featurize_dir, read_manifest(featurize_dir), paths, device)


def test_split_queries(
    paths: StepPaths, embedder: ListingEmbedder, row_of: dict[str, int]
) -> list[QuerySet]:
    """The test split's text queries and held-out views, with their relevant listings."""
    splits = pq.read_table(paths.step_dir("train") / "splits.parquet").to_pylist()
    test = [s for s in splits if s["split"] == "test"]
    query_ids = {s["id"] for s in test if s["kind"] == "query"}
    queries = pq.read_table(paths.step_dir("featurize") / "queries.parquet").to_pylist()
    grouped: dict[str, dict] = {}
    for row in queries:
        if row["query_id"] in query_ids and row["listing_id"] in row_of:
            entry = grouped.setdefault(row["query_id"], {"key": row["key"], "relevant": set()})
            entry["relevant"].add(row_of[row["listing_id"]])
    ordered = sorted(grouped)
    text = QuerySet(
        "query_to_listing",
        embedder.text_features([grouped[q]["key"] for q in ordered]),
        [grouped[q]["relevant"] for q in ordered],
    )
    views = [(s["listing_id"], s["id"]) for s in test if s["kind"] == "held_out_view"]
    views = [(lid, ref) for lid, ref in views if lid in row_of]
    keys = _image_keys(paths.step_dir("featurize") / "views.parquet", {ref for _, ref in views})
    views = [(lid, ref) for lid, ref in views if ref in keys]
    image = QuerySet(
        "view_to_listing",
        embedder.image_features([keys[ref] for _, ref in views], [ref for _, ref in views]),
        [{row_of[lid]} for lid, _ in views],
    )
    return [text, image]


def _image_keys(views_path: Path, refs: set[str]) -> dict[str, str]:
    """Content key of each image reference in `refs` (read column-wise, filtered)."""
    table = pq.read_table(views_path, columns=["modality", "ref", "key"])
    table = table.filter(pc.equal(table["modality"], "image"))
    table = table.filter(pc.is_in(table["ref"], value_set=pc.cast(list(refs) or [""], "string")))
    return dict(zip(table["ref"].to_pylist(), table["key"].to_pylist(), strict=True))


@torch.inference_mode()
def embed_queries(model, queries: QuerySet, device) -> np.ndarray:
    """Unit query embeddings: text queries through the query tower, photos as photos."""
    text = queries.task == "query_to_listing"
    embed = model.embed_text_queries if text else model.embed_image_queries
    out = [np.zeros((0, model.image.out[-1].out_features), np.float32)]
    for start in range(0, len(queries.features), BATCH):
        batch = torch.from_numpy(queries.features[start : start + BATCH]).float().to(device)
        out.append(torch.nn.functional.normalize(embed(batch).float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def exact_metrics(sets, vectors, listings, ks, depth) -> tuple[dict, dict]:
    """Metrics of exact (brute-force inner product) search, and its top lists per task;
    `vectors` holds each task's query embeddings."""
    metrics, tops = {}, {}
    for queries in sets:
        tops[queries.task] = diagnostics.scored_top_k(vectors[queries.task], listings, depth)
        found = top_k_metrics(tops[queries.task], queries.relevant, ks)
        metrics |= {f"{queries.task}/{name}": value for name, value in found.items()}
        metrics[f"{queries.task}/queries"] = len(queries.relevant)
    return metrics, tops


def index_metrics(sets, vectors, index, exact, config, depth) -> dict:
    """Metrics through the index, its recall@10 against exact search, and its latency."""
    metrics = {}
    overlaps = []
    for queries in sets:
        _, found = index.search(vectors[queries.task], depth)
        named = top_k_metrics(found, queries.relevant, config.ks)
        metrics |= {f"{queries.task}/index/{name}": value for name, value in named.items()}
        overlaps += _overlap(found[:, :10], exact[queries.task][:, :10])
    metrics["index/ann_recall@10"] = float(np.mean(overlaps)) if overlaps else 1.0
    text = vectors[sets[0].task][: config.latency_queries]
    metrics |= _latency(index, text, min(10, depth))
    return metrics


def _overlap(found: np.ndarray, exact: np.ndarray) -> list[float]:
    return [len(set(f) & set(e)) / max(1, len(e)) for f, e in zip(found, exact, strict=True)]


def _latency(index, vectors: np.ndarray, k: int) -> dict:
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


@torch.inference_mode()
def diagnostic_metrics(model, embedder, held_out, listings, sets, vectors, config) -> dict:
    """Modality gap, alignment/uniformity, and recall@10 under three scorings."""
    image_views, text_views, primary_pairs = _view_sample(
        model, embedder, held_out, config.diagnostics_sample
    )
    rng = np.random.default_rng(0)
    sample = listings[
        rng.choice(len(listings), min(config.diagnostics_sample, len(listings)), replace=False)
    ]
    out = {
        "diagnostics/modality_gap_w2": diagnostics.modality_gap(image_views, text_views),
        "diagnostics/alignment": diagnostics.alignment(*primary_pairs),
        "diagnostics/uniformity": diagnostics.uniformity(sample),
    }
    for queries in sets:
        sample = vectors[queries.task][: config.diagnostics_sample]
        relevant = queries.relevant[: config.diagnostics_sample]
        for scoring in diagnostics.SCORINGS:
            top = diagnostics.scored_top_k(sample, listings, min(10, len(listings)), scoring)
            recall = recall_at_k(ranks_from_top_k(top, relevant), 10)
            out[f"diagnostics/{queries.task}/recall@10_{scoring}"] = recall
    return out


def _view_sample(model, embedder, held_out, size: int):
    """Unit embeddings of up to `size` image views and text views (all views of the first
    listings of the catalog) and the (primary photo, title) pairs of those listings."""
    image_views, text_views, photos, titles = [], [], [], []
    for iv, tv in _padded_batches(embedder, held_out):
        image_emb, text_emb, _, _ = model.modality_means(iv, tv)
        image_views.append(image_emb[iv.mask].float().cpu().numpy())
        text_views.append(text_emb[tv.mask].float().cpu().numpy())
        photos.append(image_emb[:, 0].float().cpu().numpy())
        titles.append(text_emb[:, 0].float().cpu().numpy())
        if min(sum(map(len, image_views)), sum(map(len, text_views))) >= size:
            break
    pairs = (_first(photos, size), _first(titles, size))
    return _first(image_views, size), _first(text_views, size), pairs


def _padded_batches(embedder, held_out):
    """(image views, text views) of every listing, BATCH listings at a time."""
    rng = np.random.default_rng(0)  # unused: every view is taken
    for chunk in embedder.chunks(held_out):
        images = embedder.image_features(chunk.image_keys, chunk.image_refs)
        texts = embedder.text_features(chunk.text_keys)
        for start in range(0, len(chunk.listing_ids), BATCH):
            members = slice(start, start + BATCH)
            yield (
                pad_views(images, chunk.images[members], None, rng).to(embedder.device),
                pad_views(texts, chunk.texts[members], None, rng).to(embedder.device),
            )


def _first(parts: list[np.ndarray], size: int) -> np.ndarray:
    return np.concatenate(parts)[:size]


def champion_metrics(config, paths, device, sets, held_out, depth, exact_tops, mine) -> dict:
    """The champion's exact metrics on the same queries, and the challenger's difference
    in recall@10 with a bootstrap CI; {} when there is no champion. `mine` is the
    challenger's (listing ids, listing embeddings, loaded model)."""
    if config.champion is None:
        return {}
    if config.champion == CURRENT:
        champion = _current_champion(paths, device)
        if champion is None:
            return {}
    else:
        try:
            champion = model_io.load_model(config.champion, paths, device)
        except ValueError as err:
            log.info("evaluate: no champion to compare with (%s)", err)
            return {}
    challenger_ids, challenger_listings, challenger = mine
    if champion.reference["sha256"] == challenger.reference["sha256"]:
        ids, listings = challenger_ids, challenger_listings  # the same weights: embed once
    else:
        ids, listings = _embedder(champion, paths, device).embed_all(held_out, BATCH)
    if challenger_ids != ids:
        raise ValueError("the champion embeds another set of listings; cannot compare")
    metrics, flat, curves = {}, {}, {}
    for queries in sets:
        top = diagnostics.scored_top_k(
            embed_queries(champion.model, queries, device), listings, depth
        )
        found = top_k_metrics(top, queries.relevant, config.ks)
        metrics |= {f"{queries.task}/{name}": value for name, value in found.items()}
        curves[queries.task] = found
        mine = per_query_recall(ranks_from_top_k(exact_tops[queries.task], queries.relevant), 10)
        theirs = per_query_recall(ranks_from_top_k(top, queries.relevant), 10)
        low, high = bootstrap_mean_ci(mine - theirs, config.bootstrap, seed=paths.seed)
        key = f"champion/{queries.task}"
        flat[f"{key}/recall@10"] = found["recall@10"]
        flat[f"{key}/delta_recall@10"] = float(np.mean(mine - theirs)) if len(mine) else 0.0
        flat[f"{key}/delta_recall@10_ci_low"] = low
        flat[f"{key}/delta_recall@10_ci_high"] = high
    return {"metrics": metrics, "flat": flat, "curves": curves, "reference": champion.reference}


def _current_champion(paths: StepPaths, device) -> model_io.LoadedModel | None:
    """The model of the production store's CURRENT version; None before the first
    promotion. A CURRENT whose model cannot be loaded is an error, not "no champion"."""
    storage = open_storage(paths.storage, paths.storage_uri)
    pointer = production.read_pointer(storage)
    if pointer is None:
        log.info("evaluate: no champion to compare with (nothing promoted to %s)", storage.uri)
        return None
    uri = f"models:/{pointer.model['name']}/{pointer.model['version']}"
    try:
        loaded = model_io.load_model(uri, paths, device)
    except ValueError as err:
        raise ValueError(
            f"the champion, {storage.locate(production.POINTER)} = {pointer.version}, names "
            f"{uri}, which cannot be loaded: {err}"
        ) from err
    reference = loaded.reference | {"production_version": pointer.version, "store": storage.uri}
    return model_io.LoadedModel(loaded.model, loaded.spec, reference)


def _write_outputs(out, metrics, results, champion, ks, n_listings) -> None:
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (out / GATES_FILE).write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    curves = []  # one row per K: what DVC plots and the figure draw
    for k in ks:
        row = {"k": k}
        for task in TASKS:
            row[f"{task}/challenger"] = metrics[f"{task}/recall@{k}"]
            if champion.get("curves"):
                row[f"{task}/champion"] = champion["curves"][task][f"recall@{k}"]
        curves.append(row)
    (out / CURVES_FILE).write_text(json.dumps(curves, indent=2) + "\n")
    recall_figure(curves, n_listings).savefig(out / PLOT_FILE, dpi=100)


def recall_figure(curves: list[dict], n_listings: int):
    """Recall@K curves per task, challenger against champion (K capped at the catalog)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TASKS), figsize=(10, 4))
    ks = [min(row["k"], n_listings) for row in curves]
    for axis, task in zip(axes, TASKS, strict=True):
        for who, marker in (("challenger", "o"), ("champion", "s")):
            if f"{task}/{who}" in curves[0]:
                values = [row[f"{task}/{who}"] for row in curves]
                axis.plot(ks, values, marker=marker, label=who)
        axis.set(xscale="log", xlabel="K", ylabel="recall@K", title=task, ylim=(0, 1))
        axis.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure


def _log_to_mlflow(paths: StepPaths, reference: dict, out: Path, metrics: dict) -> None:
    """Metrics and figure onto the model's training run (when it has one)."""
    if not reference.get("run_id"):
        log.info("evaluate: the model has no MLflow run; metrics are in %s only", out)
        return
    import mlflow

    from components.tracking import metric_name

    mlflow.set_tracking_uri(paths.mlflow_uri)
    with mlflow.start_run(run_id=reference["run_id"]):
        mlflow.log_metrics({f"test/{metric_name(k)}": float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(out / PLOT_FILE), "plots")
        mlflow.log_artifact(str(out / GATES_FILE))


def _summary(metrics, results, champion) -> str:
    verdict = "all gates passed" if not gates.failed(results) else "GATES FAILED"
    against = f"champion v{champion['reference']['version']}" if champion else "no champion yet"
    return (
        f"evaluate: query->listing recall@10 {metrics['query_to_listing/recall@10']:.3f}, "
        f"view->listing {metrics['view_to_listing/recall@10']:.3f} (index "
        f"{metrics['query_to_listing/index/recall@10']:.3f} / "
        f"{metrics['view_to_listing/index/recall@10']:.3f}, ANN recall@10 "
        f"{metrics['index/ann_recall@10']:.3f}); vs {against}; {verdict}"
    )
