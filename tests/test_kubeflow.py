"""The Kubeflow pipeline: the committed compiled YAML is what the definition compiles to,
GPU steps carry the accelerator and the GPU pool placement, and the pipeline runs end to
end on kfp's local SubprocessRunner on a tiny catalog."""

from __future__ import annotations

import json
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from components import refresh
from components.cli import main
from components.config import load_params
from components.contract import SHARDED_STEPS, STEP_ORDER
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

sys.path.insert(0, str(REPO_ROOT / "infra" / "kubeflow"))
import pipeline  # noqa: E402

KUBE = load_params(REPO_ROOT / "params.yaml").orchestration.kubernetes


@pytest.mark.parametrize("name", ["retrain", "refresh"])
def test_the_committed_yaml_is_what_the_pipeline_compiles_to(tmp_path, name):
    committed = pipeline.COMPILED if name == "retrain" else pipeline.COMPILED_REFRESH
    fresh = pipeline.compile_pipeline(tmp_path / "compiled.yaml", getattr(pipeline, name))

    assert fresh.read_text() == committed.read_text(), (
        f"{committed.relative_to(REPO_ROOT)} is stale: "
        "run .venv/bin/python infra/kubeflow/pipeline.py"
    )


def test_the_refresh_pipeline_has_no_train_and_builds_on_the_release():
    spec = yaml.safe_load_all(pipeline.COMPILED_REFRESH.read_text()).__next__()
    tasks = spec["root"]["dag"]["tasks"]
    steps = {name for name in tasks if not name.startswith("for-loop-")}
    assert steps == {"validate", "featurize", "embed", "index", "evaluate", "promote"}
    for name in ("embed", "evaluate", "promote"):  # what a retrain reads from train
        gathered = {"shards"} if name in SHARDED_STEPS else set()
        assert set(tasks[name]["inputs"]["artifacts"]) == {*refresh.upstream(name), *gathered}
        assert "train" not in refresh.upstream(name)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        source = " ".join(executor["container"]["command"])
        assert "refresh=True" in source, name  # the refresh's overrides, in every component


def test_gpu_steps_request_accelerators_on_the_gpu_pool():
    documents = list(yaml.safe_load_all(pipeline.COMPILED.read_text()))
    spec, platform = documents[0], documents[1]
    executors = spec["deploymentSpec"]["executors"]
    placement = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    loops = {name for name in tasks if name.startswith("for-loop-")}
    assert set(tasks) == set(STEP_ORDER) | loops and len(loops) == len(SHARDED_STEPS)
    # each sharded step: its shards in a ParallelFor, its own task gathers them (on CPU)
    inner = [spec["components"][tasks[loop]["componentRef"]["name"]]["dag"] for loop in loops]
    shards = {
        name.removesuffix("-shard"): task for dag in inner for name, task in dag["tasks"].items()
    }
    assert set(shards) == set(SHARDED_STEPS)
    placed = [(tasks[s], s in KUBE.gpu_steps and s not in SHARDED_STEPS) for s in STEP_ORDER]
    placed += [(shards[s], s in KUBE.gpu_steps) for s in SHARDED_STEPS]
    for task, gpu in placed:
        executor = task["componentRef"]["name"].replace("comp-", "exec-")
        container = executors[executor]["container"]
        assert container["image"] == KUBE.image
        accelerator = container.get("resources", {}).get("accelerator")
        if gpu:
            assert accelerator["resourceType"] == KUBE.gpu_resource
            assert accelerator["resourceCount"] == str(KUBE.gpus)
            assert placement[executor]["nodeSelector"]["labels"] == KUBE.gpu_node_selector
            tolerations = placement[executor]["tolerations"]
            assert {t["key"] for t in tolerations} == {t.key for t in KUBE.gpu_tolerations}
        else:
            assert accelerator is None
            assert placement[executor]["nodeSelector"]["labels"] == KUBE.cpu_node_selector
            assert "tolerations" not in placement[executor]


# requests, accelerators and placement only mean something on a cluster; about 100 s, so
# with the slow tests (CI runs them after make test)
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner")
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom")
def test_the_pipelines_run_on_the_local_runner_retrain_then_refresh(tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    store = tmp_path / "store"
    overrides = [
        "catalog.max_listings=25",
        "featurize.image_size=96",
        "featurize.workers=2",
        "validate.workers=2",
        "train.epochs=8",
        "evaluate.gates.min={}",
        "evaluate.gates.min_gain_over_frozen={}",
        "evaluate.gates.min_queries=1",  # 25 listings: a handful of test queries
    ]

    assert main(["create-store", "--set", f"storage.uri={store}"]) == 0  # once, by the team

    pipeline.build_pipeline(shards=2)(
        params_file=str(REPO_ROOT / "params.yaml"),
        overrides=overrides,
        storage_uri=str(store),
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )

    current = json.loads((store / "indices" / "CURRENT").read_text())
    promoted = list((tmp_path / "root").glob("*/promote/out/run.json"))
    assert len(promoted) == 1
    assert json.loads(promoted[0].read_text())["version"] == current["version"]
    for step in SHARDED_STEPS:  # two shards ran, and the step's own task gathered them
        (gathered,) = (tmp_path / "root").glob(f"*/{step}/out/manifest.json")
        assert json.loads(gathered.read_text())["counts"]["shards"] == 2
        assert (
            len(list((tmp_path / "root").glob(f"*/for-loop-*/{step}-shard/out/shards/*-of-2"))) == 2
        )
    evaluated = list((tmp_path / "root").glob("*/evaluate/out/gates.json"))
    assert evaluated and all(g["passed"] for g in json.loads(evaluated[0].read_text()))

    # the refresh pipeline on the same store and registry, the catalog changed since: no
    # train step, one listing added and one retitled, embedded with the release's model
    catalog = tmp_path / "catalog"
    (built,) = (tmp_path / "root").glob("*/catalog/out")
    shutil.copytree(built, catalog)
    table = pq.read_table(catalog / "listings.parquet")
    rows = table.to_pylist()
    rows[0]["title"] += " (second edition)"
    rows.append(dict(rows[1], listing_id="brand-new", title=f"New: {rows[1]['title']}"))
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), catalog / "listings.parquet")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "again"))

    pipeline.build_refresh_pipeline(shards=2)(
        params_file=str(REPO_ROOT / "params.yaml"),
        overrides=[*overrides, f"paths.catalog={catalog}"],
        storage_uri=str(store),
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )

    refreshed = json.loads((store / "indices" / "CURRENT").read_text())
    release = json.loads((store / "indices" / refreshed["version"] / "manifest.json").read_text())
    assert release["kind"] == "refresh" and release["built_on"] == current["version"]
    assert (release["delta"]["added"], release["delta"]["changed"]) == (1, 1)
    assert not list((tmp_path / "again").glob("*/train"))
    (embedded,) = (tmp_path / "again").glob("*/embed/out")
    assert not (embedded / "base").exists()  # the release's copy stays out of the artifact
