"""The Airflow DAG: integrity, a whole `dag.test()` run in local mode on a tiny catalog
(ending with a promoted version), a failed gate that stops promote, and the pod specs of
the kubernetes mode. Airflow runs in its own process with its own AIRFLOW_HOME."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from components.config import load_params
from components.contract import SHARDED_STEPS, STEP_ORDER, STEPS
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

HARNESS = REPO_ROOT / "tests" / "harness" / "airflow_dag.py"
CONFIG = load_params(REPO_ROOT / "params.yaml").orchestration


SHARDS = 2  # featurize and embed in the DAG under test: mapped tasks and a gather


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["orchestration"]["shards"] = SHARDS
    (home / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "LISTING_EMBEDDINGS_PARAMS": str(home / "params.yaml"),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
    env.pop("AIRFLOW_VAR_LISTING_EMBEDDINGS_MODE", None)
    migrate = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    return env


def harness(env: dict, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(HARNESS), *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {"result": json.loads(done.stdout.strip().splitlines()[-1]), "log": done.stdout}


def test_the_dag_imports_cleanly_with_one_task_per_step(airflow_env):
    every = harness(airflow_env, "integrity")["result"]
    found = every["dags"]["listing_embeddings_retrain"]

    assert every["import_errors"] == {}
    assert every["warnings"] == []
    assert every["dag_ids"] == ["listing_embeddings_refresh", "listing_embeddings_retrain"]
    assert set(found["task_ids"]) == {*STEP_ORDER, *(f"{s}_shard" for s in SHARDED_STEPS)}
    # a step's first task runs after the last tasks of the steps whose outputs it reads;
    # a sharded step's shards come first, its gather (the task named after it) last
    first = {s: f"{s}_shard" if s in SHARDED_STEPS else s for s in STEP_ORDER}
    expected = {first[name]: sorted(step.upstream) for name, step in STEPS.items()}
    expected |= {step: [f"{step}_shard"] for step in SHARDED_STEPS}
    assert {step: sorted(ups) for step, ups in found["upstream"].items()} == expected
    assert set(CONFIG.airflow.tags) | {"local"} == set(found["tags"])
    assert set(found["retries"].values()) == {CONFIG.airflow.retries}
    assert found["timeouts"]["train"] == CONFIG.airflow.timeout_minutes["train"] * 60
    assert found["schedule"] == CONFIG.airflow.schedule and found["doc_md"]


def test_the_refresh_dag_runs_the_steps_but_train_then_checks_staleness(airflow_env):
    found = harness(airflow_env, "integrity")["result"]["dags"]["listing_embeddings_refresh"]

    steps = [s for s in STEP_ORDER if s not in ("catalog", "train")]
    assert set(found["task_ids"]) == {
        *steps,
        *(f"{s}_shard" for s in SHARDED_STEPS),
        "staleness",
        "retrain",
    }
    assert found["upstream"]["embed_shard"] == ["featurize", "validate"]  # no train
    assert found["upstream"]["staleness"] == ["promote"]
    assert found["upstream"]["retrain"] == ["staleness"]
    assert found["schedule"] == CONFIG.airflow.refresh_schedule == "0 * * * *"


def _overrides(work: Path, **gates: str) -> list[str]:
    return [
        f"paths.workdir={work}",
        "catalog.max_listings=25",
        "featurize.image_size=96",
        "featurize.workers=2",
        "validate.workers=2",
        "train.epochs=8",
        f"evaluate.gates.min={gates.get('min', '{}')}",
        "evaluate.gates.min_gain_over_frozen={}",
        "evaluate.gates.min_queries=1",  # 25 listings: a handful of test queries
    ]


# about 60 s: with the slow tests (CI runs them after make test)
@pytest.mark.slow
def test_dag_test_runs_every_step_and_ends_with_a_promoted_version(airflow_env, tmp_path):
    work = tmp_path / "work"
    run = harness(airflow_env, "test", json.dumps(_overrides(work)))

    assert run["result"]["state"] == "success", run["log"][-4000:]
    assert set(run["result"]["tasks"].values()) == {"success"}
    for step in SHARDED_STEPS:  # every shard ran, then the gather
        assert sorted((work / step / "shards").iterdir()) == [
            work / step / "shards" / f"{i}-of-{SHARDS}" for i in range(SHARDS)
        ]
        assert json.loads((work / step / "manifest.json").read_text())["counts"]["shards"] == 2
    current = json.loads((work / "production" / "indices" / "CURRENT").read_text())
    promoted = json.loads((work / "promote" / "run.json").read_text())
    assert current["version"] == promoted["version"]
    released = work / "production" / "indices" / current["version"] / "manifest.json"
    assert json.loads(released.read_text())["trigger"] == "manual"  # dag.test: a manual run

    # a failed gate: evaluate fails with the gate table in its log, promote never runs
    strict = '{"query_to_listing/recall@10": 1.01}'  # above any recall: the gate fails
    failed = harness(airflow_env, "test", json.dumps(_overrides(work, min=strict)))

    tasks = failed["result"]["tasks"]
    assert failed["result"]["state"] == "failed"
    assert tasks["evaluate"] == "failed" and tasks["promote"] == "upstream_failed"
    assert all(tasks[step] == "success" for step in STEP_ORDER[:-2])
    assert "min:query_to_listing/recall@10" in failed["log"] and "FAIL" in failed["log"]
    assert json.loads((work / "production" / "indices" / "CURRENT").read_text()) == current

    # the refresh DAG on the same workdir, two listings retitled since: a release of kind
    # refresh, and (nothing new allowed) the retrain DAG started with the reason in its conf
    listings = work / "catalog" / "listings.parquet"
    rows = pq.read_table(listings).to_pylist()
    for row in rows[:2]:
        row["title"] += " (second edition)"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(listings)), listings)
    stale = [*_overrides(work), "evaluate.staleness.max_new_share=0"]
    refreshed = harness(airflow_env, "test", json.dumps(stale), "listing_embeddings_refresh")

    assert refreshed["result"]["state"] == "success", refreshed["log"][-4000:]
    tasks = refreshed["result"]["tasks"]
    assert tasks["embed"] == tasks["staleness"] == tasks["retrain"] == "success"
    (started,) = refreshed["result"]["triggered"]
    trigger = started["conf"]["trigger"]  # what the retrain records as why it ran
    assert trigger.startswith("staleness: ") and "max_new_share" in trigger
    pointer = json.loads((work / "production" / "indices" / "CURRENT").read_text())
    manifest = work / "production" / "indices" / pointer["version"] / "manifest.json"
    assert json.loads(manifest.read_text())["kind"] == "refresh"


def test_kubernetes_mode_renders_pods_with_the_image_gpus_and_tolerations(airflow_env):
    rendered = harness(airflow_env, "render")["result"]
    kube = CONFIG.kubernetes

    assert rendered["types"] == ["KubernetesPodOperator"]
    # each pod gets the run's trigger before the run's overrides, as the CLI parses it
    overrides = {name: json.loads(text) for name, text in rendered["overrides"].items()}
    assert overrides["scheduled"] == ['trigger="schedule"']
    assert overrides["backfill"] == ['trigger="backfill"']
    assert overrides["conf"][1:] == ["seed=3"]
    parsed = load_params(REPO_ROOT / "params.yaml", overrides["conf"])
    assert (parsed.trigger, parsed.seed) == ("staleness: it's 30% <new>", 3)
    shards = {f"{s}_shard[{i}]": s for s in SHARDED_STEPS for i in range(SHARDS)}
    assert set(rendered["pods"]) == set(STEP_ORDER) | set(shards)
    for task, pod in rendered["pods"].items():
        step = shards.get(task, task)
        spec = pod["spec"]
        (container,) = spec["containers"]
        assert container["image"] == kube.image
        assert container["command"] == ["python", "-m", "components", step]
        assert "--params" in container["args"] and "--set-json" in container["args"]
        if task in shards:  # one shard per pod; the step's own task gathers them, on a CPU node
            assert container["args"][-2:] == ["--shard", f"{task[-2]}/{SHARDS}"]
        elif step in SHARDED_STEPS:
            assert container["args"][-2:] == ["--gather", str(SHARDS)]
            assert spec["nodeSelector"] == kube.cpu_node_selector
            continue
        assert spec["serviceAccountName"] == kube.service_account
        assert pod["metadata"]["namespace"] == kube.namespace
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [kube.work_volume_claim]
        limits = (container.get("resources") or {}).get("limits") or {}
        if step in kube.gpu_steps:
            assert limits == {kube.gpu_resource: str(kube.gpus)}
            assert spec["nodeSelector"] == kube.gpu_node_selector
            assert {t["key"] for t in spec["tolerations"]} == {t.key for t in kube.gpu_tolerations}
        else:
            assert kube.gpu_resource not in limits
            assert spec["nodeSelector"] == kube.cpu_node_selector
            assert not spec.get("tolerations")


def test_kubernetes_mode_launches_multi_node_training_as_a_pytorchjob(airflow_env, tmp_path):
    params = yaml.safe_load(Path(airflow_env["LISTING_EMBEDDINGS_PARAMS"]).read_text())
    params["orchestration"]["kubernetes"]["train_nodes"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **airflow_env,
        "LISTING_EMBEDDINGS_PARAMS": str(tmp_path / "params.yaml"),
        "AIRFLOW_VAR_LISTING_EMBEDDINGS_MODE": "kubernetes",
    }

    found = harness(env, "integrity")["result"]

    assert found["import_errors"] == {}
    ours = [w for w in found["warnings"] if "site-packages" not in w]  # not the provider's
    assert ours == []
    upstream = found["dags"]["listing_embeddings_retrain"]["upstream"]
    assert upstream["train_launch"] == sorted(STEPS["train"].upstream)  # after featurize's gather
    assert upstream["train"] == ["train_launch"]  # waits for the job to end
    assert "train" in upstream["embed_shard"] and "train_launch" not in upstream["embed_shard"]

    # the task itself, against an API server on 127.0.0.1: the job it creates, then a retry
    launched = harness(env, "launch", json.dumps(["train.epochs=3"]))["result"]

    first, retry = launched["requests"]
    kube = load_params(tmp_path / "params.yaml").orchestration.kubernetes
    assert first["method"] == "POST"
    assert first["path"] == f"/apis/kubeflow.org/v1/namespaces/{kube.namespace}/pytorchjobs"
    job = first["body"]
    assert job["kind"] == "PyTorchJob" and job["metadata"]["name"].endswith("20261201t030000")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2  # train_nodes reached the job
    assert job["spec"]["elasticPolicy"]["maxReplicas"] == 2
    (container,) = worker["template"]["spec"]["containers"]
    assert container["args"][-2] == "--set-json"  # the run's overrides
    assert json.loads(container["args"][-1]) == ['trigger="manual"', "train.epochs=3"]
    assert retry["body"] == job  # a retried task sends the same job; its 409 is not an error
    assert launched["returned"] == [job["metadata"]["name"]] * 2


TASK_LOGGING = """
import sys
from dags.listing_embeddings_tasks import run_local_step  # Airflow sets up its logging
run_local_step("validate", sys.argv[1], sys.argv[2:])
"""


def test_a_task_logs_progress_at_info_and_no_library_chatter(airflow_env, make_catalog, tmp_path):
    from tests.conftest import listing

    catalog = make_catalog([listing(f"l{i}") for i in range(4)])
    overrides = [
        f"paths.workdir={tmp_path / 'work'}",
        f"paths.catalog={catalog}",
        "validate.min_clean_listings=0",
        "validate.require_eval_queries=false",
    ]
    params = airflow_env["LISTING_EMBEDDINGS_PARAMS"]
    done = subprocess.run(
        [sys.executable, "-c", TASK_LOGGING, params, *overrides],
        env=airflow_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    # progress as info records of its own logger, never a bar on stderr
    assert re.search(
        r"\[info\s*\] validate: images read: 100%.*\[components\.progress\]", done.stdout
    )
    assert "%|" not in done.stderr
    assert "Skipping registering function" not in done.stdout + done.stderr  # 170 lines before
    assert "[error" not in done.stdout and not done.stderr.strip()


def test_with_an_operator_catalog_the_retrain_starts_at_validate(airflow_env, tmp_path):
    params = yaml.safe_load(Path(airflow_env["LISTING_EMBEDDINGS_PARAMS"]).read_text())
    params["paths"]["catalog"] = str(tmp_path / "their-catalog")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**airflow_env, "LISTING_EMBEDDINGS_PARAMS": str(tmp_path / "params.yaml")}

    found = harness(env, "integrity")["result"]["dags"]["listing_embeddings_retrain"]

    assert "catalog" not in found["task_ids"]
    assert found["upstream"]["validate"] == []  # first: nothing builds the sample


def test_a_catalog_task_of_a_run_given_an_operator_catalog_builds_nothing(airflow_env, tmp_path):
    code = (
        "import sys\n"
        "from dags.listing_embeddings_tasks import run_local_step\n"
        "print(run_local_step('catalog', sys.argv[1], sys.argv[2:])['summary'])\n"
    )
    work = tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            airflow_env["LISTING_EMBEDDINGS_PARAMS"],
            f"paths.workdir={work}",
            f"paths.catalog={tmp_path / 'theirs'}",
        ],
        env=airflow_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert "catalog: not built: the run reads paths.catalog=" in done.stdout
    assert not (work / "catalog").exists()
