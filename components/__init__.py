"""Multi-view listing embeddings: the retraining workflow's steps and the code below them.

Layers, each importing only the ones below it (tests/test_architecture.py checks this):

    cli, workdir, __main__       entry points: parse params, run a step (or one shard of
                                 it) or the service
    cluster                      the train step's multi-node PyTorchJob (Kubernetes)
    refresh, step_process        the refresh: its steps in a row, each in a process of
                                 its own
    catalog ... promote          the eight steps, one module each, named after the step:
                                 thin `run(config, paths)` shells; a step never imports
                                 another step
    service/                     the search service over the store's CURRENT release
                                 (FastAPI app, release swapping, the page)
    release/                     the production store, S3, the MLflow registry and runs,
                                 the served model, the champion
    sample/                      the emoji sample catalog (only the catalog step uses it)
    io/                          catalogs and images, feature stores, manifests, Great
                                 Expectations, training data, embedding and index files,
                                 listing-id sets at catalog scale
    core/                        model, objectives, distillation, batching, views,
                                 retrieval, metrics, diagnostics, gates, encoders,
                                 distributed, shards: no file I/O
    contract, config, errors     the artifact contract, typed params, shared errors:
                                 importable from every layer

Nothing here imports Airflow or kfp: dags/ and infra/kubeflow/ import this package,
never the reverse.
"""
