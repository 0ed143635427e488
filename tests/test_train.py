"""train on a tiny sample catalog: it learns, resumes exactly, and records to MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from components import contract, train
from components.config import CorruptConfig, DistillConfig, StepPaths, TrainConfig
from components.io import activations, checkpoints, training_data
from components.io.images import decode_image
from components.io.manifest import AlteredFile, read_manifest, read_run, sha256_file
from components.release import registry
from tests.conftest import LISTINGS
from tests.conftest import fresh_paths as _fresh

pytestmark = pytest.mark.integration

TINY = TrainConfig(
    epochs=6,
    batch_size=16,
    hidden=128,
    dim=64,
    patience=6,
    device="cpu",
    val_fraction=0.2,
    test_fraction=0.2,
)


def test_training_lowers_the_loss_and_beats_random_retrieval(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "learn")

    result = train.run(TINY, paths)

    history = json.loads((result.out_dir / "history.json").read_text())
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    random_recall_at_10 = 10 / LISTINGS
    assert result.best["val/view_to_listing/recall@10"] > 2.5 * random_recall_at_10
    assert result.best["val/query_to_listing/recall@10"] > 1.5 * random_recall_at_10
    splits = pq.read_table(result.out_dir / "splits.parquet").to_pylist()
    assert {s["split"] for s in splits} == {"train", "val", "test"}


# the teacher, the barycenter fusion and the training-only damage, all in one run
DISTILLED = TINY.model_copy(
    update={
        "fusion": "barycenter",
        "distill": DistillConfig(weight=1.0, momentum=0.9),
        "corrupt": CorruptConfig(swap_fraction=0.2, drop_fraction=0.2),
    }
)


@pytest.mark.parametrize("config", [TINY, DISTILLED], ids=["default", "distilled"])
def test_an_interrupted_run_resumes_where_it_stopped_and_ends_the_same(
    featurized, tmp_path, monkeypatch, config
):
    straight = train.run(config, _fresh(featurized, tmp_path, "straight"))
    paths = _fresh(featurized, tmp_path, "interrupted")
    original = train.Trainer._train_epoch

    def crash_at_epoch_3(self, epoch):
        if epoch == 3:
            raise KeyboardInterrupt("node lost")
        return original(self, epoch)

    monkeypatch.setattr(train.Trainer, "_train_epoch", crash_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train.run(config, paths)
    monkeypatch.setattr(train.Trainer, "_train_epoch", original)
    checkpoint = checkpoints.load(paths.path(contract.CHECKPOINTS))
    resumed = train.run(config, paths)

    assert checkpoint["epoch"] == 2
    assert (checkpoint["teacher"] is None) == (config.distill.weight == 0)
    a = json.loads((straight.out_dir / "history.json").read_text())
    b = json.loads((resumed.out_dir / "history.json").read_text())
    assert [h["epoch"] for h in b] == list(range(6))
    for left, right in zip(a, b, strict=True):
        assert left["loss"] == pytest.approx(right["loss"], rel=1e-5)
        assert left["val/score"] == pytest.approx(right["val/score"], abs=1e-6)


def test_the_run_is_in_mlflow_with_params_metrics_and_lineage(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "tracked")

    result = train.run(TINY, paths)

    reference = read_run(result.out_dir)["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=paths.mlflow_uri)
    run = client.get_run(reference["run_id"])
    params, tags = run.data.params, run.data.tags
    assert params["train.objective"] == "factorized" and params["seed"] == "3"
    # what made the features, the catalog they came from, the code
    assert params["featurize.image_encoder"] == "efficientnet-lite0"
    assert params["featurize.image_size"] == "96"
    assert params["featurize.text_encoder"] == "use-multilingual-v3"
    assert tags["lineage.catalog"] == paths.catalog
    listings = featurized.step_dir("catalog") / "listings.parquet"
    assert tags["lineage.catalog_sha256.listings.parquet"] == sha256_file(listings)
    assert tags["lineage.features_manifest_sha256"]
    assert tags["code.package"] == "0.1.0" and len(tags["code.git_commit"]) == 40
    history = client.get_metric_history(run.info.run_id, "val/query_to_listing/recall_at_10")
    assert [m.step for m in history] == list(range(6))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/loss_curves.png" in artifacts


def test_challenger_loads_from_the_registry_and_embeds_raw_listings_and_queries(
    featurized, tmp_path
):
    paths = _fresh(featurized, tmp_path, "served")
    train.run(TINY, paths)
    catalog_dir = paths.step_dir("catalog").resolve()
    listings = pq.read_table(catalog_dir / "listings.parquet").to_pylist()[:2]
    splits = pq.read_table(paths.step_dir("train") / "splits.parquet").to_pylist()
    held_out = {s["id"] for s in splits if s["kind"] == "held_out_view"}
    rows = [  # the views the model fuses: every view but the one held out for evaluation
        {
            **row,
            "kind": "listing",
            "image_uris": [
                (catalog_dir / u).as_uri() for u in row["image_uris"] if u not in held_out
            ],
        }
        for row in listings
    ] + [
        {"kind": "query", "query": "a red heart"},
        {"kind": "image_query", "image_uri": (catalog_dir / listings[0]["image_uris"][0]).as_uri()},
    ]
    mlflow.set_tracking_uri(paths.mlflow_uri)

    model = mlflow.pyfunc.load_model("models:/listing-encoder@challenger")
    embeddings = model.predict(pd.DataFrame(rows))

    assert embeddings.shape == (4, TINY.dim)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    data = training_data.load_training_data(
        paths.step_dir("featurize"), read_manifest(paths.step_dir("featurize")), 0.2, 0.2
    )
    trained = train.build_model(TINY, data)
    trained.load_state_dict(torch.load(paths.step_dir("train") / contract.MODEL_WEIGHTS.name))
    reference = train.embed_all_listings(trained, data, torch.device("cpu"))
    for row, embedding in zip(listings, embeddings[:2], strict=True):
        index = data.listing_ids.index(row["listing_id"])
        np.testing.assert_allclose(embedding, reference[index], atol=1e-4)
    with pytest.raises(Exception, match="unknown kind"):
        model.predict(pd.DataFrame([{"kind": "banana"}]))


def test_a_checkpoint_that_no_longer_fits_the_model_is_not_resumed(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "stale")
    checkpoints.save(
        paths.path(contract.CHECKPOINTS),
        {
            "epoch": 4,
            "config": TINY.model_dump(),
            "lineage": {
                "featurize": read_manifest(paths.step_dir("featurize"))["outputs"],
                "seed": paths.seed,
                "code": train.code_hash(),
            },
            "model": {"image.kind.weight": torch.zeros(99, 3)},
        },
        epoch=4,
    )

    result = train.run(TINY, paths)

    history = json.loads((result.out_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(TINY.epochs))


def test_running_a_finished_training_again_registers_nothing_new(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "again")
    first = train.run(TINY, paths)
    version = read_run(first.out_dir)["registered_model"]["version"]

    second = train.run(TINY, paths)

    client = mlflow.tracking.MlflowClient(tracking_uri=paths.mlflow_uri)
    assert [str(v.version) for v in client.search_model_versions("name='listing-encoder'")] == [
        version
    ]
    assert len(client.search_runs([read_run(first.out_dir)["mlflow"]["experiment_id"]])) == 1
    assert second.best == first.best
    assert f"already trained and registered as version {version}" in second.summary


def test_a_checkpoint_from_another_seed_is_not_resumed(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "reseeded")
    short = TINY.model_copy(update={"epochs": 2})
    train.run(short, paths)
    other_seed = StepPaths(paths.workdir, paths.catalog, paths.tracking_uri, seed=4)

    result = train.run(short, other_seed)

    history = json.loads((result.out_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert read_manifest(result.out_dir)["inputs"]["seed"] == 4
    assert read_run(result.out_dir)["registered_model"]["version"] == "2"


def test_fine_tuning_the_backbone_tail_trains_it_and_the_served_model_uses_it(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "tuned")
    config = TINY.model_copy(update={"finetune_blocks": 1, "epochs": 2, "finetune_lr": 1e-3})

    result = train.run(config, paths)

    state = torch.load(result.out_dir / contract.MODEL_WEIGHTS.name, weights_only=True)
    spec = read_manifest(result.out_dir)["model"]
    encoder = activations.image_encoder(spec, 1, torch.device("cpu"))
    pretrained = encoder.tail().state_dict()
    tail_keys = [k for k in state if k.startswith("image_tail.")]
    assert tail_keys and spec["finetune_blocks"] == 1
    assert any(
        not torch.equal(state[k], pretrained[k.removeprefix("image_tail.")])
        for k in tail_keys
        if state[k].is_floating_point()
    )
    # the served model runs the frozen part on the raw photo, then the trained tail
    catalog_dir = paths.step_dir("catalog").resolve()
    photo = pq.read_table(catalog_dir / "listings.parquet").to_pylist()[0]["image_uris"][0]
    mlflow.set_tracking_uri(paths.mlflow_uri)
    served = mlflow.pyfunc.load_model("models:/listing-encoder@challenger")
    embedding = served.predict(
        pd.DataFrame([{"kind": "image_query", "image_uri": (catalog_dir / photo).as_uri()}])
    )
    model = train.ListingModel(**spec["model"], image_tail=encoder.tail())
    model.load_state_dict(state)
    model.eval()
    image = decode_image((catalog_dir / photo).read_bytes(), photo)
    cut = torch.from_numpy(encoder.encode([image]))
    expected = model.embed_image_queries(cut).detach().numpy()
    np.testing.assert_allclose(embedding, expected, atol=1e-4)
    untuned = train.ListingModel(**spec["model"], image_tail=encoder.tail())
    untuned.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("image_tail.")}, strict=False
    )
    untuned.eval()
    assert not np.allclose(untuned.embed_image_queries(cut).detach().numpy(), expected, atol=1e-4)


def test_torchrun_with_two_processes_trains_and_rank_zero_alone_records(featurized, tmp_path):
    # Given 60 listings and 16 per rank: global batches of 32 and 28, the last split 14/14
    paths = _fresh(featurized, tmp_path, "torchrun")
    overrides = {
        "paths.workdir": str(paths.workdir),
        "train.epochs": 3,
        "train.batch_size": 16,
        "train.hidden": 128,
        "train.dim": 64,
        "train.device": "cpu",
        "train.val_fraction": 0.2,
        "train.test_fraction": 0.2,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "components", "train"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]

    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": paths.mlflow_uri, "OMP_NUM_THREADS": "1"},
    )

    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(paths.step_dir("train"))
    assert manifest["counts"]["processes"] == 2 and manifest["counts"]["epochs"] == 3
    assert done.stdout.count("train: factorized on cpu x2") == 1  # one summary, from rank 0
    client = mlflow.tracking.MlflowClient(tracking_uri=paths.mlflow_uri)
    experiment = read_run(paths.step_dir("train"))["mlflow"]["experiment_id"]
    assert len(client.search_runs([experiment])) == 1


def test_a_finished_run_whose_outputs_were_removed_writes_them_again(featurized, tmp_path):
    # DVC removes a stage's outputs before running it; the persisted checkpoint stays
    paths = _fresh(featurized, tmp_path, "outs-removed")
    first = train.run(TINY, paths)
    weights = torch.load(first.out_dir / contract.MODEL_WEIGHTS.name, weights_only=True)
    for name in (contract.MODEL_WEIGHTS.name, "manifest.json", "history.json"):
        (first.out_dir / name).unlink()

    second = train.run(TINY, paths)

    again = torch.load(second.out_dir / contract.MODEL_WEIGHTS.name, weights_only=True)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert second.best == first.best
    # the same weights are the same registered version, not a second one
    assert read_run(second.out_dir)["registered_model"]["version"] == "1"
    client = mlflow.tracking.MlflowClient(tracking_uri=paths.mlflow_uri)
    assert len(client.search_model_versions("name='listing-encoder'")) == 1


def test_an_altered_checkpoint_is_named_and_never_loaded(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "altered")
    directory = paths.path(contract.CHECKPOINTS)
    written = checkpoints.save(directory, {"epoch": 0, "weights": torch.ones(3)}, epoch=0)
    assert checkpoints.load(directory)["weights"].tolist() == [1.0, 1.0, 1.0]
    written.write_bytes(written.read_bytes()[:-8] + b"tampered")

    with pytest.raises(AlteredFile, match=r"epoch-000000\.pt: sha256 .* altered or damaged"):
        train.run(TINY, paths)


def test_a_checkpoint_holding_arbitrary_objects_is_refused(tmp_path):
    """weights_only: unpickling a checkpoint builds tensors and plain containers only."""
    checkpoints.save(tmp_path, {"epoch": 0, "hook": Path("/etc/passwd")}, epoch=0)

    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoints.load(tmp_path)


def test_a_killed_checkpoint_write_leaves_the_previous_one_whole(tmp_path):
    checkpoints.save(tmp_path, {"epoch": 0}, epoch=0)
    (tmp_path / "epoch-000001.pt.tmp").write_bytes(b"half a checkpoint")  # killed mid-write

    assert checkpoints.load(tmp_path) == {"epoch": 0}
    checkpoints.save(tmp_path, {"epoch": 1}, epoch=1)
    assert checkpoints.load(tmp_path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch-000001.pt"]


def test_a_registered_model_altered_in_the_artifact_store_is_named_not_loaded(featurized, tmp_path):
    paths = _fresh(featurized, tmp_path, "tampered")
    train.run(TINY, paths)
    trained = torch.load(paths.path(contract.MODEL_WEIGHTS), weights_only=True)
    loaded = registry.load_model("models:/listing-encoder/1", paths, torch.device("cpu"))
    assert all(torch.equal(v, trained[k]) for k, v in loaded.model.state_dict().items())
    (stored,) = [p for p in (paths.workdir / "mlartifacts").rglob("model.pt") if p.is_file()]
    stored.write_bytes(stored.read_bytes()[:-8] + b"tampered")

    with pytest.raises(AlteredFile, match=r"models:/listing-encoder/1.*altered or damaged"):
        registry.load_model("models:/listing-encoder/1", paths, torch.device("cpu"))
