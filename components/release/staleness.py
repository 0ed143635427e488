"""Staleness, measured by every refresh: how far today's catalog is from the one the
current model was trained on, and whether a retrain is due.

Three measures, each against the model's training release (the retrain release a chain of
refreshes builds on): the share of today's listings that are new or changed since then
(by fingerprint), a drift test of today's catalog profile against the training profile
(core/drift.py), and each task's recall@10 now against its value at training. Past any of
`evaluate.staleness`'s thresholds the model is stale; the refresh DAG then starts the
retrain DAG with the reasons.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from components.config import StalenessConfig, StepPaths
from components.contract import EMBEDDED_IDS, PROFILE
from components.core.drift import mmd_test
from components.core.retrieval import TASKS
from components.release import base_release, production


def measure(
    paths: StepPaths,
    base_version: str,
    embedded_ids: Path,
    profile: np.ndarray,
    metrics: dict,
    config: StalenessConfig,
    cache: Path,
) -> dict:
    """The staleness of today's catalog (`embedded_ids`: its listing ids and fingerprints,
    `profile`, `metrics`) for the model of release `base_version`."""
    storage = production.open_store(paths)
    base = production.read_manifest(storage, base_version)
    trained_on = base.get("trained_on") or base_version
    training = base_release.version(paths, trained_on, cache, (EMBEDDED_IDS.name, PROFILE.name))
    found = {"trained_on": trained_on, "new_or_changed": _new_share(training.local, embedded_ids)}
    reasons = []
    if found["new_or_changed"] is not None and found["new_or_changed"] > config.max_new_share:
        reasons.append(
            f"{found['new_or_changed']:.1%} of the listings are new or changed since "
            f"{trained_on} (evaluate.staleness.max_new_share {config.max_new_share:.0%})"
        )
    then = (
        np.load(training.local / PROFILE.name)
        if training.local.joinpath(PROFILE.name).is_file()
        else None
    )
    if then is not None and then.shape[1] != profile.shape[1]:
        reasons.append(f"the catalog profile's encoders changed since {trained_on}")
    elif then is not None:
        test = mmd_test(then, profile, config.permutations)
        found["drift"] = {"mmd2": test.mmd2, "p_value": test.p_value, "sizes": test.sizes}
        if test.p_value < config.drift_alpha:
            reasons.append(
                f"the catalog drifted from {trained_on}'s: drift test p = {test.p_value:.4f} "
                f"< evaluate.staleness.drift_alpha {config.drift_alpha}"
            )
    found["recall"] = {}
    for task in TASKS:
        key = f"{task}/recall@10"
        then, now = training.manifest.get("metrics", {}).get(key), metrics.get(key)
        if then is None or now is None:
            continue
        found["recall"][task] = {"at_training": then, "now": now, "drop": then - now}
        if then - now > config.max_recall_drop:
            reasons.append(
                f"{key} fell from {then:.3f} at training to {now:.3f} "
                f"(evaluate.staleness.max_recall_drop {config.max_recall_drop})"
            )
    return found | {"stale": bool(reasons), "reasons": reasons}


def _new_share(training: Path, embedded_ids: Path) -> float | None:
    """Share of today's listings whose id or fingerprint the training catalog lacks; None
    when it recorded no fingerprints (a release made before they were)."""
    then = pq.read_table(training / EMBEDDED_IDS.name)
    if "fingerprint" not in then.column_names:
        return None
    prints = then.column("fingerprint").to_pylist()
    known = set(zip(then.column("listing_id").to_pylist(), prints, strict=True))
    now = pq.read_table(embedded_ids, columns=["listing_id", "fingerprint"])
    pairs = list(zip(*(now.column(c).to_pylist() for c in now.column_names), strict=True))
    return sum(1 for pair in pairs if pair not in known) / max(1, len(pairs))


def flat(found: dict) -> dict[str, float]:
    """The numbers of a staleness measure as flat metrics (`staleness/...`)."""
    out = {"staleness/stale": found["stale"]}
    if found["new_or_changed"] is not None:
        out["staleness/new_or_changed"] = found["new_or_changed"]
    if "drift" in found:
        out |= {"staleness/drift_mmd2": found["drift"]["mmd2"]}
        out |= {"staleness/drift_p_value": found["drift"]["p_value"]}
    for task, recall in found["recall"].items():
        out[f"staleness/{task}/recall@10_drop"] = recall["drop"]
    return {k: float(v) for k, v in out.items()}
