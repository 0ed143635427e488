"""Kubeflow Pipelines (kfp 2.17) definition of the retraining pipeline.

One component per step, each calling the same function as `python -m components <step>`
(through `components.workdir.run_isolated`); every step's output folder is a KFP artifact
that the next steps receive. GPU steps (`orchestration.kubernetes.gpu_steps`) get the
accelerator type and limit, the GPU node pool's node selector and tolerations. The image,
accelerator and pool settings come from params.yaml's `orchestration.kubernetes`.

    python infra/kubeflow/pipeline.py    # rewrites infra/kubeflow/listing_embeddings_retrain.yaml

Run-time pipeline parameters: `params_file` (inside the image), `overrides`
(`section.key=value` strings, as `--set`), `storage_uri` (the production store) and
`mlflow_uri` (the tracking server).
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Input, Output

from components.config import load_params

ROOT = Path(__file__).resolve().parents[2]
COMPILED = Path(__file__).with_name("listing_embeddings_retrain.yaml")
ORCHESTRATION = load_params(ROOT / "params.yaml").orchestration
KUBE = ORCHESTRATION.kubernetes
TIMEOUTS = ORCHESTRATION.airflow.timeout_minutes
IMAGE = KUBE.image
IMAGE_PARAMS = "/app/params.yaml"  # where infra/Dockerfile puts params.yaml


@dsl.component(base_image=IMAGE)
def catalog(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    return run_isolated("catalog", params_file, overrides, {}, out.path, storage_uri, mlflow_uri)


@dsl.component(base_image=IMAGE)
def validate(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    catalog: Input[Artifact],
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {"catalog": catalog.path}
    return run_isolated(
        "validate", params_file, overrides, upstream, out.path, storage_uri, mlflow_uri
    )


@dsl.component(base_image=IMAGE)
def featurize(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    catalog: Input[Artifact],
    validate: Input[Artifact],
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {"catalog": catalog.path, "validate": validate.path}
    return run_isolated(
        "featurize", params_file, overrides, upstream, out.path, storage_uri, mlflow_uri
    )


@dsl.component(base_image=IMAGE)
def train(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    featurize: Input[Artifact],
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {"featurize": featurize.path}
    return run_isolated(
        "train", params_file, overrides, upstream, out.path, storage_uri, mlflow_uri
    )


@dsl.component(base_image=IMAGE)
def embed(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    validate: Input[Artifact],
    featurize: Input[Artifact],
    train: Input[Artifact],
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {"validate": validate.path, "featurize": featurize.path, "train": train.path}
    return run_isolated(
        "embed", params_file, overrides, upstream, out.path, storage_uri, mlflow_uri
    )


@dsl.component(base_image=IMAGE)
def index(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    embed: Input[Artifact],
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {"embed": embed.path}
    return run_isolated(
        "index", params_file, overrides, upstream, out.path, storage_uri, mlflow_uri
    )


@dsl.component(base_image=IMAGE)
def evaluate(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    validate: Input[Artifact],
    featurize: Input[Artifact],
    train: Input[Artifact],
    embed: Input[Artifact],
    index: Input[Artifact],
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {
        "validate": validate.path,
        "featurize": featurize.path,
        "train": train.path,
        "embed": embed.path,
        "index": index.path,
    }
    return run_isolated(
        "evaluate", params_file, overrides, upstream, out.path, storage_uri, mlflow_uri
    )


@dsl.component(base_image=IMAGE)
def promote(
    params_file: str,
    overrides: list,
    storage_uri: str,
    mlflow_uri: str,
    validate: Input[Artifact],
    featurize: Input[Artifact],
    train: Input[Artifact],
    embed: Input[Artifact],
    index: Input[Artifact],
    evaluate: Input[Artifact],
    out: Output[Artifact],
) -> str:
    from components.workdir import run_isolated

    upstream = {
        "validate": validate.path,
        "featurize": featurize.path,
        "train": train.path,
        "embed": embed.path,
        "index": index.path,
        "evaluate": evaluate.path,
    }
    return run_isolated(
        "promote", params_file, overrides, upstream, out.path, storage_uri, mlflow_uri
    )


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
    kubernetes.set_timeout(task, int(TIMEOUTS[step] * 60))
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
    tasks = {}
    tasks["catalog"] = catalog(**common)
    tasks["validate"] = validate(**common, catalog=tasks["catalog"].outputs["out"])
    tasks["featurize"] = featurize(
        **common, catalog=tasks["catalog"].outputs["out"], validate=tasks["validate"].outputs["out"]
    )
    tasks["train"] = train(**common, featurize=tasks["featurize"].outputs["out"])
    outs = {name: task.outputs["out"] for name, task in tasks.items() if name != "catalog"}
    tasks["embed"] = embed(
        **common, validate=outs["validate"], featurize=outs["featurize"], train=outs["train"]
    )
    tasks["index"] = index(**common, embed=tasks["embed"].outputs["out"])
    outs |= {"embed": tasks["embed"].outputs["out"], "index": tasks["index"].outputs["out"]}
    tasks["evaluate"] = evaluate(**common, **outs)
    tasks["promote"] = promote(**common, **outs, evaluate=tasks["evaluate"].outputs["out"])
    for step, task in tasks.items():
        task.set_display_name(step)
        _placed(task, step)
        task.set_retry(num_retries=ORCHESTRATION.airflow.retries)
        if step in ("evaluate", "promote"):
            task.set_caching_options(False)  # they read the production store's CURRENT


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(retrain, str(path))
    return path


if __name__ == "__main__":
    print(f"wrote {compile_pipeline()}")
