"""Running one step where upstream outputs arrive as separate folders (Kubeflow artifacts).

A step reads `<workdir>/<upstream step>/` and writes `<workdir>/<step>/`. Here the
workdir is a fresh temporary folder: each upstream folder is linked in under its step
name, the step runs with `paths.workdir` pointing there, and its output folder is copied
to where the orchestrator wants it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from components.config import load_params

log = logging.getLogger(__name__)


def run_isolated(
    step: str,
    params_file: str,
    overrides: list[str],
    upstream: dict[str, str],
    output: str,
    storage_uri: str = "",
    mlflow_uri: str = "",
) -> str:
    """Run `step` on the `upstream` folders ({step name: path}), copy its output folder to
    `output`, and return its summary. `storage_uri` / `mlflow_uri`, when not empty, set
    `storage.uri` and MLFLOW_TRACKING_URI (a temporary workdir cannot hold either)."""
    from components.cli import run_step

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix=f"listing-{step}-"))
    for name, path in upstream.items():
        (work / name).symlink_to(Path(path).resolve(), target_is_directory=True)
    settings = [*overrides, f"paths.workdir={work}"]
    if storage_uri:
        settings.append(f"storage.uri={storage_uri}")
    if mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    result = run_step(step, load_params(params_file, settings))
    shutil.copytree(work / step, output, symlinks=False)
    shutil.rmtree(work / step)
    for name in upstream:
        (work / name).unlink()
    # anything else (a local MLflow store's artifacts) stays where MLflow recorded it
    print(result.summary)
    return result.summary
