"""`python -m components refresh`: keep the served index current between retrains.

    validate -> featurize (content cache) -> embed (the current release's model, only
    new and changed listings) -> index (the current release's, updated) -> evaluate (the
    same gates on the model's own test split, against the current release; staleness)
    -> promote (only over the release it updated)

A refresh never trains. It is the same step functions as a retrain, with the overrides
(`REFRESH`) that make embed and index build on the current release and leave out
evaluate's diagnostics; the Airflow refresh DAG and the Kubeflow refresh pipeline pass the
same overrides, and its steps read no train output (`upstream`). Here one run holds the workdir
for its whole length, so no other run interleaves with it, and each step runs in a process
of its own (`step_process`), so no step's memory stays with the next. What the model's staleness is
(`evaluate/staleness.json`) ends the summary; a stale model calls for a retrain.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass

from components import step_process
from components.config import REFRESH, Params, StepPaths, with_overrides
from components.contract import STALENESS, StepName
from components.contract import STEPS as CONTRACT
from components.io.manifest import read_manifest, require_run
from components.io.workdir_lock import holding

STEPS: tuple[StepName, ...] = ("validate", "featurize", "embed", "index", "evaluate", "promote")

log = logging.getLogger(__name__)


def upstream(step: StepName) -> tuple[StepName, ...]:
    """The steps whose outputs `step` reads in a refresh: those of a retrain that a
    refresh runs. Not train: the model and its splits come from the release the refresh
    builds on; not catalog: validate reads the configured catalog (`paths.catalog`)."""
    return tuple(name for name in CONTRACT[step].upstream if name in STEPS)


def run_step(step: StepName, params: Params, paths: StepPaths):
    """One step of a refresh, with `params` already holding the refresh's overrides
    (`with_overrides(params, REFRESH)`); returns the step's result."""
    module = importlib.import_module(f"components.{step}")
    return module.run(params.section(step), paths)


def _outcome(step: StepName, params: Params, paths: StepPaths) -> dict:
    """`run_step` in a step's own process: what the refresh keeps of its result."""
    result = run_step(step, params, paths)
    return {
        "summary": result.summary,
        "changed": getattr(result, "changed", None),
        "version": getattr(result, "version", None),
    }


@dataclass(frozen=True)
class RefreshResult:
    summaries: list[str]
    staleness: dict
    counters: dict[str, int]  # what it read and wrote (`_counters`)

    @property
    def summary(self) -> str:
        return "\n".join(self.summaries)


def run(params: Params, tracking_uri: str | None = None) -> RefreshResult:
    """Refresh the production store's current release from today's catalog.

    Raises:
        StepFailed: a step stopped it (too many bad rows, a failed gate): nothing promoted.
        ValueError: nothing was promoted yet to build on, or bad input named by a step.
    """
    params = with_overrides(params, REFRESH)
    paths = StepPaths.from_params(params, tracking_uri)
    summaries = []
    with holding(paths.workdir, "refresh"):
        for step in STEPS:
            log.info("refresh: %s", step)
            result = step_process.call(step, _outcome, step, params, paths)
            summaries.append(result["summary"])
    counters = _counters(paths)
    summaries.append(_cost(counters))
    if not result["changed"]:  # promote's: the current release already is this one
        summaries.append(f"refresh: nothing new since {result['version']}: nothing published")
    found = json.loads(paths.path(STALENESS).read_text())
    if found.get("stale"):
        summaries.append(
            "refresh: the model is stale, retrain it (make run, or the retrain DAG): "
            + "; ".join(found["reasons"])
        )
    return RefreshResult(summaries, found, counters)


def _counters(paths: StepPaths) -> dict[str, int]:
    """What this refresh cost, from its steps' records: listings embedded and reused,
    images opened and bytes read from the catalog (validate and featurize), bytes
    uploaded to the store."""
    embedded = read_manifest(paths.step_dir("embed"))["counts"]
    counters = {key: embedded.get(key, 0) for key in ("reused", "added", "changed", "removed")}
    for step in ("validate", "featurize"):
        reads = require_run(paths.step_dir(step)).get("reads", {})
        counters[f"{step}_images_opened"] = reads.get("images_opened", 0)
        counters[f"{step}_bytes_read"] = reads.get("bytes_read", 0)
    counters["uploaded_bytes"] = require_run(paths.step_dir("promote")).get("uploaded_bytes", 0)
    return counters


def _cost(c: dict[str, int]) -> str:
    read = (c["validate_bytes_read"] + c["featurize_bytes_read"]) / 2**20
    return (
        f"refresh: {c['reused']:,} listings reused, {c['added']:,} added, {c['changed']:,} "
        f"changed, {c['removed']:,} removed; images opened: validate "
        f"{c['validate_images_opened']:,}, featurize {c['featurize_images_opened']:,} "
        f"({read:.1f} MiB read from the catalog); {c['uploaded_bytes'] / 2**20:.1f} MiB "
        "uploaded to the store"
    )
