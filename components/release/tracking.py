"""MLflow at the edge: one run per training, its params, per-epoch metrics, lineage and plots.

The tracking server is wherever `MLFLOW_TRACKING_URI` says; by default a sqlite file in the
work dir with artifacts beside it, so a local run needs no server.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from components.config import StepPaths
from components.contract import manifest_of
from components.io.manifest import sha256_file

EXPERIMENT = "listing-embeddings"
log = logging.getLogger(__name__)
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def metric_name(key: str) -> str:
    """MLflow metric names allow letters, digits, `_-. /`: `recall@10` -> `recall_at_10`."""
    return re.sub(r"[^\w\-. /]", "_", key.replace("@", "_at_"))


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


class RunLogger:
    """What a training run reports to MLflow; only rank 0 ever holds one."""

    def __init__(self, run) -> None:
        self.run = run

    @property
    def reference(self) -> dict:
        import mlflow

        return {
            "run_id": self.run.info.run_id,
            "experiment_id": self.run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        }

    def log_epoch(self, record: dict) -> None:
        import mlflow

        metrics = {metric_name(k): float(v) for k, v in record.items() if k != "epoch"}
        mlflow.log_metrics(metrics, step=int(record["epoch"]))

    def log_summary(self, best: dict, history_path: Path, history: list[dict]) -> None:
        import mlflow

        mlflow.log_artifact(str(history_path))
        mlflow.log_metrics({f"best/{metric_name(k)}": float(v) for k, v in best.items()})
        mlflow.log_figure(loss_figure(history), "plots/loss_curves.png")


def loss_figure(history: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, recall) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in sorted(k for k in history[0] if k.startswith("train/")):
        losses.plot(epochs, [h[key] for h in history], label=key.removeprefix("train/"))
    losses.set(xlabel="epoch", ylabel="loss", title="training loss terms")
    losses.legend()
    for key in ("val/query_to_listing/recall@10", "val/view_to_listing/recall@10"):
        if key in history[0]:  # a task without queries is absent
            recall.plot(epochs, [h[key] for h in history], label=key.removeprefix("val/"))
    recall.set(xlabel="epoch", ylabel="recall@10", title="validation")
    recall.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure


def recall_figure(curves: list[dict], tasks: tuple[str, ...], n_listings: int):
    """Recall@K curves per task, challenger against champion (K capped at the catalog):
    `curves` has a row per K with `<task>/challenger` and `<task>/champion` values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(10, 4), squeeze=False)
    ks = [min(row["k"], n_listings) for row in curves]
    for axis, task in zip(axes[0], tasks, strict=True):
        for who, marker in (("challenger", "o"), ("champion", "s")):
            if f"{task}/{who}" in curves[0]:
                values = [row[f"{task}/{who}"] for row in curves]
                axis.plot(ks, values, marker=marker, label=who)
        axis.set(xscale="log", xlabel="K", ylabel="recall@K", title=task, ylim=(0, 1))
        axis.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure


@contextmanager
def training_run(
    paths: StepPaths, config: BaseModel, features_manifest: dict, resumed: bool
) -> Iterator[RunLogger]:
    """Start (and always end) an MLflow run with params and lineage tags."""
    import mlflow

    mlflow.set_tracking_uri(paths.mlflow_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = (paths.workdir / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow.set_experiment(EXPERIMENT)
    featurize_manifest = paths.path(manifest_of("featurize"))
    catalog_manifest = paths.path(manifest_of("catalog"))
    tags = {
        "step": "train",
        "resumed": str(resumed),
        "lineage.features_manifest_sha256": sha256_file(featurize_manifest),
        "lineage.catalog": str(features_manifest["inputs"].get("catalog")),
        "lineage.clean_listings_sha256": features_manifest["inputs"]["validate"]
        .get("clean.parquet", {})
        .get("sha256", ""),
    }
    if catalog_manifest.is_file():
        tags["lineage.catalog_manifest_sha256"] = sha256_file(catalog_manifest)
    with mlflow.start_run(
        run_name=f"train-{getattr(config, 'objective', 'model')}",
        tags=tags,
        log_system_metrics=True,
    ) as run:
        mlflow.log_params(flatten(config.model_dump()) | {"seed": str(paths.seed)})
        yield RunLogger(run)


class _NoRun:
    """The RunLogger of ranks other than 0: they train, they do not report."""

    @property
    def reference(self) -> dict:
        return {}

    def log_epoch(self, record: dict) -> None:
        pass

    def log_summary(self, best: dict, history_path: Path, history: list[dict]) -> None:
        pass


@contextmanager
def no_run(*_args, **_kwargs) -> Iterator[_NoRun]:
    yield _NoRun()


def log_evaluation(paths: StepPaths, reference: dict, files: list[Path], metrics: dict) -> None:
    """Test metrics (`test/...`) and report `files` onto the model's training run (when it
    has one)."""
    if not reference.get("run_id"):
        log.info("evaluate: the model has no MLflow run; its metrics are on disk only")
        return
    import mlflow

    mlflow.set_tracking_uri(paths.mlflow_uri)
    with mlflow.start_run(run_id=reference["run_id"]):
        mlflow.log_metrics({f"test/{metric_name(k)}": float(v) for k, v in metrics.items()})
        for path in files:
            mlflow.log_artifact(str(path), "plots" if path.suffix == ".png" else None)
