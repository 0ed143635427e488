"""The local MLflow tracking store is created whole or not at all: a kill inside its
creation leaves nothing a rerun trips over, and a store left half-created is named in one
line that says how to recover."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from components.cli import main
from components.io.manifest import sha256_file
from components.release import tracking_store
from components.release.tracking_store import BrokenTrackingStore, ensure_whole, head_revision
from tests.conftest import REPO_ROOT, fresh_paths
from tests.harness.creation_kills import kill_during_creation, table_count


def _revision(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("select version_num from alembic_version").fetchone()[0]


def test_a_missing_store_is_created_whole_at_mlflow_s_schema_head(tmp_path):
    db = tmp_path / "work" / "mlflow.db"

    ensure_whole(db)
    ensure_whole(db)  # whole: nothing to do

    assert _revision(db) == head_revision()
    assert sorted(p.name for p in db.parent.iterdir()) == [".mlflow.db.lock", "mlflow.db"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.create_registered_model("listing-encoder")  # MLflow uses it as it is
    assert [m.name for m in client.search_registered_models()] == ["listing-encoder"]


def _half_created(db: Path) -> None:
    """What a kill between MLflow's first tables and its migrations leaves."""
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    InitialBase.metadata.create_all(engine)
    engine.dispose()


def test_a_half_created_store_is_named_in_one_line_with_how_to_recover(
    featurized, tmp_path, capsys
):
    paths = fresh_paths(featurized, tmp_path, "half")
    db = paths.workdir / "mlflow.db"
    _half_created(db)

    with pytest.raises(BrokenTrackingStore) as error:
        ensure_whole(db)
    code = main(["train", "--set", f"paths.workdir={paths.workdir}", "--set", "train.epochs=1"])

    message = str(error.value)
    assert f"{db.resolve()} is a half-created MLflow tracking store" in message
    assert f"holds no runs or models, so remove it (rm {db.resolve()})" in message
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: train: {message}"
    ]
    db.unlink()
    tracking_store._check.cache_clear()
    ensure_whole(db)  # the recovery the message gives works
    assert _revision(db) == head_revision()


def test_a_store_with_runs_at_another_schema_is_not_called_half_created(tmp_path):
    db = tmp_path / "mlflow.db"
    ensure_whole(db)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.create_run(client.create_experiment("kept"))
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("update alembic_version set version_num = 'an-older-revision'")
    tracking_store._check.cache_clear()

    with pytest.raises(BrokenTrackingStore) as error:
        ensure_whole(db)

    assert "holds 1 runs and models at MLflow schema revision an-older-revision" in str(error.value)
    assert f"mlflow db upgrade sqlite:///{db}" in str(error.value)


def test_two_processes_creating_the_same_store_make_one_whole_store(tmp_path):
    db = tmp_path / "shared" / "mlflow.db"
    code = "import sys; from components.release.tracking_store import ensure_whole as e; "
    code += "from pathlib import Path; e(Path(sys.argv[1]))"
    creators = [subprocess.Popen([sys.executable, "-c", code, str(db)]) for _ in range(2)]

    assert [c.wait(timeout=120) for c in creators] == [0, 0]
    assert _revision(db) == head_revision()
    assert not list(db.parent.glob(".mlflow.db.creating-*"))


def _whole_store_tables(tmp_path: Path) -> int:
    db = tmp_path / "reference" / "mlflow.db"
    ensure_whole(db)
    return table_count(db)


def _train(workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "components",
        "train",
        "--set",
        f"paths.workdir={workdir}",
        "--set",
        "train.epochs=2",
    ]


def _kill_inside_creation_then_rerun(featurized, tmp_path, fractions) -> list[str]:
    """For each point (a fraction of a whole store's tables), kill train there on a fresh
    workdir, check that no store was left in place, rerun train to the end and check the
    registry holds exactly what an uninterrupted run registers (version 1 as challenger).
    Returns the model weights' sha256 of each rerun."""
    whole = _whole_store_tables(tmp_path)
    weights = []
    for fraction in fractions:
        paths = fresh_paths(featurized, tmp_path, f"killed-at-{fraction}")
        db = paths.workdir / "mlflow.db"

        tables = kill_during_creation(_train(paths.workdir), REPO_ROOT, db, int(fraction * whole))

        assert tables is not None and not db.exists(), f"no kill inside creation at {fraction}"
        rerun = subprocess.run(_train(paths.workdir), cwd=REPO_ROOT, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
        versions = client.search_model_versions("name='listing-encoder'")
        assert [str(v.version) for v in versions] == ["1"]
        assert (
            str(client.get_model_version_by_alias("listing-encoder", "challenger").version) == "1"
        )
        assert not list(db.parent.glob(".mlflow.db.creating-*"))
        weights.append(sha256_file(paths.workdir / "train" / "model.pt"))
    return weights


@pytest.mark.integration
def test_train_killed_inside_the_store_s_creation_reruns_to_the_same_registered_model(
    featurized, tmp_path
):
    (weights,) = _kill_inside_creation_then_rerun(featurized, tmp_path, [0.6])

    assert len(weights) == 64  # a sha256: the rerun trained and wrote its model


@pytest.mark.slow
@pytest.mark.integration
def test_at_every_stage_of_the_store_s_creation_a_kill_changes_nothing(featurized, tmp_path):
    reference = fresh_paths(featurized, tmp_path, "uninterrupted")
    done = subprocess.run(_train(reference.workdir), cwd=REPO_ROOT, capture_output=True)
    assert done.returncode == 0

    weights = _kill_inside_creation_then_rerun(
        featurized, tmp_path, [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99]
    )

    assert set(weights) == {sha256_file(reference.workdir / "train" / "model.pt")}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.integration
def test_a_moved_workdir_trains_registers_and_serves_from_its_new_place(released, copied, tmp_path):
    from fastapi.testclient import TestClient

    from components import embed, evaluate, index, promote, train
    from components.config import EmbedConfig, IndexConfig, PromoteConfig
    from components.core.encoders import pick_device
    from components.release import registry
    from components.service.server import build
    from tests.harness import refresh
    from tests.test_evaluate import TINY
    from tests.test_promote import EVALUATE
    from tests.test_service import _serve_params

    # `copied` is the released workdir copied: its store names the released one's folders
    elsewhere = _files(released.workdir)
    old = copied.workdir
    moved = tmp_path / "mounted" / "elsewhere"
    moved.parent.mkdir()
    old.rename(moved)
    paths = dataclasses.replace(refresh.at(copied, moved), seed=copied.seed + 1)  # new weights

    train.run(TINY, paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    evaluate.run(EVALUATE, paths)
    promote.run(PromoteConfig(), paths)

    client = mlflow.MlflowClient(tracking_uri=tracking_store.tracking_uri(paths))
    versions = client.search_model_versions("name='listing-encoder'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    for version in versions:  # the one registered before the move too
        where = client.get_model_version_download_uri("listing-encoder", version.version)
        assert where.startswith((moved / "mlartifacts").as_uri())
        uri = f"models:/listing-encoder/{version.version}"
        loaded = registry.load_model(uri, paths, pick_device("cpu"))
        assert loaded.reference["version"] == str(version.version)
    app, _ = build(_serve_params(paths), paths.mlflow_uri, tmp_path / "releases")
    with TestClient(app) as service:
        answer = service.get("/search", params={"q": "smiling face", "k": 5})
    assert answer.status_code == 200 and answer.json()["results"]
    assert not old.exists()  # nothing was written where the workdir was
    assert _files(released.workdir) == elsewhere  # nor where its store was copied from


def test_a_moved_store_rewrites_only_locations_under_its_own_artifact_root(tmp_path):
    first = tmp_path / "first"
    ensure_whole(first / "mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{first / 'mlflow.db'}")
    own = client.create_experiment("own", artifact_location=(first / "mlartifacts/1").as_uri())
    other = (tmp_path / "first" / "mlartifacts-other").as_uri()  # same prefix, not the root
    foreign = client.create_experiment("foreign", artifact_location=other)
    (tmp_path / "moved").mkdir()
    (first / "mlflow.db").rename(tmp_path / "moved" / "mlflow.db")

    moved = tracking_store.follow_workdir((tmp_path / "moved" / "mlflow.db").resolve())

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'moved' / 'mlflow.db'}")
    assert moved == 2  # the Default experiment's and `own`'s
    assert (
        client.get_experiment(own).artifact_location
        == (tmp_path / "moved" / "mlartifacts" / "1").as_uri()
    )
    assert client.get_experiment(foreign).artifact_location == other


LOAD_OFF_A_TERMINAL = """
import sys
from pathlib import Path
from components.cli import quiet_libraries
quiet_libraries()  # as the CLI and an Airflow task do
from components.config import StepPaths
from components.core.encoders import pick_device
from components.release import registry
work = Path(sys.argv[1])
paths = StepPaths(workdir=work, catalog=str(work / "catalog"))
print(registry.load_model("models:/listing-encoder/1", paths, pick_device("cpu")).reference)
"""


@pytest.mark.integration
def test_a_registered_model_loaded_off_a_terminal_draws_no_progress_bar(copied):
    done = subprocess.run(
        [sys.executable, "-c", LOAD_OFF_A_TERMINAL, str(copied.workdir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "'version': '1'" in done.stdout
    assert "Downloading artifacts" not in done.stderr  # a task log would show it as errors
