"""Airflow DAG `listing_embeddings_retrain`: the retraining pipeline, one task per step.

Wiring only: every task runs the same function as `python -m components <step>`, after
the tasks of the steps whose outputs it reads (`components.contract`).
Schedule, retries, timeouts, tags and the Kubernetes settings come from the
`orchestration` section of params.yaml (`LISTING_EMBEDDINGS_PARAMS`, default the
repository's). Two modes, from the Airflow Variable `listing_embeddings_mode` given in the
environment (`AIRFLOW_VAR_LISTING_EMBEDDINGS_MODE`; default `orchestration.airflow.mode`):

- `local`: each task runs its step in the worker, in-process;
- `kubernetes`: each task is a KubernetesPodOperator running the project image; the
  steps in `orchestration.kubernetes.gpu_steps` request GPUs on the GPU node pool.

With `orchestration.kubernetes.train_nodes` > 1 (kubernetes mode), `train_launch` creates
the train step's PyTorchJob (components/cluster.py) and `train` waits for it to end.

featurize and embed run in `orchestration.shards` shards: a mapped task `<step>_shard`
(dynamic task mapping over the shard indices, one pod each in kubernetes mode, side by
side as the executor allows) and then the task `<step>`, which gathers them
(`python -m components <step> --shard I/N`, then `--gather N`).

Run-time DAG params: `overrides` (a list of `section.key=value`, as `--set`), and
`params_file` (local mode). A failed gate fails `evaluate` (in local mode without retries)
with the gate table in its log; `promote` then never runs (Airflow marks it
`upstream_failed`) and the DAG run is failed, so alerts fire. Every step is idempotent,
so a retrain can be cleared and re-run.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowFailException

from components.cluster import POD_PARAMS, POD_WORKDIR
from components.config import OrchestrationConfig, load_params
from components.contract import SHARDED_STEPS, STEPS

DAG_ID = "listing_embeddings_retrain"
PARAMS_FILE = os.environ.get(
    "LISTING_EMBEDDINGS_PARAMS", str(Path(__file__).resolve().parents[1] / "params.yaml")
)
MODE_VARIABLE = "AIRFLOW_VAR_LISTING_EMBEDDINGS_MODE"


def run_local_step(
    step: str,
    params_file: str,
    overrides: list[str],
    shard: str | None = None,
    gather: int | None = None,
) -> dict:
    """Run one step (or one shard of it, or its gather) in this process; a StepFailed (a
    failed gate, too many bad rows) fails the task without retries, with its report in
    the log."""
    from components.cli import run_step
    from components.errors import StepFailed

    params = load_params(params_file, overrides)
    try:
        tracking = os.environ.get("MLFLOW_TRACKING_URI")
        result = run_step(step, params, tracking, shard=shard, gather=gather)
    except StepFailed as err:
        if err.report:
            print(err.report)
        raise AirflowFailException(f"{step} failed: {err}") from err
    print(result.summary)
    return {"step": step, "summary": result.summary}


def _local_tasks(step: str, defaults: dict, shards: int):
    """The local-mode task(s) of a step: (first, last); a sharded step's first is its
    mapped shard task, its last the gather."""

    @task(task_id=step, **defaults)
    def run(params=None) -> dict:
        gather = shards if step in SHARDED_STEPS else None
        return run_local_step(step, params["params_file"], list(params["overrides"]), None, gather)

    if step not in SHARDED_STEPS:
        single = run()
        return single, single

    @task(task_id=f"{step}_shard", **defaults)
    def run_shard(index: int, params=None) -> dict:
        shard = f"{index}/{shards}"
        return run_local_step(step, params["params_file"], list(params["overrides"]), shard)

    mapped, gathered = run_shard.expand(index=list(range(shards))), run()
    mapped >> gathered
    return mapped, gathered


def _pod_tasks(step: str, config: OrchestrationConfig, defaults: dict):
    """The kubernetes-mode task(s) of a step: (first, last), as `_local_tasks`."""
    if step == "train" and config.kubernetes.train_nodes > 1:
        return _training_job_tasks(config, defaults)
    if step not in SHARDED_STEPS:
        single = pod_operator(step, config, defaults)
        return single, single
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    shards = config.shards
    settings = pod_settings(step, config)
    mapped = KubernetesPodOperator.partial(task_id=f"{step}_shard", **settings, **defaults).expand(
        arguments=[[*step_arguments(), "--shard", f"{i}/{shards}"] for i in range(shards)]
    )
    gathered = KubernetesPodOperator(
        task_id=step,
        arguments=[*step_arguments(), "--gather", str(shards)],
        **pod_settings(step, config, gpu=False),  # a gather moves files: no GPU
        **defaults,
    )
    mapped >> gathered
    return mapped, gathered


def _training_job_tasks(config: OrchestrationConfig, defaults: dict):
    """Multi-node training: create the run's PyTorchJob, then wait for it to end."""
    kube = config.kubernetes
    deadline = int(defaults["execution_timeout"].total_seconds())

    @task(task_id="train_launch", **defaults)
    def launch(params=None, ts_nodash=None) -> str:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.client.exceptions import ApiException

        from components.cluster import API_GROUP, API_VERSION, PLURAL, job_name, pytorch_job

        # a task's own arguments are not templated: the overrides go in as they are
        arguments = step_arguments(json.dumps(list(params["overrides"])))
        body = pytorch_job(config, job_name(ts_nodash), arguments, deadline)
        client = KubernetesHook().custom_object_client
        try:
            client.create_namespaced_custom_object(
                API_GROUP, API_VERSION, kube.namespace, PLURAL, body
            )
        except ApiException as err:
            if err.status != 409:  # 409: an earlier try of this run created it already
                raise
        return body["metadata"]["name"]

    @task.sensor(task_id="train", poke_interval=60, timeout=deadline, mode="reschedule", **defaults)
    def finished(ts_nodash=None) -> bool:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        from components.cluster import API_GROUP, API_VERSION, PLURAL, job_name, job_state

        name = job_name(ts_nodash)
        client = KubernetesHook().custom_object_client
        job = client.get_namespaced_custom_object(
            API_GROUP, API_VERSION, kube.namespace, PLURAL, name
        )
        state = job_state(job)
        if state == "Failed":
            raise AirflowFailException(
                f"PyTorchJob {name} failed: kubectl describe pytorchjob {name}"
            )
        return state == "Succeeded"

    launched, done = launch(), finished()
    launched >> done
    return launched, done


def step_arguments(overrides_json: str = "{{ params.overrides | tojson }}") -> list[str]:
    """What every step's container gets after `python -m components <step>`; the run's
    overrides as JSON (by default the template that renders them into an operator)."""
    return [
        "--params",
        POD_PARAMS,
        "--set",
        f"paths.workdir={POD_WORKDIR}/artifacts",
        "--set-json",
        overrides_json,
    ]


def pod_operator(step: str, config: OrchestrationConfig, defaults: dict):
    """The KubernetesPodOperator of one step: the project image, the shared workdir volume,
    params.yaml from a ConfigMap, GPUs and the GPU node pool for GPU steps."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    return KubernetesPodOperator(
        task_id=step, arguments=step_arguments(), **pod_settings(step, config), **defaults
    )


def pod_settings(step: str, config: OrchestrationConfig, gpu: bool | None = None) -> dict:
    """The KubernetesPodOperator arguments of a step's pods but the task id and the
    container arguments (`gpu`: None places GPU steps on the GPU pool)."""
    from kubernetes.client import models as k8s

    kube = config.kubernetes
    gpu = step in kube.gpu_steps if gpu is None else gpu
    requests = dict(kube.gpu_step_resources if gpu else kube.cpu)
    limits = {kube.gpu_resource: str(kube.gpus)} if gpu else {}
    tolerations = [k8s.V1Toleration(**t.model_dump()) for t in kube.gpu_tolerations] if gpu else []
    return dict(
        name=f"listing-embeddings-{step}",
        namespace=kube.namespace,
        image=kube.image,
        cmds=["python", "-m", "components", step],
        env_vars=dict(kube.env),
        container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits or None),
        node_selector=dict(kube.gpu_node_selector if gpu else kube.cpu_node_selector),
        tolerations=tolerations,
        service_account_name=kube.service_account,
        volumes=[
            k8s.V1Volume(
                name="work",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name=kube.work_volume_claim
                ),
            ),
            k8s.V1Volume(
                name="params",
                config_map=k8s.V1ConfigMapVolumeSource(name=kube.params_config_map),
            ),
        ],
        volume_mounts=[
            k8s.V1VolumeMount(name="work", mount_path=POD_WORKDIR),
            k8s.V1VolumeMount(
                name="params", mount_path=str(Path(POD_PARAMS).parent), read_only=True
            ),
        ],
        labels={"app": "listing-embeddings", "step": step, "gpu": str(gpu).lower()},
        get_logs=True,
        on_finish_action="delete_succeeded_pod",
    )


def build_dag(params_file: str = PARAMS_FILE, mode: str | None = None) -> DAG:
    """The DAG for `params_file`'s orchestration settings, in `mode` (default: the
    Variable from the environment, else `orchestration.airflow.mode`)."""
    config = load_params(params_file).orchestration
    mode = mode or os.environ.get(MODE_VARIABLE) or config.airflow.mode
    if mode not in ("local", "kubernetes"):
        raise ValueError(f"{MODE_VARIABLE}={mode!r}: expected local or kubernetes")
    airflow = config.airflow
    with DAG(
        dag_id=DAG_ID,
        description="Retrain multi-view listing embeddings, rebuild the index, gate, promote",
        doc_md=__doc__,
        schedule=airflow.schedule,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,  # two retrains would race for the same workdir
        tags=[*airflow.tags, mode],
        params={
            "params_file": Param(params_file, type="string", description="params.yaml to use"),
            "overrides": Param(
                [],
                type="array",
                items={"type": "string"},
                description="section.key=value overrides for this run, like --set",
            ),
        },
    ) as dag:
        first, last = {}, {}
        for step in STEPS.values():  # in pipeline order: upstream tasks exist already
            defaults = {
                "retries": airflow.retries,
                "retry_delay": timedelta(minutes=airflow.retry_delay_minutes),
                "execution_timeout": timedelta(minutes=airflow.timeout_minutes[step.name]),
            }
            if mode == "local":
                first[step.name], last[step.name] = _local_tasks(step.name, defaults, config.shards)
            else:
                first[step.name], last[step.name] = _pod_tasks(step.name, config, defaults)
            for upstream in step.upstream:  # the steps whose outputs it reads
                last[upstream] >> first[step.name]
    return dag


dag = build_dag()
