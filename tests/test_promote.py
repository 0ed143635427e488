"""train -> embed -> index -> evaluate -> promote on the tiny catalog, with MLflow on
sqlite and the production store on a local dir or on moto_server; versions and rollback
from the command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import uuid

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml

from components import embed, evaluate, index, promote, train
from components.cli import main
from components.config import (
    EmbedConfig,
    EvaluateConfig,
    GatesConfig,
    IndexConfig,
    PromoteConfig,
    RegistryConfig,
    StorageConfig,
)
from components.contract import SPLITS
from components.errors import StepFailed
from components.io.manifest import AlteredFile, read_run
from components.release import production, registry
from components.release.storage import open_storage
from tests.conftest import fresh_paths
from tests.test_evaluate import LENIENT, TINY

pytestmark = pytest.mark.integration

EVALUATE = EvaluateConfig(ks=[1, 10, 50], bootstrap=100, diagnostics_sample=50, gates=LENIENT)
NAME, ALIAS = "listing-encoder", "champion"


@pytest.fixture(scope="module")
def evaluated_once(featurized, tmp_path_factory):
    paths = fresh_paths(featurized, tmp_path_factory.mktemp("promote"), "work")
    train.run(TINY, paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    evaluate.run(EVALUATE, paths)
    return paths


@pytest.fixture
def evaluated(evaluated_once, tmp_path):
    """A copy of the evaluated workdir, registry included, for each test: no test sees
    what another promoted, whatever order they run in."""
    return copy_of(evaluated_once, tmp_path / "evaluated")


def copy_of(paths, work):
    """`paths` with its workdir (and its MLflow store) copied to `work`."""
    shutil.copytree(paths.workdir, work, symlinks=True)
    return dataclasses.replace(paths, workdir=work, tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def store(paths):
    return open_storage(paths.storage, paths.storage_uri)


def registered_version(paths) -> str:
    return read_run(paths.step_dir("train"))["registered_model"]["version"]


def test_promote_publishes_the_evaluated_release_and_moves_the_champion(evaluated):
    result = promote.run(PromoteConfig(), evaluated)

    loaded = production.load_current_index(store(evaluated))
    listing_ids = pq.read_table(evaluated.step_dir("embed") / "listing_ids.parquet")
    assert result.changed and loaded.version == result.version
    assert loaded.ids.listing_ids == listing_ids.column(0).to_pylist() and loaded.index.ntotal == 60
    version = registered_version(evaluated)
    assert registry.alias_version(evaluated, NAME, ALIAS) == version
    manifest = loaded.manifest
    assert manifest["model"]["version"] == version and manifest["model"]["run_id"]
    assert manifest["previous_champion"] == {"alias": ALIAS, "model_version": None}
    assert set(manifest["lineage"]) == {"validate", "featurize", "train", "embed", "index"}
    assert manifest["params"]["train"]["dim"] == TINY.dim
    metrics = json.loads((evaluated.step_dir("evaluate") / "metrics.json").read_text())
    assert manifest["metrics"] == metrics and all(g["passed"] for g in manifest["gates"])
    assert any(name.startswith("embeddings/part-") for name in manifest["files"])
    client = mlflow.MlflowClient(tracking_uri=evaluated.mlflow_uri)
    promoted = client.get_model_version(NAME, version)
    assert promoted.tags["production_version"] == result.version
    assert promoted.aliases == [ALIAS]  # the challenger it was is the champion now

    again = promote.run(PromoteConfig(), evaluated)

    assert not again.changed and again.version == result.version
    assert "already holds this index and model" in again.summary


def test_promote_refuses_when_a_gate_failed(evaluated):
    promote.run(PromoteConfig(), evaluated)
    before = production.read_pointer(store(evaluated))
    strict = GatesConfig(
        min={"query_to_listing/recall@10": 1.01},
        max_regression={},
        min_gain_over_frozen={},
        min_queries=1,
    )
    with pytest.raises(StepFailed):
        evaluate.run(EVALUATE.model_copy(update={"gates": strict}), evaluated)

    with pytest.raises(StepFailed, match="refusing to promote: 1 gate.*min:query_to_"):
        promote.run(PromoteConfig(), evaluated)
    assert production.read_pointer(store(evaluated)) == before


def test_promote_refuses_an_index_that_changed_since_evaluate(evaluated):
    index.run(IndexConfig(factory="HNSW16"), evaluated)

    with pytest.raises(StepFailed, match="index changed since evaluate ran"):
        promote.run(PromoteConfig(), evaluated)


def test_a_retrain_is_compared_with_the_champion_and_rollback_moves_the_alias_back(
    evaluated, tmp_path, monkeypatch, capsys
):
    first = promote.run(PromoteConfig(), evaluated)
    first_model = registered_version(evaluated)

    train.run(TINY.model_copy(update={"epochs": 3}), evaluated)  # another model version
    embed.run(EmbedConfig(device="cpu"), evaluated)
    index.run(IndexConfig(), evaluated)
    evaluate.run(EVALUATE, evaluated)
    second = promote.run(PromoteConfig(), evaluated)

    judged = read_run(evaluated.step_dir("evaluate"))
    assert judged["champion"]["production_version"] == first.version
    assert judged["champion"]["version"] == first_model
    compared = json.loads((evaluated.step_dir("evaluate") / "champion.json").read_text())
    assert "champion/query_to_listing/delta_recall@10" in compared["flat"]
    second_model = registered_version(evaluated)
    assert second.changed and second_model != first_model
    assert registry.alias_version(evaluated, NAME, ALIAS) == second_model
    manifest = production.load_current_index(store(evaluated)).manifest
    assert manifest["previous_champion"]["model_version"] == first_model
    assert manifest["previous"] == first.version

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": {"workdir": str(evaluated.workdir)}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", evaluated.mlflow_uri)
    assert main(["rollback", "--params", str(params)]) == 0
    assert f"is now {first.version} (was {second.version})" in capsys.readouterr().out
    assert registry.alias_version(evaluated, NAME, ALIAS) == first_model
    assert production.load_current_index(store(evaluated)).version == first.version

    assert main(["versions", "--params", str(params)]) == 0
    rows = {
        line.split()[2 if line.startswith("*") else 1]: line.split()
        for line in capsys.readouterr().out.splitlines()[2:4]
    }
    assert rows[first.version][:2] == ["*", "#1"]  # current again
    assert rows[first.version][3:7] == ["retrain", "-", "-", f"{NAME}/{first_model}"]
    assert rows[second.version][0] == "#2"
    assert rows[second.version][2:6] == ["retrain", "-", "-", f"{NAME}/{second_model}"]

    assert main(["rollback", "--params", str(params), "--to", second.version]) == 0
    assert registry.alias_version(evaluated, NAME, ALIAS) == second_model
    assert main(["rollback", "--params", str(params), "--to", "nope"]) == 1
    assert "'nope' is not a complete version" in capsys.readouterr().err


# barely trained from scratch: a genuinely weaker model than TINY on the same data
WEAK = TINY.model_copy(update={"adapter": "mlp", "epochs": 1, "lr": 1e-6})
REGRESSION = GatesConfig(
    min={},
    max_regression={"query_to_listing/recall@10": 0.03, "view_to_listing/recall@10": 0.03},
    min_gain_over_frozen={},
    min_queries=1,
    max_ann_loss=None,
)


def _train_and_evaluate(paths, config, champion: str | None):
    train.run(config, paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    gated = EVALUATE.model_copy(update={"champion": champion, "gates": REGRESSION})
    return evaluate.run(gated, paths)


def _recall_at_10(paths, uri: str) -> dict[str, float]:
    """Recall@10 of a registered model on the test split, computed here: its embeddings of
    every listing and of the test queries, brute-force cosine top 10 in numpy, the share of
    each query's relevant listings found, averaged over queries."""
    import numpy as np
    import torch

    from components.core.retrieval import embed_queries, present
    from components.io.embedder import ListingEmbedder, held_out_refs
    from components.io.test_split import test_split_queries

    cpu = torch.device("cpu")
    loaded = registry.load_model(uri, paths, cpu)
    embedder = ListingEmbedder(loaded.model, loaded.spec, paths, cpu)
    ids, listings = embedder.embed_all(held_out_refs(paths.path(SPLITS)), 1024)
    recall = {}
    for queries in present(test_split_queries(paths, embedder, {i: n for n, i in enumerate(ids)})):
        top = np.argsort(-(embed_queries(loaded.model, queries, cpu) @ listings.T), axis=1)[:, :10]
        found = [
            len(set(row) & rel) / len(rel) for row, rel in zip(top, queries.relevant, strict=True)
        ]
        recall[queries.task] = float(np.mean(found))
    return recall


def test_the_regression_gate_passes_a_stronger_challenger_and_stops_a_weaker_one(
    featurized, tmp_path
):
    paths = fresh_paths(featurized, tmp_path, "champions")
    _train_and_evaluate(paths, WEAK, champion=None)
    weak = promote.run(PromoteConfig(), paths)
    weak_model = registered_version(paths)
    weak_recall = _recall_at_10(paths, f"models:/{NAME}/{weak_model}")

    # a stronger challenger against the weaker champion: compared, better, promoted
    _train_and_evaluate(paths, TINY, champion="current")
    strong_model = registered_version(paths)
    strong_recall = _recall_at_10(paths, f"models:/{NAME}/{strong_model}")
    out = paths.step_dir("evaluate")
    compared = json.loads((out / "champion.json").read_text())
    assert compared["reference"]["version"] == weak_model != strong_model
    for task, recall in weak_recall.items():
        assert compared["flat"][f"champion/{task}/recall@10"] == pytest.approx(recall)
    gate = _gate(out, "max_regression:query_to_listing/recall@10")
    drop = weak_recall["query_to_listing"] - strong_recall["query_to_listing"]
    assert gate["passed"] and gate["value"] == pytest.approx(drop) and drop < -0.2
    strong = promote.run(PromoteConfig(), paths)
    assert strong.changed and production.read_pointer(store(paths)).previous == weak.version

    # the weaker model again, now against the stronger champion: stopped before promotion
    with pytest.raises(StepFailed, match="max_regression:query_to_listing/recall@10 = 0"):
        _train_and_evaluate(paths, WEAK, champion="current")
    gate = _gate(out, "max_regression:query_to_listing/recall@10")
    assert not gate["passed"] and gate["value"] == pytest.approx(-drop)
    with pytest.raises(StepFailed, match="refusing to promote"):
        promote.run(PromoteConfig(), paths)
    assert production.read_pointer(store(paths)).version == strong.version
    assert registry.alias_version(paths, NAME, ALIAS) == strong_model


def _gate(out, name: str) -> dict:
    (row,) = [g for g in json.loads((out / "gates.json").read_text()) if g["gate"] == name]
    return row


SECRET_ID, SECRET_KEY = "AKIAPROMOTETEST7777", "s3cr3t/promote+Never-Logged"


def test_promote_to_s3_keeps_credentials_out_of_logs_manifests_and_mlflow(
    evaluated, s3_env, monkeypatch, caplog, capsys, tmp_path
):
    from components.io.s3 import s3_client

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", evaluated.mlflow_uri)
    s3_client.cache_clear()
    bucket = f"prod-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=bucket)
    params = tmp_path / "params.yaml"
    settings = {
        "paths": {"workdir": str(evaluated.workdir)},
        "storage": {"uri": f"s3://{bucket}/p"},
    }
    params.write_text(yaml.safe_dump(settings))
    caplog.set_level(logging.DEBUG)

    assert main(["create-store", "-v", "--params", str(params)]) == 0
    assert main(["promote", "-v", "--params", str(params)]) == 0
    assert main(["versions", "--params", str(params)]) == 0

    out = capsys.readouterr()
    s3 = open_storage(StorageConfig(uri=f"s3://{bucket}/p"))
    loaded = production.load_current_index(s3)
    assert loaded.index.ntotal == 60 and f"s3://{bucket}/p" in out.out
    texts = [caplog.text, out.out, out.err]
    texts += [s3.get_bytes(key).decode("latin-1") for key in s3.list_keys("")]
    texts += [p.read_text() for p in evaluated.step_dir("promote").glob("*.json")]
    client = mlflow.MlflowClient(tracking_uri=evaluated.mlflow_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert runs
    for run in runs:
        texts.append(json.dumps([run.data.params, run.data.tags]))
    for version in client.search_model_versions(f"name='{NAME}'"):
        texts.append(json.dumps(version.tags))
    assert len(texts) > 10
    for text in texts:
        assert SECRET_ID not in text and SECRET_KEY not in text
    s3_client.cache_clear()


def test_promote_publishes_to_the_workdir_store_unless_storage_uri_names_another(
    evaluated, tmp_path
):
    elsewhere = dataclasses.replace(evaluated, storage=StorageConfig(uri=str(tmp_path / "other")))
    production.create_store(open_storage(elsewhere.storage))

    promote.run(PromoteConfig(), elsewhere)

    assert production.read_pointer(open_storage(elsewhere.storage)) is not None
    assert not (evaluated.workdir / "production").exists()
    promote.run(PromoteConfig(), evaluated)
    assert (evaluated.workdir / "production" / "indices" / "CURRENT").is_file()


def test_a_renamed_registered_model_is_registered_promoted_and_aliased_under_its_name(
    featurized, tmp_path
):
    """registry.model_name is the one name train registers under and promote checks."""
    renamed = RegistryConfig(
        model_name="shop-encoder", challenger_alias="candidate", champion_alias="live"
    )
    paths = dataclasses.replace(fresh_paths(featurized, tmp_path, "renamed"), registry=renamed)
    train.run(TINY, paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    evaluate.run(EVALUATE, paths)
    version = registered_version(paths)
    assert registry.alias_version(paths, "shop-encoder", "candidate") == version

    result = promote.run(PromoteConfig(), paths)

    assert registry.alias_version(paths, "shop-encoder", "live") == version
    assert registry.alias_version(paths, "shop-encoder", "candidate") is None  # promoted
    assert production.load_current_index(store(paths)).manifest["model"]["name"] == "shop-encoder"
    names = [m.name for m in mlflow.MlflowClient(paths.mlflow_uri).search_registered_models()]
    assert names == ["shop-encoder"] and result.changed


def test_a_release_that_shrank_past_max_shrink_is_refused_unless_allowed(evaluated, tmp_path):
    """The tiny release serves 60 listings; the store's current release claims 1,000."""
    paths = dataclasses.replace(evaluated, storage=StorageConfig(uri=str(tmp_path / "store")))
    big = tmp_path / "big.bin"
    big.write_bytes(b"a release of 1,000 listings")
    model = {"name": NAME, "version": "0", "sha256": "0" * 64}
    earlier = production.publish(
        store(paths), {"big.bin": big}, {"index": {"vectors": 1000}}, model
    )

    with pytest.raises(
        StepFailed, match=r"60 listings, 94% fewer than the current release .*1,000"
    ):
        promote.run(PromoteConfig(), paths)
    assert production.read_pointer(store(paths)).version == earlier.version

    result = promote.run(PromoteConfig(allow_shrink=True), paths)

    listings = production.load_current_index(store(paths)).manifest["listings"]
    assert result.changed and listings["indexed"] == 60 and listings["clean"] == 60
    assert listings["current"] == {"version": earlier.version, "indexed": 1000}
    assert listings["shrink_allowed"] is True
    table = promote.versions(paths)
    assert "1,000" in table and " 60 " in table


@pytest.mark.parametrize(
    ("step", "name", "consumer"),
    [
        ("train", "model.pt", lambda paths: embed.run(EmbedConfig(device="cpu"), paths)),
        (
            "embed",
            "embeddings/part-000000.npy",
            lambda paths: index.run(IndexConfig(factory="HNSW16"), paths),  # a rebuild
        ),
        ("embed", "embeddings/part-000000.npy", lambda paths: evaluate.run(EVALUATE, paths)),
        ("index", "index.faiss", lambda paths: evaluate.run(EVALUATE, paths)),
        ("index", "ids.parquet", lambda paths: promote.run(PromoteConfig(), paths)),
        ("evaluate", "metrics.json", lambda paths: promote.run(PromoteConfig(), paths)),
    ],
    ids=[
        "weights->embed",
        "embeddings->index",
        "embeddings->evaluate",
        "index->evaluate",
        "ids->promote",
        "metrics->promote",
    ],
)
def test_an_output_altered_on_disk_is_named_by_the_next_step_not_used(
    evaluated, step, name, consumer
):
    path = evaluated.step_dir(step) / name
    original = path.read_bytes()
    before = production.read_pointer(store(evaluated))
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        output = name.split("/")[0]  # a folder output is named as a whole
        with pytest.raises(AlteredFile, match=rf"{output}: sha256 .* run that step again"):
            consumer(evaluated)
    finally:
        path.write_bytes(original)
    assert production.read_pointer(store(evaluated)) == before


def test_a_retrain_records_why_it_ran_in_its_runs_its_release_and_versions(
    featurized, tmp_path, capsys
):
    why = "staleness: 27.0% of the listings are new or changed since 20261202T1500 (max 25%)"
    paths = dataclasses.replace(fresh_paths(featurized, tmp_path, "work"), trigger=why)
    train.run(TINY, paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    evaluate.run(EVALUATE, paths)
    promote.run(PromoteConfig(), paths)

    manifest = production.load_current_index(store(paths)).manifest
    assert manifest["trigger"] == why
    client = mlflow.MlflowClient(tracking_uri=paths.mlflow_uri)
    assert client.get_run(manifest["model"]["run_id"]).data.tags["trigger"] == why  # training
    evaluation = client.get_run(manifest["evaluation"]["mlflow"]["run_id"]).data.tags
    assert (evaluation["trigger"], evaluation["kind"]) == (why, "retrain")
    capsys.readouterr()
    assert main(["versions", "--set", f"paths.workdir={paths.workdir}"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("*  ")]
    assert row.rstrip().endswith(why[:45] + "...")  # cut to the column; the manifest holds all


def test_the_store_is_named_where_it_is_in_the_registry_and_mlflow(evaluated, monkeypatch):
    monkeypatch.chdir(evaluated.workdir.parent)  # a relative workdir, as params.yaml's
    relative = dataclasses.replace(
        evaluated, workdir=type(evaluated.workdir)(evaluated.workdir.name)
    )

    promote.run(PromoteConfig(), relative)

    where = str(evaluated.workdir / "production")
    client = mlflow.MlflowClient(tracking_uri=evaluated.mlflow_uri)
    version = client.get_model_version(NAME, registered_version(evaluated))
    assert version.tags["production_store"] == where
    evaluation = read_run(evaluated.step_dir("evaluate"))["mlflow"]["run_id"]
    assert client.get_run(evaluation).data.tags["release.store"] == where
