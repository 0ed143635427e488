"""MLflow at the edge: one run per training, its params, per-epoch metrics, lineage and
plots, and one run per evaluation nested in it.

What made the model is on its training run: the train params (`train.*`), the featurize
params that made its features (`featurize.*`: encoders, image size, text views), the seed,
and tags for the catalog (`lineage.catalog`, the sha256 of its files), the features, the
code (`code.*`) and why the run ran (`trigger`). Each evaluation is a child run named
`evaluate-retrain` or `evaluate-refresh` (tags `kind`, `trigger`) carrying the test metrics
under the names of the evaluate step's files, mapped only by `metric_name` (MLflow refuses
`@`: `query_to_listing/recall@10` -> `query_to_listing/recall_at_10`); promote tags the
evaluation it shipped with the release version.

The tracking server is wherever `MLFLOW_TRACKING_URI` says; by default a sqlite file in the
work dir with artifacts beside it, so a local run needs no server.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from pydantic import BaseModel

from components.config import StepPaths
from components.contract import manifest_of
from components.io.manifest import package_versions, sha256_file
from components.release.tracking_store import tracking_uri

EXPERIMENT = "listing-embeddings"
log = logging.getLogger(__name__)
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def metric_name(key: str) -> str:
    """The MLflow name of a metric of the steps' files, the one mapping between the two:
    MLflow allows letters, digits and `_-. /:`, so `recall@10` -> `recall_at_10`."""
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
    """Recall@K curves per task, the model against the frozen encoders and the champion
    (K capped at the catalog): `curves` has a row per K with `<task>/model`, and where
    known `<task>/frozen` and `<task>/champion` values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(10, 4), squeeze=False)
    ks = [min(row["k"], n_listings) for row in curves]
    for axis, task in zip(axes[0], tasks, strict=True):
        for who, marker in (("model", "o"), ("frozen", "^"), ("champion", "s")):
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
    """Start (and always end) an MLflow run with what made the model: the train and
    featurize params, and lineage and code tags."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(paths))
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = (paths.workdir / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow.set_experiment(EXPERIMENT)
    featurize_manifest = paths.path(manifest_of("featurize"))
    inputs = features_manifest["inputs"]
    tags = {
        "step": "train",
        "trigger": paths.trigger,
        "resumed": str(resumed),
        "lineage.features_manifest_sha256": sha256_file(featurize_manifest),
        "lineage.catalog": str(inputs.get("catalog")),
        "lineage.clean_listings_sha256": inputs["validate"]
        .get("clean.parquet", {})
        .get("sha256", ""),
        **{
            f"lineage.catalog_sha256.{name}": str(digest)
            for name, digest in (inputs.get("catalog_sha256") or {}).items()
        },
        **{f"code.{key}": str(value) for key, value in code_version().items()},
    }
    params = {
        **flatten(config.model_dump(), "train."),
        **flatten(features_manifest["params"], "featurize."),
        "seed": str(paths.seed),
    }
    with mlflow.start_run(
        run_name=f"train-{getattr(config, 'objective', 'model')}",
        tags=tags,
        log_system_metrics=True,
    ) as run:
        mlflow.log_params(params)
        yield RunLogger(run)


@cache
def code_version() -> dict[str, str | None]:
    """The code that ran: the package's version and, in a git checkout, its commit and
    whether the tree had uncommitted changes."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            answer = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return answer.stdout.strip() if answer.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "package": package_versions(["listing-embeddings"])["listing-embeddings"],
        "git_commit": commit,
        "git_dirty": None if dirty is None else str(bool(dirty)).lower(),
    }


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


def log_evaluation(
    paths: StepPaths, reference: dict, files: list[Path], metrics: dict, passed: bool, kind: str
) -> dict | None:
    """An evaluation run nested in the model's training run (when it has one), named and
    tagged by `kind` (the release it evaluates: retrain or refresh) and the run's trigger:
    the test `metrics` under their `metric_name`s, the report `files`, and whether the
    gates passed. Returns its reference (for the run record and promote), else None."""
    if not reference.get("run_id"):
        log.info("evaluate: the model has no MLflow run; its metrics are on disk only")
        return None
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(paths))
    parent = mlflow.MlflowClient().get_run(reference["run_id"])
    tags = {"step": "evaluate", "kind": kind, "trigger": paths.trigger}
    with mlflow.start_run(
        run_name=f"evaluate-{kind}",
        experiment_id=parent.info.experiment_id,
        parent_run_id=reference["run_id"],
        nested=True,
        tags=tags | {"gates_passed": str(passed).lower()},
    ) as run:
        mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()})
        for path in files:
            mlflow.log_artifact(str(path), "plots" if path.suffix == ".png" else None)
    return {"run_id": run.info.run_id, "parent_run_id": reference["run_id"]}


def tag_release(paths: StepPaths, evaluation: dict | None, tags: dict[str, str]) -> None:
    """Tag the evaluation run a release shipped with (the release's version and store)."""
    if not evaluation:
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(paths))
    for key, value in tags.items():
        client.set_tag(evaluation["run_id"], key, value)
