"""`evaluate` step: recall on the test split, exact and through the index, diagnostics, the
champion comparison, and the recall gates.

Test queries are the train step's test split: text queries (`query_to_listing`) and the
image views held out of their listings for training and embedding (`view_to_listing`).
Listings are the embed step's embeddings; queries are embedded by the same model.

Writes to `<workdir>/evaluate/` what the model and the data decide, the same on any
machine (DVC tracks these):

    metrics.json        headline: recall@10 per task; ANN recall@10
    details.json        the rest: recall@K, MRR, nDCG, per query language, the frozen encoders
                        (.../frozen/..., .../frozen_max/...), through the index
                        (.../index/...), diagnostics/...
    recall_curves.json  recall@K per task, the model's and the frozen encoders' (DVC plots)
    manifest.json

and what depends on this machine (the champion in its production store, the clock):

    champion.json       the champion's reference, metrics and the difference with a CI
    gates.json          each gate: metric, threshold, value, passed
    recall_at_k.png     the recall curves, the champion's included, as a figure
    exact_top.npz       per test query its best listings: the next refresh's exact search
                        starts from them (core/carried_top.py)
    profile_sample.npz  the profile's listings and id-hash threshold: the next refresh's
                        profile starts from them (io/catalog_profile.py)
    run.json            timings, index latency (index/latency_p50_ms, ...), the summary

It logs every metric and the figure to an evaluation run nested in the model's training run
in MLflow. A failed gate raises StepFailed naming each failed gate, after everything is
written. A refresh that changed nothing the release serves takes the release's evaluation
(`_as_recorded`: its metrics and MLflow run) and checks today's gates on it; one that did
carries its release's exact top lists and profile forward, reading only what changed
(docs/pipeline.md, "What a refresh carries").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from components.config import EvaluateConfig, StepPaths
from components.contract import (
    CHAMPION,
    CURVES,
    DETAILS,
    EMBED_SPLITS,
    EMBEDDED_IDS,
    EMBEDDINGS,
    EVALUATE_BASE,
    EVALUATE_BUILT_ON,
    EXACT_TOP,
    GATES,
    METRICS,
    PROFILE,
    PROFILE_SAMPLE,
    RECALL_PLOT,
    STALENESS,
    STEPS,
)
from components.core import gates
from components.core.carried_top import full_top, refreshed
from components.core.diagnostics import embedding_diagnostics
from components.core.encoders import pick_device
from components.core.retrieval import (
    FROZEN,
    TASKS,
    QuerySet,
    champion_comparison,
    embed_queries,
    evaluate_tasks,
    frozen_metrics,
    index_metrics,
    present,
    task_metrics,
)
from components.errors import StepFailed
from components.io import atomic, catalog_profile, top_lists
from components.io.embedder import ListingEmbedder, held_out_refs
from components.io.embedding_files import Embeddings, verify_embeddings
from components.io.faiss_index import RowIndex, coverage, labels_of, load_index
from components.io.manifest import Timer, describe_files, read_manifest, write_manifest
from components.io.test_split import test_split_queries
from components.release import (
    base_release,
    production,
    registry,
    staleness,
    tombstones,
    tracking,
)
from components.release.champion import load_champion

STEP = STEPS["evaluate"]
BATCH = 1024  # listings per forward pass when a champion's embeddings are computed
HEADLINE = ("recall@10",)  # per task, in metrics.json: what `dvc metrics show` prints
MEASURED = "index/latency_"  # metrics of this machine's speed: run.json, not DVC's files
# listings a top list holds beyond the deepest K: what removals from it a refresh can take
# before it searches every listing again (core/carried_top.py)
TOP_MARGIN = 100

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateResult:
    out_dir: Path
    metrics: dict
    gates: list
    summary: str


@dataclass(frozen=True)
class Challenger:
    """The model under evaluation, its listings, and its exact search results (`exact`:
    the metrics they give)."""

    loaded: registry.LoadedModel
    listing_ids: list[str]
    tops: dict[str, np.ndarray]
    exact: dict[str, float]


@dataclass(frozen=True)
class Evaluation:
    """What the gates, outputs and records are made of: measured now (`_measure`), or
    recorded by the release a refresh changed nothing of (`_as_recorded`)."""

    metrics: dict
    champion: dict  # _compare_with_champion's
    earned: dict | None  # a refresh: the training release's metrics (check_gates' earned)
    listing_ids: list[str]
    reference: dict  # the model's registry reference
    queries: dict[str, int]  # per task
    mlflow: dict | None  # the release's evaluation run, when its evaluation stands
    searched: str  # how the exact top lists were found (`_exact_top`)


def run(config: EvaluateConfig, paths: StepPaths) -> EvaluateResult:
    """Evaluate the embed step's model and index on the test split, then apply the gates."""
    timer = Timer()
    out = paths.step_dir(STEP.name)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    embedded = read_manifest(paths.step_dir("embed"))
    index_manifest = read_manifest(paths.step_dir("index"))
    held_out = held_out_refs(paths.path(EMBED_SPLITS))
    built_on = _built_on(paths, embedded)
    done = _as_recorded(config, paths, embedded, index_manifest, device, built_on)
    frozen = ListingEmbedder.frozen(paths, device)  # its feature stores: opened once, if used
    done = done or _measure(config, paths, embedded, held_out, frozen, built_on)
    metrics, champion = done.metrics, done.champion
    results = gates.check_gates(metrics, champion.get("metrics"), config.gates, earned=done.earned)
    _write_outputs(out, metrics, results, champion, config.ks, len(done.listing_ids))
    size = config.staleness.profile_listings
    profile, profiled = _profile(frozen, held_out, done.listing_ids, size, built_on)
    np.save(paths.path(PROFILE), profile.vectors)
    catalog_profile.write_sample(paths.path(PROFILE_SAMPLE), profile)
    stale = _staleness(config, paths, embedded, profile.vectors, metrics)
    report = gates.table(results)
    summary = _summary(metrics, results, champion) + _stale_summary(stale)
    if done.mlflow is not None:
        summary += f"; as evaluated for release {embedded['inputs']['base']['version']}"
    passed = not gates.failed(results)
    evaluation = done.mlflow or tracking.log_evaluation(
        paths,
        done.reference,
        [paths.path(RECALL_PLOT), paths.path(GATES)],
        metrics | champion.get("flat", {}) | (staleness.flat(stale) if stale else {}),
        passed,
        "refresh" if embedded["inputs"].get("base") else "retrain",
    )
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs={
            "embed": embedded["outputs"],
            "index": index_manifest["outputs"],
            "model": registry.identity(done.reference),
        },
        outputs=describe_files(out, [a.name for a in STEP.writes if a.tracked]),
        counts=done.queries | {"listings": len(done.listing_ids)},
        run={
            "summary": summary,
            "gates_passed": passed,
            "staleness": stale,
            "champion": champion.get("reference"),
            "measured": {k: v for k, v in metrics.items() if k.startswith(MEASURED)},
            "mlflow": evaluation,
            "recorded": done.mlflow is not None,
            "exact_search": done.searched,
            "profile": profiled,
            "local_outputs": describe_files(out, [a.name for a in STEP.writes if a.local]),
        },
    )
    if gates.failed(results):
        raise StepFailed(gates.failure_message(results), report=report)
    log.info("%s", summary)
    return EvaluateResult(out, metrics, [r.as_dict() for r in results], report + "\n" + summary)


def _measure(
    config: EvaluateConfig,
    paths: StepPaths,
    embedded,
    held_out,
    frozen: ListingEmbedder,
    built_on: BuiltOn | None,
) -> Evaluation:
    """Every metric, measured on the embeddings, the index and the test split (`frozen`:
    the featurize step's features; `built_on`: a refresh's release, compared)."""
    device = frozen.device
    loaded = _embed_model(embedded, paths, device)
    verify_embeddings(paths.step_dir("embed"))
    listing_ids = pq.read_table(paths.path(EMBEDDED_IDS), columns=["listing_id"])
    listing_ids = listing_ids.column(0).to_pylist()
    embedder = frozen.for_model(loaded.model, loaded.spec, paths)
    row_of = {lid: i for i, lid in enumerate(listing_ids)}
    sets = test_split_queries(paths, embedder, row_of)
    depth = min(max(config.ks), len(listing_ids))
    vectors = {s.task: embed_queries(loaded.model, s, device) for s in present(sets)}
    width = max(config.ks) + TOP_MARGIN
    lists, listings, searched = _exact_top(
        paths,
        embedded,
        built_on,
        sets,
        vectors,
        len(listing_ids),
        (width, depth),
        config.diagnostics,
    )
    tops = {task: found.top(depth) for task, found in lists.items()}
    metrics = task_metrics(sets, tops, config.ks)
    challenger = Challenger(loaded, listing_ids, tops, dict(metrics))
    base = embedded["inputs"].get("base")
    # a refresh: the same model on its test split, which earned its place at training
    training = _at_training(paths, base["version"]) if base else {}
    earned = {key: value for key, value in training.items() if _is_frozen(key)}
    metrics |= earned or _frozen_baseline(
        paths, frozen, held_out, sets, challenger, config.ks, depth
    )
    index, index_ids, _ = load_index(paths.step_dir("index"))
    removed = tombstones.removed_ids(tombstones.read_all(production.open_store(paths)))
    metrics |= coverage(index_ids, listing_ids, removed, labels_of(index))  # gated
    rows = RowIndex(index, index_ids, listing_ids)
    metrics |= index_metrics(
        sets,
        vectors,
        rows,
        tops,
        config.ks,
        depth,
        config.latency_queries,
        config.latency_seconds,
        config.ann_queries,
    )
    if config.diagnostics:
        size = config.diagnostics_sample
        sample = embedder.view_sample(held_out, size)
        metrics |= embedding_diagnostics(*sample, listings, sets, vectors, size)
    return Evaluation(
        metrics,
        _compare_with_champion(config, paths, device, sets, held_out, depth, challenger),
        training if earned else None,
        listing_ids,
        loaded.reference,
        {s.task: len(s.relevant) for s in sets},
        None,
        searched,
    )


def _exact_top(paths, embedded, built_on, sets, vectors, n_listings: int, sizes, need):
    """Each task's exact top lists, `width` wide and exact at least `depth` deep (`sizes`;
    written to exact_top.npz for the next refresh): carried from the release a refresh
    builds on where they can be (`_carried`), else searched over every listing
    (`n_listings` vectors). Also every listing's vector when `need` or searched (else
    None), and a line saying which."""
    width, depth = sizes
    keys = {queries.task: top_lists.query_keys(queries) for queries in present(sets)}
    carried, searched = _carried(paths, embedded, built_on, keys, vectors, width, depth)
    listings = None
    if carried is None or need:
        listings = Embeddings(paths.path(EMBEDDINGS)).all()
        if len(listings) != n_listings:
            raise ValueError(
                f"{paths.path(EMBEDDINGS)}: {len(listings)} live embeddings for "
                f"{n_listings} listings; run the embed step again"
            )
    lists = carried or {task: full_top(v, listings, width) for task, v in vectors.items()}
    top_lists.write(
        paths.path(EXACT_TOP),
        embedded["model"]["sha256"],
        {task: (keys[task], found) for task, found in lists.items()},
    )
    log.info("evaluate: exact search: %s", searched)
    return lists, listings, searched


@dataclass(frozen=True)
class BuiltOn:
    """A refresh's listings against the release it builds on (`release`: its listing ids,
    exact top lists, profile and profile sample, downloaded): `kept` maps each of the
    release's rows to today's row of the same listing and fingerprint (-1: removed or
    changed), `new_rows` are today's rows the release did not hold so."""

    release: base_release.BaseRelease
    kept: np.ndarray
    new_rows: np.ndarray


def _built_on(paths: StepPaths, embedded: dict) -> BuiltOn | None:
    """A refresh's release, compared with today's listings; None for a retrain, or a
    release that records no fingerprints."""
    base = embedded["inputs"].get("base")
    if base is None:
        return None
    names = (EMBEDDED_IDS.name, EXACT_TOP.name, PROFILE.name, PROFILE_SAMPLE.name)
    release = base_release.version(paths, base["version"], paths.path(EVALUATE_BUILT_ON), names)
    moved = base_release.kept_rows(release.local / EMBEDDED_IDS.name, paths.path(EMBEDDED_IDS))
    return None if moved is None else BuiltOn(release, *moved)


def _carried(paths, embedded, built_on: BuiltOn | None, keys, vectors, width: int, depth: int):
    """A refresh's exact top lists from its release's (core/carried_top.py), scoring only
    the listings whose vectors the release did not hold; (None, why) where they cannot
    be carried, and the lists are searched over every listing."""
    if built_on is None:
        why = "a retrain" if not embedded["inputs"].get("base") else "no fingerprints recorded"
        return None, f"every listing ({why})"
    version = built_on.release.version
    found = top_lists.read(built_on.release.local / EXACT_TOP.name, embedded["model"]["sha256"])
    if found is None:
        return None, f"every listing (release {version} has no top lists of this model)"
    new_rows = built_on.new_rows
    new_vectors = Embeddings(paths.path(EMBEDDINGS)).take(new_rows)
    lists = {}
    for task, queries in vectors.items():
        carried = top_lists.for_queries(found.get(task, {}), keys[task], width)
        if carried is None:
            return None, f"every listing ({task}: queries or K other than release {version}'s)"
        lists[task] = refreshed(carried, built_on.kept, new_rows, new_vectors, queries)
        if lists[task].exact_depth() < depth:
            return None, f"every listing ({task}: removals emptied a top list below depth {depth})"
    return lists, f"carried from release {version}, {len(new_rows)} new vectors scored"


def _as_recorded(
    config: EvaluateConfig,
    paths: StepPaths,
    embedded: dict,
    index_manifest: dict,
    device,
    built_on: BuiltOn | None,
) -> Evaluation | None:
    """A refresh that serves exactly what its release serves (the same model, embed and
    index outputs byte for byte, the same queries, the same `ks`) takes the release's
    evaluation: every metric would come out the same, at the cost of reading and searching
    every vector again (minutes at millions of listings). The gates are checked again on
    it with today's thresholds; staleness is measured as always. None: measure."""
    base = embedded["inputs"].get("base")
    if built_on is None or any(embedded["counts"].get(k) for k in ("added", "changed", "removed")):
        return None
    storage = production.open_store(paths)
    release = production.read_manifest(storage, base["version"])
    lineage = release.get("lineage", {})
    queries = embedded["inputs"].get("featurize", {}).get("queries.parquet", {}).get("sha256")
    if (
        release.get("embedding_model_sha256") != embedded["model"]["sha256"]
        or lineage.get("embed") != _hashes(embedded["outputs"])
        or lineage.get("index") != _hashes(index_manifest["outputs"])
        or lineage.get("featurize", {}).get("queries.parquet") != queries
        or release.get("params", {}).get("evaluate", {}).get("ks") != list(config.ks)
        or not release.get("evaluation", {}).get("mlflow")
        or not built_on.release.local.joinpath(EXACT_TOP.name).is_file()  # from before them
    ):
        return None
    champion = load_champion(config.champion, paths, device)
    if champion is not None and champion.reference["sha256"] != embedded["model"]["sha256"]:
        return None  # another champion: compare with it for real
    recorded = base_release.version(
        paths, base["version"], paths.path(EVALUATE_BASE), (DETAILS.name,)
    )
    metrics = json.loads((recorded.local / DETAILS.name).read_text()) | release["metrics"]
    metrics |= release["evaluation"].get("measured") or {}
    training = _at_training(paths, base["version"])
    ids = pq.read_table(paths.path(EMBEDDED_IDS), columns=["listing_id"]).column(0).to_pylist()
    atomic.copy_file(built_on.release.local / EXACT_TOP.name, paths.path(EXACT_TOP))
    log.info("evaluate: nothing changed since release %s: its evaluation stands", base["version"])
    return Evaluation(
        metrics,
        {"reference": champion.reference, "metrics": metrics} if champion else {},
        training if any(_is_frozen(key) for key in training) else None,
        ids,
        _embed_model(embedded, paths, device).reference,
        {task: int(metrics.get(f"{task}/queries", 0)) for task in TASKS},
        release["evaluation"]["mlflow"],
        f"as release {base['version']} found them",
    )


def _hashes(outputs: dict) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in outputs.items()}


def _profile(frozen: ListingEmbedder, held_out, listing_ids: list[str], size: int, built_on):
    """The catalog's profile (io/catalog_profile.py), carried from a refresh's release
    where it can be, and a line saying how it was made."""
    then = None
    if built_on is not None:
        local = built_on.release.local
        then = catalog_profile.read(local / PROFILE.name, local / PROFILE_SAMPLE.name)
    if then is not None:
        args = (then, built_on.kept, built_on.new_rows)
        found = catalog_profile.carried(frozen, held_out, listing_ids, size, *args)
        if found is not None:
            return found, f"carried from release {built_on.release.version}"
    return catalog_profile.full(frozen, held_out, listing_ids, size), "sampled"


def _staleness(config: EvaluateConfig, paths: StepPaths, embedded, profile, metrics) -> dict:
    """A refresh's staleness (components/release/staleness.py), written to
    staleness.json; {} (and an empty file) for a retrain, whose model is new."""
    base = embedded["inputs"].get("base")
    found = {}
    if base is not None:
        found = staleness.measure(
            paths,
            base["version"],
            paths.path(EMBEDDED_IDS),
            profile,
            metrics,
            config.staleness,
            paths.path(EVALUATE_BASE),
        )
    atomic.write_text(paths.path(STALENESS), json.dumps(found, indent=2) + "\n")
    return found


def _stale_summary(found: dict) -> str:
    if not found:
        return ""
    if found["stale"]:
        return "; STALE: " + "; ".join(found["reasons"])
    new = found["new_or_changed"]
    share = "" if new is None else f"{new:.1%} new or changed "
    return f"; fresh ({share}since training release {found['trained_on']})"


def _embed_model(embedded: dict, paths: StepPaths, device) -> registry.LoadedModel:
    """The model the embed step used (checked by its weights' hash)."""
    source = embedded["model"]["source"]
    loaded = registry.load_model(source if source.startswith("models:/") else None, paths, device)
    if loaded.reference["sha256"] != embedded["model"]["sha256"]:
        raise ValueError(f"the model at {source} changed since the embed step ran; run embed again")
    return loaded


def _frozen_baseline(paths, frozen, held_out, sets, challenger, ks, depth) -> dict:
    """The frozen encoders' own metrics on the same test queries and listings. The
    model's query inputs are the frozen features, unless it fine-tuned its backbone
    (its photo inputs are then activations): only then are they read again."""
    if challenger.loaded.spec.get("finetune_blocks", 0):
        row_of = {lid: i for i, lid in enumerate(challenger.listing_ids)}
        sets = test_split_queries(paths, frozen, row_of)
    batches = _in_listing_order(frozen.padded_batches(held_out), challenger.listing_ids)
    metrics, _ = frozen_metrics(sets, batches, ks, depth)
    return metrics


def _at_training(paths: StepPaths, base_version: str) -> dict:
    """The metrics of the model's training release (its metrics.json and details.json): a
    refresh keeps the model, so its gain over the frozen encoders is the one it earned
    there (both measured on that catalog), and a refresh does not read every listing's
    frozen features again. How recall moves as the catalog changes is staleness's
    `max_recall_drop`, which calls for a retrain."""
    storage = production.open_store(paths)
    trained_on = production.read_manifest(storage, base_version).get("trained_on")
    training = base_release.version(
        paths, trained_on or base_version, paths.path(EVALUATE_BASE), (DETAILS.name,)
    )
    details = json.loads((training.local / DETAILS.name).read_text())
    return details | training.manifest.get("metrics", {})


def _is_frozen(key: str) -> bool:
    return any(f"/{baseline}/" in key for baseline in FROZEN)


def _in_listing_order(batches, listing_ids: list[str]):
    """The (image views, text views) of `batches` for the listings embed embedded (not
    those it left out as removed), checked to follow the embed step's rows."""
    embedded, first = set(listing_ids), 0
    for ids, images, texts in batches:
        keep = [i for i, listing_id in enumerate(ids) if listing_id in embedded]
        if [ids[i] for i in keep] != listing_ids[first : first + len(keep)]:
            raise ValueError("the featurize step's views changed since embed ran; run embed again")
        first += len(keep)
        if len(keep) < len(ids):
            images, texts = images.rows(keep), texts.rows(keep)
        yield images, texts


def _compare_with_champion(
    config: EvaluateConfig,
    paths: StepPaths,
    device: torch.device,
    sets: list[QuerySet],
    held_out: set[tuple[str, str]],
    depth: int,
    challenger: Challenger,
) -> dict:
    """The champion's exact metrics on the same queries, and the challenger's difference
    in recall@10 with a bootstrap CI; {} when there is no champion."""
    champion = load_champion(config.champion, paths, device)
    if champion is None:
        return {}
    if champion.reference["sha256"] == challenger.loaded.reference["sha256"]:
        # the same weights (every refresh): the same vectors and searches, done once
        metrics, tops = challenger.exact, challenger.tops
    else:
        embedder = ListingEmbedder(champion.model, champion.spec, paths, device)
        ids, listings = embedder.embed_all(held_out, BATCH)
        if challenger.listing_ids != ids:
            raise ValueError("the champion embeds another set of listings; cannot compare")
        metrics, _, tops = evaluate_tasks(champion.model, sets, listings, config.ks, depth, device)
    flat = champion_comparison(
        sets, challenger.tops, tops, metrics, config.bootstrap, seed=paths.seed
    )
    curves = {
        task: {
            key.removeprefix(f"{task}/"): v for key, v in metrics.items() if key.startswith(task)
        }
        for task in TASKS
    }
    return {"metrics": metrics, "flat": flat, "curves": curves, "reference": champion.reference}


def split_metrics(metrics: dict) -> tuple[dict, dict]:
    """(headline, details) of the test metrics; this machine's latency in neither."""
    headline_keys = {f"{task}/{name}" for task in TASKS for name in HEADLINE}
    headline_keys.add("index/ann_recall@10")
    kept = {k: v for k, v in metrics.items() if not k.startswith(MEASURED)}
    headline = {k: v for k, v in kept.items() if k in headline_keys}
    return headline, {k: v for k, v in kept.items() if k not in headline_keys}


def _write_outputs(out, metrics, results, champion, ks, n_listings) -> None:
    for artifact, values in zip((METRICS, DETAILS), split_metrics(metrics), strict=True):
        atomic.write_text(out / artifact.name, json.dumps(values, indent=2, sort_keys=True) + "\n")
    atomic.write_text(out / GATES.name, json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    compared = {k: champion[k] for k in ("reference", "metrics", "flat") if k in champion}
    atomic.write_text(out / CHAMPION.name, json.dumps(compared, indent=2, sort_keys=True) + "\n")
    tasks = tuple(task for task in TASKS if metrics[f"{task}/queries"])
    curves = _curves(metrics, tasks, ks)
    atomic.write_text(out / CURVES.name, json.dumps(curves, indent=2) + "\n")
    if champion.get("curves"):
        for row in curves:
            for task in tasks:
                row[f"{task}/champion"] = champion["curves"][task][f"recall@{row['k']}"]
    figure = tracking.recall_figure(curves, tasks, n_listings)
    with atomic.writing(out / RECALL_PLOT.name) as tmp:
        figure.savefig(tmp, dpi=100, format="png")


def _curves(metrics: dict, tasks: tuple[str, ...], ks: list[int]) -> list[dict]:
    """One row per K: the model's recall@K per task and the frozen encoders' (mean of the
    views): what DVC plots."""
    return [
        {"k": k}
        | {f"{task}/model": metrics[f"{task}/recall@{k}"] for task in tasks}
        | {f"{task}/frozen": metrics[f"{task}/frozen/recall@{k}"] for task in tasks}
        for k in ks
    ]


def _summary(metrics, results, champion) -> str:
    verdict = "all gates passed" if not gates.failed(results) else "GATES FAILED"
    if skipped := gates.skipped(results):  # a small catalog can skip them all: say so
        recall = [r for r in results if r.gate != gates.COVERAGE_GATE]
        verdict += f" ({len(skipped)} of {len(recall)} recall gates skipped (too few test queries))"
    against = f"champion v{champion['reference']['version']}" if champion else "no champion yet"
    tasks = "; ".join(_task_summary(metrics, task) for task in TASKS)
    return (
        f"evaluate: {tasks}; ANN recall@10 {metrics['index/ann_recall@10']:.3f}; "
        f"vs {against}; {verdict}"
    )


def _task_summary(metrics: dict, task: str) -> str:
    name = task.replace("_to_", "->")
    if not metrics[f"{task}/queries"]:
        return f"{name}: no test queries"
    frozen = max(metrics[f"{task}/frozen/recall@10"], metrics[f"{task}/frozen_max/recall@10"])
    index = f"{metrics[f'{task}/index/recall@10']:.3f}"
    if (sampled := metrics.get(f"{task}/index/queries")) is not None:
        index += f" on {sampled:.0f} queries, exact {metrics[f'{task}/index/exact_recall@10']:.3f}"
    return (
        f"{name} recall@10 {metrics[f'{task}/recall@10']:.3f} (index {index}, "
        f"frozen encoders {frozen:.3f})"
    )
