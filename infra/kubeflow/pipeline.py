"""Kubeflow Pipelines (kfp 2.17) definition of the retraining pipeline.

One component per step, generated from the artifact contract (`components.contract`):
each takes the output artifacts of the steps it reads and calls the same function as
`python -m components <step>` (through `components.workdir.run_isolated`); its own output
folder is the artifact the next steps receive. GPU steps
(`orchestration.kubernetes.gpu_steps`) get the accelerator type and limit, the GPU node
pool's node selector and tolerations. The image, accelerator and pool settings come from
params.yaml's `orchestration.kubernetes`, retries and timeouts from
`orchestration.kubeflow`.

    python infra/kubeflow/pipeline.py    # rewrites infra/kubeflow/listing_embeddings_retrain.yaml

Run-time pipeline parameters: `params_file` (inside the image), `overrides`
(`section.key=value` strings, as `--set`), `storage_uri` (the production store) and
`mlflow_uri` (the tracking server).
"""

import linecache
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Input, Output

from components.config import load_params
from components.contract import STEPS, Step

ROOT = Path(__file__).resolve().parents[2]
COMPILED = Path(__file__).with_name("listing_embeddings_retrain.yaml")
ORCHESTRATION = load_params(ROOT / "params.yaml").orchestration
KUBE = ORCHESTRATION.kubernetes
KUBEFLOW = ORCHESTRATION.kubeflow
IMAGE = KUBE.image
IMAGE_PARAMS = "/app/params.yaml"  # where infra/Dockerfile puts params.yaml

# KFP ships a lightweight component as the source of one function, run in the image. The
# function of each step is written from the contract: its inputs are the steps it reads.
_TEMPLATE = """\
def {name}(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
{inputs}    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {{{upstream}}}
    # an empty string is how a KFP parameter says "not set"
    storage, tracking = storage_uri or None, mlflow_uri or None
    return run_isolated("{name}", params_file, overrides, upstream, out.path, storage, tracking)
"""


def step_function(step: Step):
    """The component function of `step`, with source KFP can read (`inspect.getsource`)."""
    source = _TEMPLATE.format(
        name=step.name,
        inputs="".join(f"    {name}: Input[Artifact],\n" for name in step.upstream),
        upstream=", ".join(f'"{name}": {name}.path' for name in step.upstream),
    )
    filename = f"<kubeflow component {step.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"Input": Input, "Output": Output, "Artifact": Artifact}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[step.name]


COMPONENTS = {
    name: dsl.component(step_function(step), base_image=IMAGE) for name, step in STEPS.items()
}


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


def _placed(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    """GPU steps on the GPU pool, the others on CPU nodes, with their requests, labels and
    the step's timeout. (KFP sets the service account per run, not per task.)"""
    resources = KUBE.gpu_step_resources if step in KUBE.gpu_steps else KUBE.cpu
    task.set_cpu_request(resources["cpu"]).set_memory_request(resources["memory"])
    kubernetes.add_pod_label(task, "app", "listing-embeddings")
    kubernetes.add_pod_label(task, "step", step)
    kubernetes.set_timeout(task, int(KUBEFLOW.timeout_minutes[step] * 60))
    if step in KUBE.gpu_steps:
        return _on_gpu(task)
    for key, value in KUBE.cpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return task


@dsl.pipeline(
    name="listing-embeddings-retrain",
    description="Validate, featurize, train, embed, index, evaluate with recall gates, promote.",
)
def retrain(
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
    tasks: dict[str, dsl.PipelineTask] = {}
    for name, step in STEPS.items():  # in pipeline order: upstream tasks exist already
        upstream = {up: tasks[up].outputs["out"] for up in step.upstream}
        task = COMPONENTS[name](**common, **upstream)
        task.set_display_name(name)
        _placed(task, name)
        task.set_retry(num_retries=KUBEFLOW.retries)
        if name in KUBEFLOW.uncached_steps:
            task.set_caching_options(False)
        tasks[name] = task


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(retrain, str(path))
    return path


if __name__ == "__main__":
    print(f"wrote {compile_pipeline()}")
