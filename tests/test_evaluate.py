"""embed -> index -> evaluate on the tiny sample catalog, with MLflow on a sqlite file."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from components import contract, embed, evaluate, index, train
from components.cli import main
from components.config import EmbedConfig, EvaluateConfig, GatesConfig, IndexConfig, TrainConfig
from components.core.retrieval import TASKS
from components.io import activations, embedding_files
from components.io.manifest import read_manifest, read_run
from components.io.training_data import load_training_data
from components.release import registry
from tests.conftest import fresh_paths

pytestmark = pytest.mark.integration

TINY = TrainConfig(
    epochs=6, batch_size=16, hidden=128, dim=64, device="cpu", val_fraction=0.2, test_fraction=0.2
)
LENIENT = GatesConfig(
    min={"query_to_listing/recall@10": 0.2, "view_to_listing/recall@10": 0.2},
    max_regression={"query_to_listing/recall@10": 0.5, "view_to_listing/recall@10": 0.5},
    # a 2-epoch model on 60 listings need not beat the encoders; the gate is still computed
    min_gain_over_frozen={"query_to_listing": -1.0, "view_to_listing": -1.0},
    min_queries=1,  # the tiny catalog has a few dozen test queries per task
    max_ann_loss=0.0,
)
NO_CHAMPION = EvaluateConfig(champion=None, ks=[1, 10, 50, 500], bootstrap=200, gates=LENIENT)


@pytest.fixture(scope="module")
def indexed(featurized, tmp_path_factory):
    paths = fresh_paths(featurized, tmp_path_factory.mktemp("evaluate"), "work")
    train.run(TINY, paths)
    embed.run(EmbedConfig(device="cpu", batch_size=7), paths)
    index.run(IndexConfig(factory="HNSW32", ef_search=64), paths)
    return paths


def test_embed_fuses_every_listing_like_training_does(indexed):
    out = indexed.step_dir("embed")
    ids = pq.read_table(out / contract.EMBEDDED_IDS.name).column(0).to_pylist()
    vectors = np.concatenate([np.load(p) for p in embedding_files.embedding_parts(out)])
    featurize_dir = indexed.step_dir("featurize")
    data = load_training_data(featurize_dir, read_manifest(featurize_dir), 0.2, 0.2)
    model = registry.load_model(None, indexed, torch.device("cpu")).model

    reference = train.embed_all_listings(model, data, torch.device("cpu"))

    assert vectors.dtype == np.float32 and vectors.shape == (len(data.listing_ids), TINY.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    order = [data.listing_ids.index(lid) for lid in ids]
    np.testing.assert_allclose(vectors, reference[order], atol=1e-5)
    manifest = read_manifest(out)
    assert manifest["counts"]["held_out_views"] > 0 and manifest["counts"]["missing"] == 0


def test_embedding_again_with_the_same_model_and_features_recomputes_nothing(indexed):
    part = embedding_files.embedding_parts(indexed.step_dir("embed"))[0]
    stamp = part.stat().st_mtime_ns

    again = embed.run(EmbedConfig(device="cpu", batch_size=7), indexed)

    assert "nothing recomputed" in again.summary
    assert part.stat().st_mtime_ns == stamp


def test_evaluate_writes_metrics_gates_plots_and_logs_to_the_training_run(indexed):
    result = evaluate.run(NO_CHAMPION, indexed)

    out = indexed.step_dir("evaluate")
    headline = json.loads((out / contract.METRICS.name).read_text())
    details = json.loads((out / contract.DETAILS.name).read_text())
    measured = read_run(out)["measured"]
    assert headline.keys().isdisjoint(details) and headline.keys().isdisjoint(measured)
    assert sorted(headline) == sorted(
        [f"{task}/recall@10" for task in TASKS] + ["index/ann_recall@10"]
    )
    metrics = headline | details | measured
    for task in ("query_to_listing", "view_to_listing"):
        for name in ("recall@1", "recall@10", "recall@500", "mrr", "ndcg@10"):
            assert 0.0 <= metrics[f"{task}/{name}"] <= 1.0
            assert f"{task}/index/{name}" in metrics
        assert metrics[f"{task}/recall@500"] == 1.0  # K capped at the 60 listings
        assert metrics[f"{task}/recall@10"] > 3 * 10 / 60  # far better than random
    assert 0.0 <= metrics["index/ann_recall@10"] <= 1.0
    assert metrics["index/latency_p99_ms"] >= metrics["index/latency_p50_ms"] > 0
    assert metrics["diagnostics/modality_gap_w2"] > 0
    assert (
        metrics["diagnostics/query_to_listing/recall@10_cosine"]
        == metrics["diagnostics/query_to_listing/recall@10_euclidean"]  # unit vectors
    )
    gate_rows = json.loads((out / contract.GATES.name).read_text())
    assert {"gate", "metric", "threshold", "value", "passed"} <= set(gate_rows[0])
    assert [g["passed"] for g in gate_rows if g["gate"].startswith("min:")] == [True, True]
    assert (out / contract.RECALL_PLOT.name).stat().st_size > 0
    assert "min:query_to_listing/recall@10" in result.summary  # the gate table
    training = read_run(indexed.step_dir("train"))["mlflow"]["run_id"]
    evaluation = read_run(out)["mlflow"]["run_id"]
    client = mlflow.MlflowClient(tracking_uri=indexed.mlflow_uri)
    logged = client.get_run(evaluation)
    assert logged.data.tags["mlflow.parentRunId"] == training  # nested in its training run
    assert (logged.info.run_name, logged.data.tags["kind"]) == ("evaluate-retrain", "retrain")
    assert logged.data.metrics["query_to_listing/recall_at_10"] == pytest.approx(
        metrics["query_to_listing/recall@10"]
    )
    assert "plots/recall_at_k.png" in {a.path for a in client.list_artifacts(evaluation, "plots")}


def test_the_ann_check_searches_the_sample_of_queries_it_is_given(indexed):
    config = NO_CHAMPION.model_copy(update={"ann_queries": 2, "diagnostics": False})

    result = evaluate.run(config, indexed)

    out = indexed.step_dir("evaluate")
    details = json.loads((out / contract.DETAILS.name).read_text())
    assert details["query_to_listing/index/queries"] == 2
    assert 0 <= details["query_to_listing/index/exact_recall@10"] <= 1
    assert "on 2 queries, exact" in result.summary


def test_a_champion_with_the_challenger_s_weights_differs_by_exactly_zero(indexed):
    """The same weights are embedded once; a weaker and a stronger champion are compared
    in tests/test_promote.py."""
    client = mlflow.MlflowClient(tracking_uri=indexed.mlflow_uri)
    client.set_registered_model_alias("listing-encoder", "champion", "1")
    config = NO_CHAMPION.model_copy(update={"champion": "models:/listing-encoder@champion"})
    try:
        evaluate.run(config, indexed)
    finally:
        client.delete_registered_model_alias("listing-encoder", "champion")

    out = indexed.step_dir("evaluate")
    metrics = json.loads((out / contract.METRICS.name).read_text())
    metrics |= json.loads((out / contract.CHAMPION.name).read_text())["flat"]
    for task in ("query_to_listing", "view_to_listing"):
        assert metrics[f"champion/{task}/recall@10"] == pytest.approx(metrics[f"{task}/recall@10"])
        assert metrics[f"champion/{task}/delta_recall@10"] == 0.0
        low = metrics[f"champion/{task}/delta_recall@10_ci_low"]
        assert low <= 0.0 <= metrics[f"champion/{task}/delta_recall@10_ci_high"]
    curves = json.loads((indexed.step_dir("evaluate") / contract.CURVES.name).read_text())
    assert [row["k"] for row in curves] == [1, 10, 50, 500]
    assert all({"view_to_listing/model", "view_to_listing/frozen"} <= set(row) for row in curves)


def test_a_failing_gate_makes_the_cli_exit_non_zero_naming_the_gate(indexed, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", indexed.mlflow_uri)

    code = main(
        [
            "evaluate",
            "--set",
            f"paths.workdir={indexed.workdir}",
            "--set",
            "evaluate.champion=null",
            "--set",
            "evaluate.gates.min.view_to_listing/recall@10=1.01",
            "--set",
            "evaluate.gates.min_gain_over_frozen={}",
            "--set",
            "evaluate.gates.min_queries=1",
        ]
    )

    captured = capsys.readouterr()
    assert code == 1
    assert "min:view_to_listing/recall@10" in captured.err and "needs >= 1.0100" in captured.err
    assert "FAIL" in captured.out  # the gate table, on stdout
    gate_rows = json.loads((indexed.step_dir("evaluate") / contract.GATES.name).read_text())
    assert [g["gate"] for g in gate_rows if not g["passed"]] == ["min:view_to_listing/recall@10"]


def test_a_model_with_a_fine_tuned_backbone_is_embedded_through_its_tail(featurized, tmp_path):
    paths = fresh_paths(featurized, tmp_path, "tuned")
    train.run(TINY.model_copy(update={"finetune_blocks": 1, "epochs": 2}), paths)

    embed.run(EmbedConfig(device="cpu"), paths)

    out = paths.step_dir("embed")
    ids = pq.read_table(out / contract.EMBEDDED_IDS.name).column(0).to_pylist()
    vectors = np.concatenate([np.load(p) for p in embedding_files.embedding_parts(out)])
    loaded = registry.load_model(None, paths, torch.device("cpu"))
    featurize_dir = paths.step_dir("featurize")
    data = load_training_data(featurize_dir, read_manifest(featurize_dir), 0.2, 0.2)
    encoder = activations.image_encoder(loaded.spec, 1, torch.device("cpu"))
    data = activations.with_activations(
        data, encoder, paths.catalog, paths.step_dir("train") / contract.ACTIVATIONS.name
    )
    reference = train.embed_all_listings(loaded.model, data, torch.device("cpu"))
    order = [data.listing_ids.index(lid) for lid in ids]
    np.testing.assert_allclose(vectors, reference[order], atol=1e-5)
