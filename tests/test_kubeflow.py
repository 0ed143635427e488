"""The Kubeflow pipeline: the committed compiled YAML is what the definition compiles to,
GPU steps carry the accelerator and the GPU pool placement, and the pipeline runs end to
end on kfp's local SubprocessRunner on a tiny catalog."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from components.config import load_params
from components.contract import STEP_ORDER
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

sys.path.insert(0, str(REPO_ROOT / "infra" / "kubeflow"))
import pipeline  # noqa: E402

KUBE = load_params(REPO_ROOT / "params.yaml").orchestration.kubernetes


def test_the_committed_yaml_is_what_the_pipeline_compiles_to(tmp_path):
    fresh = pipeline.compile_pipeline(tmp_path / "compiled.yaml")

    assert fresh.read_text() == pipeline.COMPILED.read_text(), (
        "infra/kubeflow/listing_embeddings_retrain.yaml is stale: "
        "run .venv/bin/python infra/kubeflow/pipeline.py"
    )


def test_gpu_steps_request_accelerators_on_the_gpu_pool():
    documents = list(yaml.safe_load_all(pipeline.COMPILED.read_text()))
    spec, platform = documents[0], documents[1]
    executors = spec["deploymentSpec"]["executors"]
    placement = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STEP_ORDER)
    for step in STEP_ORDER:
        executor = tasks[step]["componentRef"]["name"].replace("comp-", "exec-")
        container = executors[executor]["container"]
        assert container["image"] == KUBE.image
        accelerator = container.get("resources", {}).get("accelerator")
        if step in KUBE.gpu_steps:
            assert accelerator["resourceType"] == KUBE.gpu_resource
            assert accelerator["resourceCount"] == str(KUBE.gpus)
            assert placement[executor]["nodeSelector"]["labels"] == KUBE.gpu_node_selector
            tolerations = placement[executor]["tolerations"]
            assert {t["key"] for t in tolerations} == {t.key for t in KUBE.gpu_tolerations}
        else:
            assert accelerator is None
            assert placement[executor]["nodeSelector"]["labels"] == KUBE.cpu_node_selector
            assert "tolerations" not in placement[executor]


# requests, accelerators and placement only mean something on a cluster
@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner")
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom")
def test_the_pipeline_runs_on_the_local_runner_and_promotes(tmp_path):
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

    pipeline.retrain(
        params_file=str(REPO_ROOT / "params.yaml"),
        overrides=overrides,
        storage_uri=str(store),
        mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )

    current = json.loads((store / "indices" / "CURRENT").read_text())
    promoted = list((tmp_path / "root").glob("*/promote/out/manifest.json"))
    assert len(promoted) == 1
    assert json.loads(promoted[0].read_text())["version"] == current["version"]
    evaluated = list((tmp_path / "root").glob("*/evaluate/out/gates.json"))
    assert evaluated and all(g["passed"] for g in json.loads(evaluated[0].read_text()))
