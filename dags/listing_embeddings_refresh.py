"""Airflow DAG `listing_embeddings_refresh`: keep the served index current between retrains.

Wiring only, with the retrain DAG's task builders (`listing_embeddings_tasks.py`):
validate, featurize, embed, index, evaluate and promote, with the overrides that make them
a refresh (`components.config.REFRESH`: embed and index build on the current
release, no training). It runs on `orchestration.airflow.refresh_schedule` (hourly), one
run at a time, in the retrain DAG's workdir, whose lock lets only one step of either DAG
run at once: a step that finds the workdir busy fails and is retried, and promotions go
through the store's conditional write, so two never land at once.

After promote, `staleness` reads what the refresh measured (the staleness recorded in the
store's CURRENT release: new or changed share since training, drift, recall against
training) and, when the model is stale, `retrain` starts the retrain DAG with the reasons
as its run's `trigger` ("staleness: <reasons>"), recorded with the model it trains and the
release it promotes. The Airflow workers need read access to the production store.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, task

from components.config import StepPaths, load_params
from components.refresh import REFRESH, STEPS

# the shared task builders live beside this file (not every Airflow process puts the DAGs
# folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from listing_embeddings_tasks import PARAMS_FILE, run_mode, run_params, step_tasks

RETRAIN_DAG_ID = "listing_embeddings_retrain"

DAG_ID = "listing_embeddings_refresh"


def stale_reasons(params_file: str, overrides: list[str]) -> list[str]:
    """Why the current release's model is stale (empty: it is not), from the staleness
    its refresh recorded in the production store."""
    from components.release import production

    paths = StepPaths.from_params(load_params(params_file, overrides))
    storage = production.open_store(paths)
    pointer = production.read_pointer(storage)
    if pointer is None:
        return []
    manifest = production.read_manifest(storage, pointer.version, pointer.manifest_sha256)
    return list((manifest.get("staleness") or {}).get("reasons", []))


def build_dag(params_file: str = PARAMS_FILE, mode: str | None = None) -> DAG:
    config = load_params(params_file).orchestration
    mode = run_mode(config, mode)
    with DAG(
        dag_id=DAG_ID,
        description="Refresh the served index from the catalog with the current model",
        doc_md=__doc__,
        schedule=config.airflow.refresh_schedule,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=[*config.airflow.tags, "refresh", mode],
        params=run_params(params_file),
    ) as dag:
        _, last = step_tasks(config, mode, STEPS, REFRESH)

        @task.short_circuit(task_id="staleness")
        def staleness(params=None) -> str:
            """The reasons the model is stale, joined: empty (falsy) skips the retrain."""
            reasons = stale_reasons(params["params_file"], list(params["overrides"]))
            print("stale: " + "; ".join(reasons) if reasons else "the model is not stale")
            return "; ".join(reasons)

        check = staleness()
        last["promote"] >> check
        check >> TriggerDagRunOperator(
            task_id="retrain",
            trigger_dag_id=RETRAIN_DAG_ID,
            conf={
                "trigger": "staleness: {{ ti.xcom_pull(task_ids='staleness') }}",
                "overrides": [],
            },
            wait_for_completion=False,
        )
    return dag


dag = build_dag()
