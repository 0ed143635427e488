"""`promote` step, and the `rollback` operator command: releases into the production store.

promote, only after every gate passed (it re-reads the evaluate step's gates.json):

1. uploads the index, its id map, the embeddings, the model reference, metrics and gates
   under `indices/<version>/` of `storage.uri`, then the version's manifest (sha256 and
   size of every file, model, lineage, params, metrics, the previous champion);
2. reads every file back and checks sizes and sha256;
3. points `indices/CURRENT` at it with a conditional write (a concurrent promotion that
   got there first makes this one fail, with nothing of it visible);
4. moves the MLflow alias `listing-encoder@champion` to the promoted model version;
5. deletes versions beyond `promote.retain` (never the current one or the one before).

Promoting content that is already current changes nothing and says so. Writes
`<workdir>/promote/manifest.json` (which version, where, which model).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from components import embed, evaluate, gates, index, model_io, production
from components.config import PromoteConfig, StepPaths
from components.errors import StepFailed
from components.manifest import Timer, describe_files, read_manifest, write_manifest
from components.storage import open_storage

STEP = "promote"
MODEL_FILE = "model.json"
SUMMARY_METRICS = ("query_to_listing/recall@10", "view_to_listing/recall@10")
UPSTREAM = ("validate", "featurize", "train", "embed", "index", "evaluate")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromoteResult:
    out_dir: Path
    version: str
    changed: bool
    deleted: list[str]
    summary: str


def run(config: PromoteConfig, paths: StepPaths) -> PromoteResult:
    """Publish the evaluated index and model as the current production version."""
    timer = Timer()
    out = paths.step_dir(STEP)
    out.mkdir(parents=True, exist_ok=True)
    manifests = {step: read_manifest(paths.step_dir(step)) for step in UPSTREAM}
    gate_rows = _passed_gates(paths, manifests)
    embedded, indexed = manifests["embed"], manifests["index"]
    model = _registered_model(embedded["model"], config)
    (out / MODEL_FILE).write_text(json.dumps(model, indent=2) + "\n")
    files = release_files(paths, out / MODEL_FILE)
    storage = open_storage(paths.storage, paths.storage_uri)
    previous_alias = model_io.alias_version(paths, config.model_name, config.alias)
    published = production.publish(
        storage,
        files,
        {
            "previous_champion": {"alias": config.alias, "model_version": previous_alias},
            "lineage": _lineage(manifests),
            "params": _params(manifests, config, paths.seed),
            "metrics": json.loads(files[evaluate.METRICS_FILE].read_text()),
            "index": {
                "factory": indexed["params"]["factory"],
                "search_params": indexed.get("search_params"),
                **indexed["counts"],
            },
            "gates": gate_rows,
        },
        model,
        progress=lambda message: log.info("promote: %s", message),
    )
    model_io.move_alias(
        paths,
        config.model_name,
        config.alias,
        model["version"],
        {"production_version": published.version, "production_store": storage.uri},
    )
    deleted = production.apply_retention(
        storage, config.retain, timedelta(hours=config.abandoned_after_hours)
    )
    summary = _summary(published, storage.uri, model, previous_alias, config, deleted)
    write_manifest(
        out,
        step=STEP,
        params=config,
        timer=timer,
        inputs={
            "evaluate": manifests["evaluate"]["outputs"],
            "embed": embedded["outputs"],
            "index": indexed["outputs"],
            "model": model,
        },
        outputs=describe_files(out, [MODEL_FILE]),
        counts={"files": len(files), "deleted_versions": len(deleted)},
        extra={
            "version": published.version,
            "changed": published.changed,
            "store": storage.uri,
            "previous": published.previous,
            "summary": summary,
        },
    )
    log.info("%s", summary)
    return PromoteResult(out, published.version, published.changed, deleted, summary)


def _passed_gates(paths: StepPaths, manifests: dict) -> list[dict]:
    """The evaluate step's gate rows, refusing when a gate failed or when the evaluation
    was of other embeddings or another index than the ones to promote."""
    path = paths.step_dir("evaluate") / evaluate.GATES_FILE
    rows = json.loads(path.read_text())
    if not rows:
        raise StepFailed(f"{path} has no gates; refusing to promote")
    results = [gates.GateResult(**row) for row in rows]
    if gates.failed(results):
        raise StepFailed(
            f"refusing to promote: {gates.failure_message(results)}", report=gates.table(results)
        )
    for step in ("embed", "index"):
        if manifests["evaluate"]["inputs"].get(step) != manifests[step]["outputs"]:
            raise StepFailed(
                f"refusing to promote: {paths.step_dir(step)} changed since evaluate ran; "
                "run evaluate again"
            )
    return rows


def _registered_model(reference: dict, config: PromoteConfig) -> dict:
    if not reference.get("version") or reference.get("name") != config.model_name:
        raise ValueError(
            f"the embedded model ({reference.get('source')}) is not a registered version of "
            f"{config.model_name!r}; promote needs one to move @{config.alias}"
        )
    return {k: reference.get(k) for k in ("name", "version", "run_id", "sha256", "source")}


def release_files(paths: StepPaths, model_file: Path) -> dict[str, Path]:
    """Store name -> local file of everything a version holds (its manifest aside)."""
    embed_dir, index_dir = paths.step_dir("embed"), paths.step_dir("index")
    evaluate_dir = paths.step_dir("evaluate")
    files = {
        index.INDEX_FILE: index_dir / index.INDEX_FILE,
        index.IDS_FILE: index_dir / index.IDS_FILE,
        embed.IDS_FILE: embed_dir / embed.IDS_FILE,
        evaluate.METRICS_FILE: evaluate_dir / evaluate.METRICS_FILE,
        evaluate.GATES_FILE: evaluate_dir / evaluate.GATES_FILE,
        MODEL_FILE: model_file,
    }
    for part in index.embedding_parts(embed_dir):
        files[f"{embed.PARTS_DIR}/{part.name}"] = part
    return files


def _lineage(manifests: dict) -> dict:
    """sha256 of what each step up to the index produced: data -> features -> model -> index."""
    return {
        step: {name: entry["sha256"] for name, entry in manifests[step]["outputs"].items()}
        for step in UPSTREAM
        if step != "evaluate"
    }


def _params(manifests: dict, config: PromoteConfig, seed: int) -> dict:
    params = {step: manifest["params"] for step, manifest in manifests.items()}
    return params | {STEP: config.model_dump(mode="json"), "seed": seed}


def _summary(published, uri, model, previous_alias, config, deleted) -> str:
    alias = f"{config.model_name}@{config.alias}"
    if not published.changed:
        return (
            f"promote: {published.version} in {uri} already holds this index and model "
            f"(v{model['version']}); nothing uploaded, {alias} -> v{model['version']}"
        )
    metrics = published.manifest.get("metrics", {})
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in SUMMARY_METRICS if k in metrics)
    return (
        f"promote: {published.version} is now CURRENT in {uri} (previous: "
        f"{published.previous or 'none'}); {alias} -> v{model['version']} (was "
        f"{'v' + previous_alias if previous_alias else 'unset'}); {shown}; "
        f"retention deleted {len(deleted)} old version(s)"
    )


def rollback(paths: StepPaths, config: PromoteConfig, to: str | None) -> str:
    """Point CURRENT back (to `to`, or the version before the current one) and move the
    champion alias to that version's model. Returns a one-line account."""
    storage = open_storage(paths.storage, paths.storage_uri)
    old, new = production.rollback(storage, to)
    model_io.move_alias(
        paths,
        new.model["name"] or config.model_name,
        config.alias,
        str(new.model["version"]),
        {"production_version": new.version, "production_store": storage.uri},
    )
    return (
        f"rollback: CURRENT in {storage.uri} is now {new.version} (was {old.version}); "
        f"{new.model['name']}@{config.alias} -> v{new.model['version']}"
    )


def versions(paths: StepPaths) -> str:
    return production.versions_table(
        open_storage(paths.storage, paths.storage_uri), SUMMARY_METRICS
    )
