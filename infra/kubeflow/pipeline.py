"""Kubeflow Pipelines (kfp 2.17) definitions of the retraining and refresh pipelines.

One component per step, generated from the artifact contract (`components.contract`):
each takes the output artifacts of the steps it reads and calls the same function as
`python -m components <step>` (through `components.workdir.run_isolated`); its own output
folder is the artifact the next steps receive. GPU steps
(`orchestration.kubernetes.gpu_steps`) get the accelerator type and limit, the GPU node
pool's node selector and tolerations. The image, accelerator and pool settings come from
params.yaml's `orchestration.kubernetes`, retries and timeouts from
`orchestration.kubeflow`.

    python infra/kubeflow/pipeline.py    # rewrites infra/kubeflow/listing_embeddings_*.yaml

The refresh pipeline (`refresh`, components/refresh.py) has the same components but train:
embed and index build on the production store's current release (its model from the
registry, its splits, vectors and index from the store), so `storage_uri` and `mlflow_uri`
are required; a KFP recurring run schedules it (hourly, like the Airflow refresh DAG). Its
evaluate records the model's staleness in the release; the Airflow refresh DAG acts on it.

featurize and embed run in `orchestration.shards` shards: a `dsl.ParallelFor` over the shard
indices (one GPU pod each), then the step's own component gathers the collected shard
outputs (`--shard I/N`, `--gather N`; components/core/shards.py).

Run-time pipeline parameters: `params_file` (inside the image), `overrides`
(`section.key=value` strings, as `--set`), `storage_uri` (the production store) and
`mlflow_uri` (the tracking server).
"""

import linecache
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Input, Output

from components import refresh as refreshing
from components.config import load_params
from components.contract import SHARDED_STEPS, STEPS, Step

ROOT = Path(__file__).resolve().parents[2]
COMPILED = Path(__file__).with_name("listing_embeddings_retrain.yaml")
COMPILED_REFRESH = Path(__file__).with_name("listing_embeddings_refresh.yaml")
ORCHESTRATION = load_params(ROOT / "params.yaml").orchestration
KUBE = ORCHESTRATION.kubernetes
KUBEFLOW = ORCHESTRATION.kubeflow
IMAGE = KUBE.image
IMAGE_PARAMS = "/app/params.yaml"  # where infra/Dockerfile puts params.yaml

# KFP ships a lightweight component as the source of one function, run in the image. The
# function of each step is written from the contract: its inputs are the steps it reads.
# A sharded step has two: one runs a shard, the step's own gathers the shards' outputs.
_TEMPLATE = """\
def {function}(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
{parameters}{inputs}    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {{{upstream}}}
    # an empty string is how a KFP parameter says "not set"
    storage, tracking = storage_uri or None, mlflow_uri or None
    return run_isolated(
        "{name}", params_file, overrides, upstream, out.path, storage, tracking{arguments}
    )
"""
# kind -> (function name suffix, extra parameters, extra arguments of run_isolated)
_KINDS = {
    "step": ("", "", ""),
    "shard": ("_shard", "    shard: int,\n    shards: int,\n", ', shard=f"{shard}/{shards}"'),
    "gather": (
        "",
        "    shards: Input[list[Artifact]],\n",
        ", shard_outputs=[p.path for p in shards]",
    ),
}


def step_function(step: Step, kind: str = "step", refresh: bool = False):
    """The component function of `step` (`kind`: step, shard or gather; `refresh`: as a
    refresh runs it, without train's output), with source KFP can read
    (`inspect.getsource`)."""
    suffix, parameters, arguments = _KINDS[kind]
    function = step.name + suffix
    reads = refreshing.upstream(step.name) if refresh else step.upstream
    source = _TEMPLATE.format(
        function=function,
        name=step.name,
        parameters=parameters,
        arguments=arguments + (", refresh=True" if refresh else ""),
        inputs="".join(f"    {name}: Input[Artifact],\n" for name in reads),
        upstream=", ".join(f'"{name}": {name}.path' for name in reads),
    )
    filename = f"<kubeflow component {function}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"Input": Input, "Output": Output, "Artifact": Artifact}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[function]


def _components(steps, refresh: bool = False) -> tuple[dict, dict]:
    """Each step's component (a sharded step's gathers) and each sharded step's shard
    component."""
    whole = {
        name: dsl.component(
            step_function(STEPS[name], "gather" if name in SHARDED_STEPS else "step", refresh),
            base_image=IMAGE,
        )
        for name in steps
    }
    shard = {
        name: dsl.component(step_function(STEPS[name], "shard", refresh), base_image=IMAGE)
        for name in SHARDED_STEPS
        if name in steps
    }
    return whole, shard


COMPONENTS, SHARD_COMPONENTS = _components(STEPS)
REFRESH_COMPONENTS, REFRESH_SHARD_COMPONENTS = _components(refreshing.STEPS, refresh=True)


def _on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
    task.set_accelerator_type(KUBE.gpu_resource).set_accelerator_limit(KUBE.gpus)
    for key, value in KUBE.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in KUBE.gpu_tolerations:
        kubernetes.add_toleration(
            task,
            key=toleration.key,
            operator=toleration.operator,
            value=toleration.value,
            effect=toleration.effect,
        )
    return task


def _placed(task: dsl.PipelineTask, step: str, gpu: bool | None = None) -> dsl.PipelineTask:
    """GPU steps on the GPU pool (`gpu` False: a gather, on CPU), the others on CPU nodes,
    with their requests, labels, retries and the step's timeout. (KFP sets the service
    account per run, not per task.)"""
    gpu = step in KUBE.gpu_steps if gpu is None else gpu
    resources = KUBE.gpu_step_resources if gpu else KUBE.cpu
    task.set_cpu_request(resources["cpu"]).set_memory_request(resources["memory"])
    kubernetes.add_pod_label(task, "app", "listing-embeddings")
    kubernetes.add_pod_label(task, "step", step)
    kubernetes.set_timeout(task, int(KUBEFLOW.timeout_minutes[step] * 60))
    task.set_retry(num_retries=KUBEFLOW.retries)
    if step in KUBEFLOW.uncached_steps:
        task.set_caching_options(False)
    if gpu:
        return _on_gpu(task)
    for key, value in KUBE.cpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return task


def _step_tasks(common: dict, shards: int, refresh: bool) -> None:
    """Every step's task(s), in pipeline order (upstream tasks exist already)."""
    steps = refreshing.STEPS if refresh else tuple(STEPS)
    whole, sharded = (
        (REFRESH_COMPONENTS, REFRESH_SHARD_COMPONENTS)
        if refresh
        else (COMPONENTS, SHARD_COMPONENTS)
    )
    tasks: dict[str, dsl.PipelineTask] = {}
    for name in steps:
        reads = refreshing.upstream(name) if refresh else STEPS[name].upstream
        upstream = {up: tasks[up].outputs["out"] for up in reads}
        if name not in SHARDED_STEPS:
            tasks[name] = _placed(whole[name](**common, **upstream), name)
            tasks[name].set_display_name(name)
            continue
        with dsl.ParallelFor(list(range(shards))) as index:
            shard = sharded[name](**common, shard=index, shards=shards, **upstream)
            _placed(shard, name).set_display_name(f"{name} shard")
        gathered = dsl.Collected(shard.outputs["out"])
        gather = whole[name](**common, shards=gathered, **upstream)
        tasks[name] = _placed(gather, name, gpu=False)  # it moves files: no GPU
        tasks[name].set_display_name(f"{name} (gather)")


def _pipeline(name: str, description: str, shards: int, refresh: bool):
    """A pipeline of the steps' tasks; its run-time parameters are the same for both."""

    @dsl.pipeline(name=name, description=description)
    def pipeline(
        params_file: str = IMAGE_PARAMS,
        overrides: list = [],  # noqa: B006 (KFP reads the default as the parameter's default)
        storage_uri: str = "",
        mlflow_uri: str = "",
    ):
        common = {
            "params_file": params_file,
            "overrides": overrides,
            "storage_uri": storage_uri,
            "mlflow_uri": mlflow_uri,
        }
        _step_tasks(common, shards, refresh)

    return pipeline


def build_pipeline(shards: int = ORCHESTRATION.shards):
    """The pipeline with featurize and embed in `shards` shards (params: orchestration.shards)."""
    return _pipeline(
        "listing-embeddings-retrain",
        "Validate, featurize, train, embed, index, evaluate with recall gates, promote.",
        shards,
        refresh=False,
    )


def build_refresh_pipeline(shards: int = ORCHESTRATION.shards):
    """The refresh (components/refresh.py): no training; embed and index build on the
    store's current release, whose model and splits they read from the registry and the
    store. Schedule it with a recurring run (hourly, as the Airflow refresh DAG)."""
    return _pipeline(
        "listing-embeddings-refresh",
        "Validate, featurize, embed the new and changed listings with the current model, "
        "update the current index, evaluate with recall gates and staleness, promote.",
        shards,
        refresh=True,
    )


retrain = build_pipeline()
refresh = build_refresh_pipeline()


def compile_pipeline(path: Path = COMPILED, pipeline=retrain) -> Path:
    compiler.Compiler().compile(pipeline, str(path))
    return path


if __name__ == "__main__":
    print(f"wrote {compile_pipeline()}")
    print(f"wrote {compile_pipeline(COMPILED_REFRESH, refresh)}")
