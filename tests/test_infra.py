"""infra/: every manifest parses and agrees with params.yaml's orchestration settings and
with the DAG and pipeline that use it; the S3 policy is least-privilege."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from components.config import load_params
from tests.conftest import REPO_ROOT

INFRA = REPO_ROOT / "infra"
KUBE = load_params(REPO_ROOT / "params.yaml").orchestration.kubernetes


def documents() -> dict[str, list[dict]]:
    found = {}
    for path in sorted(INFRA.rglob("*.yaml")):
        found[path.relative_to(INFRA).as_posix()] = [
            d for d in yaml.safe_load_all(path.read_text()) if d
        ]
    return found


def by_kind(kind: str) -> list[dict]:
    return [d for docs in documents().values() for d in docs if d.get("kind") == kind]


def test_every_yaml_file_parses_and_every_manifest_names_its_kind():
    found = documents()
    assert {"k8s/airflow-values.yaml", "k8s/mlflow.yaml", "k8s/gpu-nodepool.yaml"} <= set(found)
    for name, docs in found.items():
        assert docs, f"{name} is empty"
        if name.startswith("k8s/") and name != "k8s/airflow-values.yaml":
            for doc in docs:
                assert doc.get("apiVersion") and doc.get("kind"), name


def test_kustomization_lists_files_that_exist():
    (kustomization,) = by_kind("Kustomization")
    for resource in kustomization["resources"]:
        assert (INFRA / "k8s" / resource).is_file(), resource


def test_the_step_pods_service_account_volume_and_namespace_exist():
    accounts = {a["metadata"]["name"]: a for a in by_kind("ServiceAccount")}
    assert set(accounts) == {KUBE.service_account, "search-reader"}
    account = accounts[KUBE.service_account]
    assert account["metadata"]["namespace"] == KUBE.namespace
    assert "role-arn" in json.dumps(account["metadata"]["annotations"])  # workload identity
    (claim,) = by_kind("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == KUBE.work_volume_claim
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert [n["metadata"]["name"] for n in by_kind("Namespace")] == [KUBE.namespace]
    (role,) = by_kind("Role")
    pods = [r for r in role["rules"] if "pods" in r["resources"]]
    assert pods and "create" in pods[0]["verbs"] and "delete" in pods[0]["verbs"]


def test_the_gpu_pool_has_the_labels_and_taints_the_gpu_steps_expect():
    (cluster,) = by_kind("ClusterConfig")
    pools = {group["name"]: group for group in cluster["managedNodeGroups"]}
    assert pools["gpu"]["labels"] == KUBE.gpu_node_selector
    assert pools["cpu"]["labels"] == KUBE.cpu_node_selector
    taints = {(t["key"], t["effect"]) for t in pools["gpu"]["taints"]}
    assert taints == {(t.key, t.effect) for t in KUBE.gpu_tolerations}
    assert pools["gpu"]["minSize"] == 0  # no idle GPUs between retrains


def test_mlflow_runs_on_postgres_with_s3_artifacts_and_no_password_in_the_manifest():
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    (container,) = deployments["mlflow"]["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--backend-store-uri=postgresql://" in args and "$(POSTGRES_PASSWORD)" in args
    assert "--artifacts-destination=s3://" in args
    (postgres,) = by_kind("StatefulSet")
    env = {e["name"]: e for e in postgres["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in env["POSTGRES_PASSWORD"]["valueFrom"]
    services = {s["metadata"]["name"] for s in by_kind("Service")}
    assert {"mlflow", "mlflow-postgres"} <= services


def test_airflow_uses_the_kubernetes_executor_and_the_kubernetes_mode():
    values = yaml.safe_load((INFRA / "k8s" / "airflow-values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["AIRFLOW_VAR_LISTING_EMBEDDINGS_MODE"] == "kubernetes"
    assert values["images"]["airflow"]["repository"] == KUBE.image.rsplit(":", 1)[0]
    assert values["config"]["core"]["load_examples"] == "False"


def test_the_s3_policy_is_least_privilege():
    policy = json.loads((INFRA / "k8s" / "s3-policy.json").read_text())
    allowed = {
        "s3:ListBucket",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
    }
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement["Action"]) <= allowed
        resources = statement["Resource"]
        for resource in [resources] if isinstance(resources, str) else resources:
            assert resource.startswith("arn:aws:s3:::") and resource != "arn:aws:s3:::*"
        if "s3:DeleteObject" in statement["Action"]:
            assert all(r.endswith("/*") and "/catalogs/" not in r for r in resources)


def test_the_dockerfile_installs_the_lock_and_puts_params_where_the_pipeline_reads_them():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile and "--index-url" in dockerfile
    assert "faiss-gpu" in dockerfile and "USER app" in dockerfile
    sys.path.insert(0, str(INFRA / "kubeflow"))
    import pipeline

    assert pipeline.IMAGE_PARAMS == "/app/params.yaml" and "WORKDIR /app" in dockerfile
    assert "COPY params.yaml" in dockerfile


@pytest.mark.parametrize("name", ["airflow-values.yaml", "mlflow.yaml", "rbac.yaml"])
def test_no_credentials_are_committed(name):
    text = (INFRA / "k8s" / name).read_text().lower()
    for secret in ("aws_secret_access_key", "aws_access_key_id", "password:"):
        assert secret not in text


def test_the_search_service_is_ready_on_a_loaded_release_and_scales():
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "listing-search"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:4] == ["python", "-m", "components", "serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == "search-reader"
    (autoscaler,) = by_kind("HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "listing-search"
    services = [s["metadata"]["name"] for s in by_kind("Service")]
    assert "listing-search" in services


def test_multi_node_training_is_an_elastic_pytorchjob_on_the_gpu_pool():
    from components.cluster import job_name, job_state, pytorch_job

    config = load_params(
        REPO_ROOT / "params.yaml",
        ["orchestration.kubernetes.train_nodes=4", "orchestration.kubernetes.train_min_nodes=2"],
    ).orchestration
    arguments = ["--params", "/etc/listing-embeddings/params.yaml", "--set-json", "[]"]

    job = pytorch_job(config, job_name("20260105T030000"), arguments, deadline_s=3600)

    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"] == {
        "name": "listing-embeddings-train-20260105t030000",
        "namespace": KUBE.namespace,
        "labels": {"app": "listing-embeddings", "step": "train", "gpu": "true"},
    }
    spec = job["spec"]
    assert spec["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "minReplicas": 2,
        "maxReplicas": 4,
        "maxRestarts": KUBE.train_max_restarts,
    }
    assert spec["nprocPerNode"] == str(KUBE.gpus)
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 3600
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and set(spec["pytorchReplicaSpecs"]) == {"Worker"}
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == KUBE.image
    assert container["command"] == ["torchrun", "-m", "components", "train"]
    assert container["args"] == arguments
    assert container["resources"]["limits"] == {KUBE.gpu_resource: str(KUBE.gpus)}
    assert pod["nodeSelector"] == KUBE.gpu_node_selector
    assert {t["key"] for t in pod["tolerations"]} == {t.key for t in KUBE.gpu_tolerations}
    assert pod["serviceAccountName"] == KUBE.service_account
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == [KUBE.work_volume_claim]
    # it lands on the GPU pool of infra/k8s/gpu-nodepool.yaml, and only there
    assert [group["name"] for group in _pools_that_admit(pod)] == ["gpu"]

    assert job_state({}) is None
    running = {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
    assert job_state(running) is None
    done = {"type": "Succeeded", "status": "True"}
    assert (
        job_state({"status": {"conditions": [*running["status"]["conditions"], done]}})
        == "Succeeded"
    )
    with pytest.raises(ValueError, match="train_min_nodes"):
        pytorch_job(
            load_params(
                REPO_ROOT / "params.yaml", ["orchestration.kubernetes.train_min_nodes=2"]
            ).orchestration,
            "x",
            [],
        )


def _pools_that_admit(pod: dict) -> list[dict]:
    """The node groups of infra/k8s/gpu-nodepool.yaml whose labels match the pod's node
    selector and whose every taint the pod tolerates."""
    pools = yaml.safe_load((REPO_ROOT / "infra/k8s/gpu-nodepool.yaml").read_text())

    def tolerated(taint: dict) -> bool:
        return any(
            t["key"] == taint["key"]
            and (t.get("operator") == "Exists" or t.get("value") == taint.get("value"))
            and t.get("effect") in (None, taint["effect"])
            for t in pod.get("tolerations", [])
        )

    return [
        group
        for group in pools["managedNodeGroups"]
        if pod["nodeSelector"].items() <= group.get("labels", {}).items()
        and all(tolerated(taint) for taint in group.get("taints", []))
    ]


def test_airflow_may_create_and_watch_the_training_jobs():
    (role,) = by_kind("Role")
    jobs = [r for r in role["rules"] if "pytorchjobs" in r["resources"]]
    assert jobs and jobs[0]["apiGroups"] == ["kubeflow.org"]
    assert {"create", "get"} <= set(jobs[0]["verbs"])
