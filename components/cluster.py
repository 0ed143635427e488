"""What the steps run as on Kubernetes beyond one pod: the Kubeflow Training Operator
`PyTorchJob` of multi-node training.

With `orchestration.kubernetes.train_nodes` > 1 the Airflow DAG (kubernetes mode) creates
this job for the train step instead of one pod, and waits for it. Each of its `Worker`
pods runs `torchrun -m components train ...` with `gpus` processes; the operator's
elastic policy hands torchrun its rendezvous through `PET_*` environment variables
(backend c10d at the first worker, `train_min_nodes`..`train_nodes` nodes, up to
`train_max_restarts` restarts of the group), the same as

    torchrun --nnodes MIN:MAX --nproc-per-node GPUS --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --max-restarts R -m components train ...

by hand. Rank 0 alone writes files and talks to MLflow; a rerun resumes from the last
checkpoint on the shared work volume.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from components.config import OrchestrationConfig

API_GROUP, API_VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
POD_WORKDIR = "/work"  # the work volume's mount point in every step's pod
POD_PARAMS = "/etc/listing-embeddings/params.yaml"  # params.yaml from the ConfigMap
FINISHED_TTL_S = 24 * 3600  # a finished job and its pods are removed after a day


def job_name(timestamp: str) -> str:
    """The PyTorchJob of the DAG run at `timestamp` (Airflow's `ts_nodash`)."""
    return f"listing-embeddings-train-{timestamp.lower()}"


def pytorch_job(
    config: OrchestrationConfig, name: str, arguments: list[str], deadline_s: int | None = None
) -> dict[str, Any]:
    """The PyTorchJob manifest of the train step over `train_nodes` GPU nodes: the project
    image, the work volume and params, GPUs and the GPU pool's placement from `config`;
    `arguments` follow `torchrun -m components train`."""
    kube = config.kubernetes
    if kube.train_min_nodes > kube.train_nodes:
        raise ValueError(
            f"orchestration.kubernetes.train_min_nodes ({kube.train_min_nodes}) is more than "
            f"train_nodes ({kube.train_nodes})"
        )
    labels = {"app": "listing-embeddings", "step": "train", "gpu": "true"}
    container = {
        "name": "pytorch",  # the name the Training Operator looks for
        "image": kube.image,
        "command": ["torchrun", "-m", "components", "train"],
        "args": list(arguments),
        "env": [{"name": key, "value": value} for key, value in sorted(kube.env.items())],
        "resources": {
            "requests": dict(kube.gpu_step_resources),
            "limits": {kube.gpu_resource: str(kube.gpus)},
        },
        "volumeMounts": [
            {"name": "work", "mountPath": POD_WORKDIR},
            {
                "name": "params",
                "mountPath": str(PurePosixPath(POD_PARAMS).parent),
                "readOnly": True,
            },
            {"name": "shm", "mountPath": "/dev/shm"},  # NCCL and data loading use shared memory
        ],
    }
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": kube.service_account,
            "nodeSelector": dict(kube.gpu_node_selector),
            "tolerations": [t.model_dump(exclude_none=True) for t in kube.gpu_tolerations],
            "containers": [container],
            "volumes": [
                {"name": "work", "persistentVolumeClaim": {"claimName": kube.work_volume_claim}},
                {"name": "params", "configMap": {"name": kube.params_config_map}},
                {"name": "shm", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": "None",
        "ttlSecondsAfterFinished": FINISHED_TTL_S,
    }
    if deadline_s is not None:
        run_policy["activeDeadlineSeconds"] = deadline_s
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": kube.namespace, "labels": labels},
        "spec": {
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "minReplicas": kube.train_min_nodes,
                "maxReplicas": kube.train_nodes,
                "maxRestarts": kube.train_max_restarts,
            },
            "nprocPerNode": str(kube.gpus),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": kube.train_nodes,
                    "restartPolicy": "OnFailure",
                    "template": pod,
                }
            },
        },
    }


def job_state(job: dict[str, Any]) -> str | None:
    """`Succeeded` or `Failed` once the job has ended (its last true condition), else None."""
    conditions = [
        c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"
    ]
    ended = [c["type"] for c in conditions if c.get("type") in ("Succeeded", "Failed")]
    return ended[-1] if ended else None
