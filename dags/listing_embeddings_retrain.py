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

The `catalog` task (the sample catalog) exists only when `paths.catalog` is null: with an
operator's catalog in the params file the DAG starts at `validate`; one named only in a
run's `overrides` makes the `catalog` task a no-op that says so (local mode).

Run-time DAG params: `overrides` (a list of `section.key=value`, as `--set`), and
`params_file` (local mode). A failed gate fails `evaluate` (in local mode without retries)
with the gate table in its log; `promote` then never runs (Airflow marks it
`upstream_failed`) and the DAG run is failed, so alerts fire. Every step is idempotent,
so a retrain can be cleared and re-run.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG

from components.config import load_params
from components.contract import STEPS

# the shared task builders live beside this file (not every Airflow process puts the DAGs
# folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from listing_embeddings_tasks import PARAMS_FILE, run_mode, run_params, step_tasks

DAG_ID = "listing_embeddings_retrain"


def build_dag(params_file: str = PARAMS_FILE, mode: str | None = None) -> DAG:
    """The DAG for `params_file`'s orchestration settings, in `mode` (default: the
    Variable from the environment, else `orchestration.airflow.mode`)."""
    params = load_params(params_file)
    config = params.orchestration
    mode = run_mode(config, mode)
    # the sample catalog is built only when the catalog is the sample's (paths.catalog null)
    steps = tuple(s for s in STEPS if s != "catalog" or params.paths.catalog is None)
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
        params=run_params(params_file),
    ) as dag:
        step_tasks(config, mode, steps)
    return dag


dag = build_dag()
