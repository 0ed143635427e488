"""Runs Airflow against the repository's DAG in its own process (Airflow reads its
configuration at import, so tests keep it out of the pytest process).

    python tests/harness/airflow_dag.py integrity
    python tests/harness/airflow_dag.py test '<overrides JSON list>' [DAG_ID]
    python tests/harness/airflow_dag.py render
    python tests/harness/airflow_dag.py launch '<overrides JSON list>'

Prints one JSON document on the last line of stdout.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "dags"


def integrity() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bag = DagBag(dag_folder=str(DAGS))
    return {
        "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
        "warnings": [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught],
        "dag_ids": sorted(bag.dags),
        "dags": {dag_id: _described(dag) for dag_id, dag in bag.dags.items()},
    }


def _described(dag) -> dict:
    timeouts = {t.task_id: t.execution_timeout for t in dag.tasks}
    return {
        "task_ids": [t.task_id for t in dag.tasks],
        "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
        "tags": sorted(dag.tags),
        "retries": {t.task_id: t.retries for t in dag.tasks},
        "timeouts": {k: v.total_seconds() for k, v in timeouts.items() if v is not None},
        "schedule": dag.schedule,
        "doc_md": bool(dag.doc_md),
    }


def test(overrides: list[str], dag_id: str = "listing_embeddings_retrain") -> dict:
    import importlib

    from airflow.models.dagrun import DagRun
    from airflow.utils.types import DagRunTriggeredByType

    sys.path.insert(0, str(DAGS))
    module = importlib.import_module(dag_id)
    run = module.dag.test(run_conf={"overrides": overrides})
    # runs another DAG's task started (TriggerDagRunOperator), not earlier dag.test() runs
    triggered = [
        {"dag_id": r.dag_id, "conf": r.conf}
        for r in DagRun.find(dag_id="listing_embeddings_retrain")
        if r.triggered_by == DagRunTriggeredByType.OPERATOR
    ]
    return {
        "state": str(run.state),
        "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()},
        "triggered": triggered,
    }


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: unused}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def render() -> dict:
    """Every pod request of the kubernetes mode, built without a cluster (the provider reads
    a kubeconfig to label pods; this one points nowhere and is never contacted)."""
    import os
    import tempfile

    config = Path(tempfile.mkdtemp()) / "kubeconfig"
    config.write_text(KUBECONFIG)
    os.environ["KUBECONFIG"] = str(config)
    sys.path.insert(0, str(DAGS))
    import listing_embeddings_retrain as module
    from kubernetes.client import ApiClient

    dag = module.build_dag(mode="kubernetes")
    pods, types = {}, set()
    for operator in dag.tasks:
        if hasattr(operator, "expand_input"):  # a mapped task: one pod per mapped argument
            types.add(operator.operator_class.__name__)
            for index, arguments in enumerate(operator.expand_input.value["arguments"]):
                pod = operator.unmap({"arguments": arguments}).build_pod_request_obj()
                pods[f"{operator.task_id}[{index}]"] = ApiClient().sanitize_for_serialization(pod)
            continue
        types.add(type(operator).__name__)
        pod = operator.build_pod_request_obj()
        pods[operator.task_id] = ApiClient().sanitize_for_serialization(pod)
    upstream = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    return {
        "types": sorted(types),
        "pods": pods,
        "upstream": upstream,
        "overrides": _rendered_overrides(dag),
    }


def _rendered_overrides(dag) -> dict:
    """The `--set-json` argument of the validate pod as Airflow renders it for a scheduled
    run, and for a run whose conf gives a trigger and an override."""
    from types import SimpleNamespace

    from airflow.sdk.api.datamodels._generated import DagRunType

    arguments = dag.get_task("validate").arguments
    template = arguments[arguments.index("--set-json") + 1]
    env = dag.get_template_env()
    runs = {
        "scheduled": ({"trigger": None, "overrides": []}, "scheduled"),
        "conf": ({"trigger": "staleness: it's 30% <new>", "overrides": ["seed=3"]}, "manual"),
        "backfill": ({"trigger": None, "overrides": []}, DagRunType.BACKFILL),  # as a task sees it
    }
    return {
        name: env.from_string(template).render(params=params, dag_run=SimpleNamespace(run_type=t))
        for name, (params, t) in runs.items()
    }


def launch(overrides: list[str]) -> dict:
    """Run the kubernetes mode's `train_launch` task twice (a retry) against an API server
    on 127.0.0.1 that answers the custom-objects endpoint like Kubernetes: created (201),
    then already exists (409). Returns what the task sent and what it returned."""
    import os
    import tempfile
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    requests: list[dict] = []

    class CustomObjects(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"method": "POST", "path": self.path, "body": body})
            status = 201 if len(requests) == 1 else 409
            answer = body if status == 201 else {"kind": "Status", "code": 409}
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CustomObjects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = Path(tempfile.mkdtemp()) / "kubeconfig"
    config.write_text(
        KUBECONFIG.replace("https://127.0.0.1:9", f"http://127.0.0.1:{server.server_port}")
    )
    os.environ["KUBECONFIG"] = str(config)
    sys.path.insert(0, str(DAGS))
    import listing_embeddings_retrain as module

    task = module.build_dag(mode="kubernetes").get_task("train_launch")
    returned = [
        task.python_callable(params={"overrides": overrides}, ts_nodash="20261201T030000")
        for _ in range(2)
    ]
    server.shutdown()
    return {"requests": requests, "returned": returned}


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "integrity":
        result = integrity()
    elif command == "test":
        result = test(json.loads(sys.argv[2]), *sys.argv[3:])
    elif command == "launch":
        result = launch(json.loads(sys.argv[2]))
    else:
        result = render()
    print(json.dumps(result))
