"""Running one step where upstream outputs arrive as separate folders (Kubeflow artifacts).

A step reads `<workdir>/<upstream step>/` and writes `<workdir>/<step>/`. Here the
workdir is a fresh temporary folder: each upstream folder is linked in under its step
name, the step runs with `paths.workdir` pointing there, and its output folder is copied
to where the orchestrator wants it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from components.config import load_params
from components.contract import STEPS

log = logging.getLogger(__name__)


def run_isolated(
    step: str,
    params_file: str,
    overrides: list[str],
    upstream: dict[str, str],
    output: str,
    storage_uri: str | None = None,
    mlflow_uri: str | None = None,
    shard: str | None = None,
    shard_outputs: list[str] | None = None,
    refresh: bool = False,
) -> str:
    """Run `step` on the `upstream` folders ({step name: path}), copy its output folder to
    `output`, and return its summary. `storage_uri` sets `storage.uri` and `mlflow_uri`
    the tracking server; a temporary workdir can hold neither, so both are needed for a
    real run (None keeps params.yaml's store and a sqlite file in the temporary workdir,
    which is then left in place and logged).

    A sharded step: `shard` ("I/N") runs that shard; `shard_outputs` (the output folders
    of its N shards) gathers them: their files are linked into one step folder first (the
    shards write distinct file names) and the gather writes the step's outputs beside them.

    `refresh`: run the step as part of a refresh (components/refresh.py): with its
    overrides, and without the train step's folder.

    Raises:
        ValueError: `upstream` lacks a step that `step` reads, or names an unknown one.
    """
    from components import refresh as refreshing
    from components.cli import run_step

    reads = refreshing.upstream(step) if refresh and step in STEPS else None
    _check_upstream(step, upstream, reads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix=f"listing-{step}-"))
    settings = [*(refreshing.REFRESH if refresh else ()), *overrides, f"paths.workdir={work}"]
    if storage_uri is not None:
        settings.append(f"storage.uri={storage_uri}")
    try:
        for name, path in upstream.items():
            (work / name).symlink_to(Path(path).resolve(), target_is_directory=True)
        for part in shard_outputs or []:
            shutil.copytree(Path(part).resolve(), work / step, _link, dirs_exist_ok=True)
        gather = None if shard_outputs is None else len(shard_outputs)
        params = load_params(params_file, settings)
        result = run_step(step, params, mlflow_uri, shard=shard, gather=gather)
        shutil.copytree(work / step, output, symlinks=False, ignore=_own_caches(step, work / step))
    finally:
        _clean(work, step, upstream)
    print(result.summary)
    return result.summary


def _own_caches(step: str, root: Path):
    """copytree's ignore: the step's caches that no other step reads (a refresh's copy
    of the release it builds on, train's checkpoints) stay out of its output artifact."""
    read = {artifact for other in STEPS.values() for artifact in other.reads}
    caches = {a.name for a in STEPS[step].writes if a.persistent and a not in read}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return caches & set(names) if Path(folder) == root else set()

    return ignore


def _link(source: str, target: str) -> None:
    """copytree's copy function: link the file instead (a shard's output is read, not changed)."""
    Path(target).symlink_to(source)


def _check_upstream(step: str, upstream: dict[str, str], reads: tuple | None = None) -> None:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps are {list(STEPS)}")
    missing = set(STEPS[step].upstream if reads is None else reads) - set(upstream)
    unknown = set(upstream) - set(STEPS)
    if missing or unknown:
        raise ValueError(
            f"{step}: upstream folders missing for {sorted(missing)}, unknown {sorted(unknown)}"
        )


def _clean(work: Path, step: str, upstream: dict[str, str]) -> None:
    """Remove the links and the step's own folder; what else is there (a local MLflow
    store when no tracking server was given) stays, and is named in the log."""
    for name in upstream:
        (work / name).unlink(missing_ok=True)
    shutil.rmtree(work / step, ignore_errors=True)
    left = sorted(path.name for path in work.iterdir())
    if left:
        log.warning("%s: left %s in %s (no tracking server or store given)", step, left, work)
    else:
        work.rmdir()
