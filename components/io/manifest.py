"""Step manifests: the two small JSON files every step writes beside its outputs.

`manifest.json` records what went in (hashes), the params section, what came out (sha256
and size of every output) and counts: the same bytes whenever the same inputs give the same
outputs, so DVC can hash it and a rerun on another machine leaves `dvc.lock` as it was. The
next step reads it instead of globals, and lineage (catalog -> features -> model -> index)
is a chain of hashes.

`run.json` records this run's machine-local facts: when it started, how long it took, the
host, rates, the device, the MLflow run and registered version, and the step's summary
line. DVC never hashes it (dvc.yaml does not declare it). It names the sha256 of the
manifest it belongs to, so a record left by another run is never read as this one's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from components.io import hash_cache

MANIFEST_NAME = "manifest.json"
RUN_RECORD = "run.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The file's sha256; read again only if it changed since it was last hashed on this
    machine (components/io/hash_cache.py)."""
    before = os.stat(path)
    if (digest := hash_cache.known(before)) is not None:
        return digest
    hashed = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hashed.update(chunk)
    hash_cache.remember(Path(path), before, hashed.hexdigest())
    return hashed.hexdigest()


def sha256_tree(root: Path) -> str:
    """Content hash of a directory: sha256 over sorted (relative path, file sha256) pairs."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def describe_files(root: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each named output under `root` (a folder gets a tree hash)."""
    described = {}
    for name in names:
        path = root / name
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            described[name] = {
                "sha256": sha256_tree(path),
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
            }
        else:
            described[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return described


class AlteredFile(ValueError):
    """A step's output whose bytes are not the ones its manifest recorded."""


def verify_outputs(step_dir: Path, names: Iterable[str], manifest: dict | None = None) -> dict:
    """Check that each named output in `step_dir` still has the sha256 its step's manifest
    recorded (a folder: its tree hash, so the folder is what gets named) before it is
    used; returns the manifest.

    Raises:
        AlteredFile: naming the first output that is missing or changed.
    """
    manifest = manifest if manifest is not None else read_manifest(step_dir)
    recorded = manifest.get("outputs", {})
    step = manifest.get("step", step_dir.name)
    for name in names:
        path = step_dir / name
        if name not in recorded or not path.exists():
            raise AlteredFile(
                f"{path}: {'missing' if name in recorded else 'not recorded in the manifest'}; "
                f"run the '{step}' step again"
            )
        actual = describe_files(step_dir, [name])[name]["sha256"]
        if actual != recorded[name]["sha256"]:
            raise AlteredFile(
                f"{path}: sha256 {actual[:16]}... is not the {recorded[name]['sha256'][:16]}... "
                f"that {step_dir / MANIFEST_NAME} recorded; it was altered or damaged after "
                f"the '{step}' step wrote it: run that step again"
            )
    return manifest


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Timer:
    """Wall-clock timer for a manifest's `duration_s`."""

    def __init__(self) -> None:
        self.started_at = datetime.now(UTC)
        self._start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self._start, 3)


def write_manifest(
    out_dir: Path,
    *,
    step: str,
    params: BaseModel,
    timer: Timer,
    outputs: dict[str, dict[str, Any]],
    inputs: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """Write `<out_dir>/run.json` (`run`: this run's machine-local facts, with the timer's
    start and duration and the host), then `<out_dir>/manifest.json` (everything else),
    each atomically (temp file + rename); return the manifest's path."""
    manifest = {
        "step": step,
        "params": params.model_dump(mode="json", by_alias=True),
        "inputs": inputs or {},
        "outputs": outputs,
        "counts": counts or {},
        **(extra or {}),
    }
    raw = json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    record = {
        "step": step,
        "manifest_sha256": hashlib.sha256(raw.encode()).hexdigest(),
        "started_at": timer.started_at.isoformat(timespec="seconds"),
        "duration_s": timer.seconds,
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        **(run or {}),
    }
    _replace(out_dir / RUN_RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return _replace(out_dir / MANIFEST_NAME, raw)


def _replace(path: Path, text: str) -> Path:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def read_run(step_dir: Path) -> dict[str, Any] | None:
    """The run record of the step's current manifest; None when there is none, or when
    the one there belongs to another run (DVC restored the manifest from its cache)."""
    try:
        record = json.loads((step_dir / RUN_RECORD).read_text())
        manifest = (step_dir / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        return None
    return record if record.get("manifest_sha256") == hashlib.sha256(manifest).hexdigest() else None


def run_summary(step_dir: Path) -> str:
    """The summary line of the step's run record, or a plain one when there is none."""
    record = read_run(step_dir) or {}
    return record.get("summary") or f"{step_dir.name}: as recorded in {step_dir / MANIFEST_NAME}"


def require_run(step_dir: Path) -> dict[str, Any]:
    """`read_run`, for a caller that cannot go on without it.

    Raises:
        FileNotFoundError: naming the step to run again.
    """
    record = read_run(step_dir)
    if record is None:
        raise FileNotFoundError(
            f"{step_dir / RUN_RECORD} is missing or belongs to another run of the "
            f"'{step_dir.name}' step than its manifest: run that step again"
        )
    return record


def read_manifest(step_dir: Path) -> dict[str, Any]:
    """Read a step's manifest; a missing one is an error naming the step folder."""
    path = step_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the '{step_dir.name}' step first (python -m components "
            f"{step_dir.name})"
        )
    return json.loads(path.read_text())


def unchanged_manifest(
    out_dir: Path, params: BaseModel, inputs: dict[str, Any], outputs: Iterable[str]
) -> dict[str, Any] | None:
    """The step's previous manifest when it was made with these params from these inputs
    and its outputs are still what it wrote; None when the step must run."""
    try:
        manifest = read_manifest(out_dir)
    except FileNotFoundError:
        return None
    if manifest.get("params") != params.model_dump(mode="json", by_alias=True):
        return None
    if manifest.get("inputs") != inputs:
        return None
    names = list(outputs)
    if not all((out_dir / name).exists() for name in names):
        return None
    if describe_files(out_dir, names) != manifest.get("outputs"):
        return None  # changed or damaged since it was written
    return manifest
