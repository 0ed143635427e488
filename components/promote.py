"""`promote` step, and the `rollback` operator command: releases into the production store.

promote, only after every gate passed (it re-reads the evaluate step's gates.json):

1. uploads the index, its id map, the embeddings, the model reference, metrics and gates
   that the store does not hold yet (objects are stored once by content and shared
   between versions), then the version's manifest under `indices/<version>/` (sha256,
   size and object of every file, model, lineage, params, metrics, the previous champion);
2. reads every uploaded file back and checks sizes and sha256 (the shared ones by size);
3. points `indices/CURRENT` at it with a conditional write (a concurrent promotion that
   got there first makes this one fail, with nothing of it visible);
4. moves the MLflow alias `listing-encoder@champion` to the promoted model version;
5. retires the tombstones the embed step found settled (the catalog dropped their
   listings; a removal the catalog still lists holds for the next release too);
6. deletes versions beyond `promote.retain` (never the current one or the one before).

Promoting content that is already current changes nothing and says so. Writes
`<workdir>/promote/manifest.json` (what was promoted: the evaluated outputs and the model's
weights) and `run.json` (where it went on this machine: version, store, registered model).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from components.config import PromoteConfig, StepPaths
from components.contract import (
    EMBEDDINGS,
    GATES,
    INDEX_IDS,
    METRICS,
    RELEASE_FILES,
    RELEASE_MODEL,
    STEPS,
)
from components.core import gates
from components.errors import StepFailed
from components.io import atomic
from components.io.embedding_files import Embeddings
from components.io.faiss_index import read_ids
from components.io.manifest import (
    Timer,
    describe_files,
    read_manifest,
    require_run,
    verify_outputs,
    write_manifest,
)
from components.release import production, registry, tombstones, tracking
from components.release.storage import open_storage

STEP = STEPS["promote"]
SUMMARY_METRICS = ("query_to_listing/recall@10", "view_to_listing/recall@10")

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
    out = paths.step_dir(STEP.name)
    out.mkdir(parents=True, exist_ok=True)
    manifests = _upstream_manifests(paths)
    evaluation = require_run(paths.step_dir("evaluate"))
    _verify_release_files(paths, manifests, evaluation)
    gate_rows = _passed_gates(paths, manifests)
    model = _registered_model(paths, manifests["embed"], paths.registry.model_name)
    atomic.write_text(paths.path(RELEASE_MODEL), json.dumps(model, indent=2) + "\n")
    files = release_files(paths)
    storage = production.open_store(paths, create=True)
    listings = _listing_gate(storage, manifests, config)
    name, alias = paths.registry.model_name, paths.registry.champion_alias
    previous_alias = registry.alias_version(paths, name, alias)
    metadata = {
        "previous_champion": {"alias": alias, "model_version": previous_alias},
        "lineage": _lineage(manifests),
        "params": _params(manifests, config, paths),
        "metrics": json.loads(paths.path(METRICS).read_text()),
        "index": _index_record(manifests["index"]),
        "listings": listings,
        "gates": gate_rows,
        "evaluation": {
            key: evaluation.get(key) for key in ("mlflow", "champion", "measured", "started_at")
        },
        "embedding_model_sha256": manifests["embed"]["model"]["sha256"],
        "staleness": evaluation.get("staleness") or None,
        "trigger": paths.trigger,
        **_kind(manifests, storage),
    }
    _inherit_training(metadata, manifests, storage)
    published = production.publish(
        storage,
        files,
        metadata,
        model,
        progress=lambda message: log.info("promote: %s", message),
        built_on=metadata["built_on"],  # a refresh replaces only the release it updated
    )
    where = store_location(storage)
    registry.move_alias(
        paths,
        name,
        alias,
        model["version"],
        {"production_version": published.version, "production_store": where},
    )
    # the challenger is the champion now: one alias says so
    registry.retire_alias(paths, name, paths.registry.challenger_alias, model["version"])
    tracking.tag_release(
        paths,
        evaluation.get("mlflow"),
        {"release.version": published.version, "release.store": where},
    )
    # a removal holds until the catalog drops its listings (or they are restored): only
    # tombstones none of whose listings the release's catalog lists are retired
    tombstones.retire(storage, manifests["embed"]["inputs"].get("settled_tombstones", []))
    deleted = production.apply_retention(
        storage, config.retain, timedelta(hours=config.abandoned_after_hours)
    )
    summary = _summary(published, storage.uri, model, previous_alias, f"{name}@{alias}", deleted)
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs={
            "evaluate": manifests["evaluate"]["outputs"],
            "embed": manifests["embed"]["outputs"],
            "index": manifests["index"]["outputs"],
            "model": manifests["embed"]["model"],
        },
        outputs={},
        counts={"files": len(files)},
        run={
            "version": published.version,
            "changed": published.changed,
            "store": storage.uri,
            "previous": published.previous,
            "model": model,
            "deleted_versions": deleted,
            "uploaded_bytes": published.uploaded_bytes,
            "summary": summary,
            "local_outputs": describe_files(out, [RELEASE_MODEL.name]),
        },
    )
    log.info("%s", summary)
    return PromoteResult(out, published.version, published.changed, deleted, summary)


def _upstream_manifests(paths: StepPaths) -> dict[str, dict]:
    """The manifests of the steps promote reads; a refresh's model was trained for the
    release it builds on, so this workdir's train step (if any) is not part of it."""
    embedded = read_manifest(paths.step_dir("embed"))
    refresh = embedded["inputs"].get("base") is not None
    return {
        step: embedded if step == "embed" else read_manifest(paths.step_dir(step))
        for step in STEP.upstream
        if not (refresh and step == "train")
    }


def _inherit_training(metadata: dict, manifests: dict, storage) -> None:
    """A refresh's release records its model's training lineage and params as the release
    it builds on recorded them."""
    if "train" in manifests:
        return
    before = production.read_manifest(storage, metadata["built_on"])
    for key in ("lineage", "params"):
        if "train" in before.get(key, {}):
            metadata[key]["train"] = before[key]["train"]


def _kind(manifests: dict, storage) -> dict:
    """What kind of release this is: a retrain (trained on its own catalog), or a refresh
    built on a release, with its model's training release and what changed since."""
    base = manifests["embed"]["inputs"].get("base")
    if base is None:
        return {"kind": "retrain", "built_on": None, "trained_on": None}
    before = production.read_manifest(storage, base["version"])
    counts = manifests["embed"]["counts"]
    return {
        "kind": "refresh",
        "built_on": base["version"],
        "trained_on": before.get("trained_on") or base["version"],
        "delta": {k: counts.get(k) for k in ("reused", "added", "changed", "removed")}
        | {"index": manifests["index"].get("build", "full")},
    }


def _passed_gates(paths: StepPaths, manifests: dict) -> list[dict]:
    """The evaluate step's gate rows, refusing when a gate failed or when the evaluation
    was of other embeddings or another index than the ones to promote."""
    path = paths.path(GATES)
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


def _listing_gate(storage, manifests: dict, config: PromoteConfig) -> dict:
    """The release's listing counts, refusing one that has shrunk more than
    `max_shrink` below the current release (unless `allow_shrink`): on a truncated
    catalog every recall gate is easy, so the count itself is the gate.

    Raises:
        StepFailed: naming both counts and the override.
    """
    record = {
        "indexed": manifests["index"]["counts"]["vectors"],
        "clean": manifests["validate"]["counts"]["clean"],
        "tombstoned": manifests["embed"]["counts"].get("tombstoned", 0),  # held out
        "current": None,
        "shrink_allowed": config.allow_shrink,
    }
    current = production.read_pointer(storage)
    if current is None:
        return record
    before = production.listing_count(
        production.read_manifest(storage, current.version, current.manifest_sha256)
    )
    record["current"] = {"version": current.version, "indexed": before}
    if not before or record["indexed"] >= (1 - config.max_shrink) * before:
        return record
    shrink = 1 - record["indexed"] / before
    message = (
        f"the release has {record['indexed']:,} listings, {shrink:.0%} fewer than the "
        f"current release {current.version} ({before:,}); promote.max_shrink allows "
        f"{config.max_shrink:.0%}"
    )
    if not config.allow_shrink:
        raise StepFailed(
            f"refusing to promote: {message}. A truncated upstream export? For a planned "
            "shrink, run promote with --set promote.allow_shrink=true"
        )
    log.warning("promote: %s; promoting anyway (promote.allow_shrink)", message)
    return record


def _verify_release_files(paths: StepPaths, manifests: dict, evaluation: dict) -> None:
    """Every file to upload still has the sha256 its step recorded, in its manifest or,
    for a machine-local file (the evaluation's reports, the index's changes), its run
    record (AlteredFile if not): what is published is what was evaluated."""
    by_step: dict[str, list[str]] = {}
    for artifact in (*RELEASE_FILES, EMBEDDINGS):
        if artifact.step in manifests:  # not the model reference promote itself writes
            by_step.setdefault(artifact.step, []).append(artifact.name)
    for step, names in by_step.items():
        tracked = [name for name in names if name in manifests[step]["outputs"]]
        verify_outputs(paths.step_dir(step), tracked, manifests[step])
        local = [name for name in names if name not in tracked]
        if local:  # machine-local (the evaluation's reports): recorded in its run record
            record = evaluation if step == "evaluate" else require_run(paths.step_dir(step))
            recorded = {"step": step, "outputs": record.get("local_outputs", {})}
            verify_outputs(paths.step_dir(step), local, recorded)


def _registered_model(paths: StepPaths, embedded: dict, model_name: str) -> dict:
    """The registered version of the embedded model's weights (the embed step's run
    record says which one)."""
    reference = require_run(paths.step_dir("embed"))["model"]
    if reference.get("sha256") != embedded["model"]["sha256"]:
        raise ValueError(
            f"{paths.step_dir('embed')}: its run record names other weights than its "
            "manifest; run embed again"
        )
    if not reference.get("version") or reference.get("name") != model_name:
        raise ValueError(
            f"the embedded model ({reference.get('source')}) is not a registered version of "
            f"{model_name!r} (registry.model_name); promote needs one to move its alias"
        )
    return {k: reference.get(k) for k in ("name", "version", "run_id", "sha256", "source")}


def release_files(paths: StepPaths) -> dict[str, Path]:
    """Store name -> local file of everything a version holds (its manifest aside)."""
    files = {artifact.name: paths.path(artifact) for artifact in RELEASE_FILES}
    for file in Embeddings(paths.path(EMBEDDINGS)).files:
        files[f"{EMBEDDINGS.name}/{file.name}"] = file
    return files


def _lineage(manifests: dict) -> dict:
    """sha256 of what each step up to the index produced: data -> features -> model -> index."""
    return {
        step: {name: entry["sha256"] for name, entry in manifests[step]["outputs"].items()}
        for step in STEP.upstream
        if step in manifests and step != "evaluate"
    }


def _index_record(indexed: dict) -> dict:
    return {
        "factory": indexed["params"]["factory"],
        "search_params": indexed.get("search_params"),
        **indexed["counts"],
    }


def _params(manifests: dict, config: PromoteConfig, paths: StepPaths) -> dict:
    params = {step: manifest["params"] for step, manifest in manifests.items()}
    return params | {
        STEP.name: config.model_dump(mode="json"),
        "registry": paths.registry.model_dump(mode="json"),
        "seed": paths.seed,
    }


def _summary(published, uri, model, previous_alias, alias: str, deleted) -> str:
    if not published.changed:
        return (
            f"promote: {published.version} in {uri} already holds this index and model "
            f"(v{model['version']}); nothing uploaded, {alias} -> v{model['version']}"
        )
    metrics = published.manifest.get("metrics", {})
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in SUMMARY_METRICS if k in metrics)
    whole = sum(entry["bytes"] for entry in published.manifest["files"].values())
    return (
        f"promote: {published.version} is now CURRENT in {uri} (previous: "
        f"{published.previous or 'none'}; uploaded {published.uploaded_bytes / 2**20:.1f} "
        f"of its {whole / 2**20:.1f} MiB, the rest shared); {alias} -> v{model['version']} (was "
        f"{'v' + previous_alias if previous_alias else 'unset'}); {shown}; "
        f"retention deleted {len(deleted)} old version(s)"
    )


def rollback(paths: StepPaths, to: str | None) -> str:
    """Point CURRENT back (to `to`, or the version before the current one) and move the
    champion alias to that version's model. Returns a one-line account."""
    storage = production.open_store(paths)
    old, new = production.rollback(storage, to)
    alias = paths.registry.champion_alias
    registry.move_alias(
        paths,
        new.model["name"] or paths.registry.model_name,
        alias,
        str(new.model["version"]),
        {"production_version": new.version, "production_store": store_location(storage)},
    )
    return (
        f"rollback: CURRENT in {storage.uri} is now {new.version} (was {old.version}); "
        f"{new.model['name']}@{alias} -> v{new.model['version']}"
    )


def store_location(storage) -> str:
    """Where the store is, as the registry's and MLflow's tags say it: its URI, a local
    folder made absolute (a relative one means nothing off this machine's working
    directory)."""
    uri = storage.uri
    return uri if "://" in uri else str(Path(uri).resolve())


def versions(paths: StepPaths) -> str:
    return production.versions_table(production.open_store(paths), SUMMARY_METRICS)


def create_store(paths: StepPaths) -> str:
    """Create an empty production store at `storage.uri` (the `create-store` command)."""
    storage = open_storage(paths.storage, paths.storage_uri)
    if not production.create_store(storage):
        return f"create-store: {storage.uri} already holds a production store; nothing changed"
    return f"create-store: created an empty production store at {storage.uri}"


def remove(paths: StepPaths, listing_ids: list[str], reason: str | None) -> str:
    """Tombstones for `listing_ids` in the production store (the `remove` command): the
    search service stops answering them within serve.poll_s, the next release leaves them
    out. Returns a one-line account."""
    tombstones.checked_ids(listing_ids)  # before the store is read: the ids are wrong
    storage = production.open_store(paths)
    current = production.read_pointer(storage)
    if current is None:
        raise ValueError(f"nothing was promoted to {storage.uri} yet: nothing to remove from")
    written = tombstones.write(storage, listing_ids, reason)
    manifest = production.read_manifest(storage, current.version, current.manifest_sha256)
    local = paths.workdir / ".release-cache" / current.version
    production.download(storage, current.version, manifest, [INDEX_IDS.name], local)
    known = set(read_ids(local / INDEX_IDS.name).listing_ids)
    absent = [listing_id for listing_id in written.listing_ids if listing_id not in known]
    served = len(written.listing_ids) - len(absent)
    unknown = ""
    if absent:
        shown = ", ".join(absent[:10]) + (
            f" and {len(absent) - 10} more" if len(absent) > 10 else ""
        )
        unknown = (
            f"; not in the current release: {shown} (tombstoned all the same: a later release "
            "that lists them leaves them out; python -m components restore undoes it)"
        )
    return (
        f"remove: {len(written.listing_ids)} listing(s) tombstoned in {storage.locate(written.key)}"
        f"; {served} of them in the current release {current.version}, which the search "
        "service stops answering within serve.poll_s; every release leaves them out until "
        f"the catalog drops them or they are restored (python -m components restore){unknown}"
    )


def restore(paths: StepPaths, listing_ids: list[str], reason: str | None) -> str:
    """Undo removals (the `restore` command): the listings leave every tombstone, the
    decision is recorded in the store, and the next release (refresh or retrain) embeds
    them again if the catalog lists them. Returns a one-line account."""
    storage = production.open_store(paths)
    done = tombstones.restore(storage, listing_ids, reason)
    unknown = (
        f"; not removed, nothing to restore: {', '.join(done.not_removed)}"
        if done.not_removed
        else ""
    )
    return (
        f"restore: {len(done.listing_ids)} listing(s) no longer removed, recorded in "
        f"{storage.locate(done.key)}; the service answers them again once a release holds "
        f"them (the next refresh){unknown}"
    )
