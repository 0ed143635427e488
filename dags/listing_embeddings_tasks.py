"""The task builders both Airflow DAGs share (wiring only, no DAG): a step's task(s) in
local mode (in the worker) or kubernetes mode (a pod, GPU steps on the GPU pool; train as a
PyTorchJob over several nodes), and the DAG params every run takes. The DAG files are
`listing_embeddings_retrain.py` and `listing_embeddings_refresh.py`.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Param, task
from airflow.sdk.exceptions import AirflowFailException

from components.cluster import POD_PARAMS, POD_WORKDIR
from components.config import OrchestrationConfig, load_params
from components.contract import SHARDED_STEPS, STEPS

PARAMS_FILE = os.environ.get(
    "LISTING_EMBEDDINGS_PARAMS", str(Path(__file__).resolve().parents[1] / "params.yaml")
)
MODE_VARIABLE = "AIRFLOW_VAR_LISTING_EMBEDDINGS_MODE"
# why a run runs when its conf does not say: how Airflow started it, its scheduled runs
# called "schedule" (the rest by Airflow's run type: manual, backfill, ...)
TRIGGER_OF_RUN_TYPE = "('schedule' if dag_run.run_type == 'scheduled' else dag_run.run_type)"


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
    from components.cli import quiet_libraries, run_step
    from components.errors import StepFailed

    quiet_libraries()  # the task's log: progress and library chatter at their own levels
    params = load_params(params_file, overrides)
    if step == "catalog" and params.paths.catalog is not None:
        summary = f"catalog: not built: the run reads paths.catalog={params.paths.catalog}"
        print(summary)
        return {"step": step, "summary": summary}
    try:
        tracking = os.environ.get("MLFLOW_TRACKING_URI")
        result = run_step(step, params, tracking, shard=shard, gather=gather)
    except StepFailed as err:
        if err.report:
            print(err.report)
        raise AirflowFailException(f"{step} failed: {err}") from err
    print(result.summary)
    return {"step": step, "summary": result.summary}


def _local_tasks(step: str, defaults: dict, shards: int, extra: tuple[str, ...] = ()):
    """The local-mode task(s) of a step: (first, last); a sharded step's first is its
    mapped shard task, its last the gather. `extra`: overrides before the run's own."""

    @task(task_id=step, **defaults)
    def run(params=None, dag_run=None) -> dict:
        gather = shards if step in SHARDED_STEPS else None
        overrides = [*extra, trigger_override(params, dag_run), *params["overrides"]]
        return run_local_step(step, params["params_file"], overrides, None, gather)

    if step not in SHARDED_STEPS:
        single = run()
        return single, single

    @task(task_id=f"{step}_shard", **defaults)
    def run_shard(index: int, params=None, dag_run=None) -> dict:
        shard = f"{index}/{shards}"
        overrides = [*extra, trigger_override(params, dag_run), *params["overrides"]]
        return run_local_step(step, params["params_file"], overrides, shard)

    mapped, gathered = run_shard.expand(index=list(range(shards))), run()
    mapped >> gathered
    return mapped, gathered


def _pod_tasks(step: str, config: OrchestrationConfig, defaults: dict, extra: tuple[str, ...] = ()):
    """The kubernetes-mode task(s) of a step: (first, last), as `_local_tasks`."""
    if step == "train" and config.kubernetes.train_nodes > 1:
        return _training_job_tasks(config, defaults)
    arguments = step_arguments(overrides_template(extra))
    if step not in SHARDED_STEPS:
        single = pod_operator(step, config, defaults, arguments)
        return single, single
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    shards = config.shards
    settings = pod_settings(step, config)
    mapped = KubernetesPodOperator.partial(task_id=f"{step}_shard", **settings, **defaults).expand(
        arguments=[[*arguments, "--shard", f"{i}/{shards}"] for i in range(shards)]
    )
    gathered = KubernetesPodOperator(
        task_id=step,
        arguments=[*arguments, "--gather", str(shards)],
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
    def launch(params=None, ts_nodash=None, dag_run=None) -> str:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes.client.exceptions import ApiException

        from components.cluster import API_GROUP, API_VERSION, PLURAL, job_name, pytorch_job

        # a task's own arguments are not templated: the overrides go in as they are
        overrides = [trigger_override(params, dag_run), *params["overrides"]]
        arguments = step_arguments(json.dumps(overrides))
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


def run_trigger(given: str | None, run_type: str | None) -> str:
    """Why a DAG run runs: the `trigger` its conf gave (the refresh DAG gives "staleness:
    <reasons>"), else how Airflow started it ("schedule", "manual", "backfill", ...)."""
    if given:
        return given
    kind = str(getattr(run_type, "value", run_type) or "manual")  # an enum in the task SDK
    return "schedule" if kind == "scheduled" else kind


def trigger_override(params: dict, dag_run) -> str:
    """The `trigger=...` override of a task of the DAG run `dag_run` (quoted: the text may
    hold a colon); the run's own overrides come after it and can replace it."""
    text = run_trigger(params.get("trigger"), getattr(dag_run, "run_type", None))
    return "trigger=" + json.dumps(text)


def overrides_template(extra: tuple[str, ...] = ()) -> str:
    """The template that renders `extra`, the run's trigger (as `trigger_override`) and
    its overrides as one JSON list."""
    trigger = f"('trigger=' ~ ((params.trigger or {TRIGGER_OF_RUN_TYPE}) | string | tojson))"
    return "{{ (" + json.dumps(list(extra)) + f" + [{trigger}] + params.overrides) | tojson }}}}"


def step_arguments(overrides_json: str | None = None) -> list[str]:
    """What every step's container gets after `python -m components <step>`; the run's
    overrides as JSON (by default the template that renders them into an operator)."""
    return [
        "--params",
        POD_PARAMS,
        "--set",
        f"paths.workdir={POD_WORKDIR}/artifacts",
        "--set-json",
        overrides_template() if overrides_json is None else overrides_json,
    ]


def pod_operator(
    step: str, config: OrchestrationConfig, defaults: dict, arguments: list[str] | None = None
):
    """The KubernetesPodOperator of one step: the project image, the shared workdir volume,
    params.yaml from a ConfigMap, GPUs and the GPU node pool for GPU steps."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    return KubernetesPodOperator(
        task_id=step,
        arguments=arguments or step_arguments(),
        **pod_settings(step, config),
        **defaults,
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


def run_mode(config: OrchestrationConfig, mode: str | None = None) -> str:
    """`mode`, else the Variable from the environment, else `orchestration.airflow.mode`."""
    mode = mode or os.environ.get(MODE_VARIABLE) or config.airflow.mode
    if mode not in ("local", "kubernetes"):
        raise ValueError(f"{MODE_VARIABLE}={mode!r}: expected local or kubernetes")
    return mode


def run_params(params_file: str) -> dict:
    """The DAG params every run takes: the params file, why it runs, `--set` overrides."""
    return {
        "params_file": Param(params_file, type="string", description="params.yaml to use"),
        "trigger": Param(
            None,
            type=["null", "string"],
            description="why this run (recorded with its model and release); "
            "default: schedule or manual, from how Airflow started it",
        ),
        "overrides": Param(
            [],
            type="array",
            items={"type": "string"},
            description="section.key=value overrides for this run, like --set",
        ),
    }


def step_tasks(
    config: OrchestrationConfig, mode: str, steps: tuple[str, ...], extra: tuple[str, ...] = ()
) -> tuple[dict, dict]:
    """Inside a DAG: the tasks of `steps` (in pipeline order), each after the tasks of the
    steps among them whose outputs it reads; (first, last) task of each step."""
    airflow, first, last = config.airflow, {}, {}
    for name in steps:
        defaults = {
            "retries": airflow.retries,
            "retry_delay": timedelta(minutes=airflow.retry_delay_minutes),
            "execution_timeout": timedelta(minutes=airflow.timeout_minutes[name]),
        }
        if mode == "local":
            first[name], last[name] = _local_tasks(name, defaults, config.shards, extra)
        else:
            first[name], last[name] = _pod_tasks(name, config, defaults, extra)
        for upstream in STEPS[name].upstream:  # the steps whose outputs it reads
            if upstream in last:
                last[upstream] >> first[name]
    return first, last
