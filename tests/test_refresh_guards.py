"""The refresh's protections, each fed the case it exists for, on a promoted tiny release
(`copied`: a workdir of its own, store and MLflow registry included): the coverage gate
through evaluate, every reason the index update falls back to a full build, every
staleness reason, the two-model guards of embed and the service, a removal written while
a refresh runs, and gates skipped for too few test queries."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from components import embed, evaluate, featurize, index, promote, refresh, validate
from components.config import (
    EmbedConfig,
    IndexConfig,
    PromoteConfig,
    StalenessConfig,
    StepPaths,
    with_overrides,
)
from components.contract import EMBEDDED_IDS, INDEX, INDEX_DELTA, INDEX_IDS, PROFILE
from components.errors import StepFailed
from components.io.catalog_reader import CatalogRoot
from components.io.embedding_files import Embeddings
from components.io.faiss_index import (
    RowIndex,
    labels_of,
    live_index,
    load_index,
    new_index,
    read_id_table,
    write_ids,
)
from components.io.manifest import sha256_file
from components.release import production, staleness, tombstones
from components.service.releases import ReleaseKeeper
from tests.harness.refresh import change_catalog
from tests.harness.refresh import params as refresh_params
from tests.test_promote import EVALUATE

pytestmark = pytest.mark.integration

CPU = torch.device("cpu")
REFRESH_EMBED = EmbedConfig(device="cpu", reuse_current=True)
# what publish writes itself; everything else of a manifest is the release's metadata
PUBLISHED = ("version", "created_at", "content_sha256", "files", "model", "previous")


def _current(paths: StepPaths) -> dict:
    store = production.open_store(paths)
    pointer = production.read_pointer(store)
    return production.read_manifest(store, pointer.version, pointer.manifest_sha256)


def _republish(paths: StepPaths, factory: str | None = None, wrap: bool = True, **changes):
    """The current release published again as the new CURRENT, as an older version of
    this code or another writer could have left it: its index rebuilt as `factory`
    (without the IDMap2 that labels it unless `wrap`), the id map with a fingerprint
    column that disagrees with every listing (`stale_fingerprints=True`), a label dropped
    from the index (`drop_label`), no index delta (`without_delta`; nor with a rebuilt
    index, as written before deltas, unless `keep_delta`), other model or manifest fields
    (`model`, `manifest`).
    Returns the new version."""
    store = production.open_store(paths)
    current = _current(paths)
    local = paths.workdir / "republished" / current["version"]
    production.download(store, current["version"], current, list(current["files"]), local)
    ids = read_id_table(local / INDEX_IDS.name)
    if factory is not None or "drop_label" in changes:
        vectors = Embeddings(local / "embeddings").all()
        order = pq.read_table(local / EMBEDDED_IDS.name)["listing_id"].to_pylist()
        assert ids["listing_id"].to_pylist() == order  # a retrain's: label = row
        built = _built(factory or current["index"]["factory"], vectors, wrap)
        if "drop_label" in changes:
            built.remove_ids(np.array([changes["drop_label"]], dtype=np.int64))
        faiss.write_index(built, str(local / INDEX.name))
    if changes.get("stale_fingerprints"):  # id maps carried fingerprints for a while
        stale = pa.array(["0" * 32] * ids.num_rows, pa.string())
        pq.write_table(ids.append_column("fingerprint", stale), local / INDEX_IDS.name)
    else:
        write_ids(local / INDEX_IDS.name, ids)
    # the id map written anew changes the content, so a version is published even when
    # only the manifest differs
    id_map = local / INDEX_IDS.name
    pq.write_table(pq.read_table(id_map), id_map, compression="gzip")  # other bytes
    metadata = {k: v for k, v in current.items() if k not in PUBLISHED}
    metadata |= changes.get("manifest", {})
    if factory is not None:
        metadata["index"] = metadata["index"] | {"factory": factory}
    files = {name: local / name for name in current["files"]}
    rebuilt = factory is not None or "drop_label" in changes
    if (rebuilt and not changes.get("keep_delta")) or changes.get("without_delta"):
        del files[INDEX_DELTA.name]
    model = current["model"] | changes.get("model", {})
    published = production.publish(store, files, metadata, model)
    assert published.changed
    return published.version


def _built(factory: str, vectors: np.ndarray, wrap: bool) -> faiss.Index:
    if wrap:
        built = new_index(factory, vectors.shape[1], len(vectors))
    else:
        built = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not built.is_trained:
        built.train(vectors)
    if wrap:
        built.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    else:
        built.add(vectors)
    return built


def _index_after_refresh_embed(paths: StepPaths, **config) -> dict:
    """Embed as a refresh does, then index with `index.update_current` and `config`; the
    index step's manifest."""
    embed.run(REFRESH_EMBED, paths)
    index.run(IndexConfig(update_current=True, **config), paths)
    return json.loads((paths.step_dir("index") / "manifest.json").read_text())


def _read_catalog(paths: StepPaths) -> None:
    """Validate and featurize the changed catalog, as a refresh does first."""
    params = refresh_params(paths)
    validate.run(params.section("validate"), paths)
    featurize.run(params.section("featurize"), paths)


# 1. every listing once, through the evaluate step


def test_evaluate_stops_a_release_whose_index_still_holds_a_removed_listing(copied):
    paths = copied
    store = production.open_store(paths)
    gone = production.load_current_index(store).ids.listing_ids[5]
    tombstones.write(store, [gone], "sold")
    embed.run(EmbedConfig(device="cpu"), paths)  # leaves it out; the index is not rebuilt

    with pytest.raises(StepFailed, match="index:every_listing_once"):
        evaluate.run(EVALUATE, paths)

    rows = json.loads((paths.step_dir("evaluate") / "gates.json").read_text())
    (row,) = [r for r in rows if r["gate"] == "index:every_listing_once"]
    assert not row["passed"] and row["note"] == "1 foreign listings, 1 removed listings"


# 2. when the index update builds in full instead, and says why


def test_another_index_type_is_built_in_full(copied):
    built = _index_after_refresh_embed(copied, factory="IVF4,Flat")

    assert built["build"] == "full" and "has another type" in built["reason"]


def test_an_index_that_cannot_remove_is_built_in_full(copied):
    _republish(copied, factory="HNSW8")

    built = _index_after_refresh_embed(copied, factory="HNSW8")

    assert built["build"] == "full" and built["reason"] == "a HNSW8 index cannot remove vectors"


def test_a_delta_past_max_delta_is_built_in_full_and_one_within_it_updates(copied):
    change_catalog(copied.workdir / "catalog", 2, 2, 0, 0)  # 4 of 60 listings
    _read_catalog(copied)

    small = _index_after_refresh_embed(copied, max_delta=0.1)
    assert small["build"] == "update" and small["counts"]["added"] == 2

    large = _index_after_refresh_embed(copied, max_delta=0.05)
    assert large["build"] == "full" and "more than index.max_delta" in large["reason"]


def _live_listings_found_by_their_vectors(paths: StepPaths) -> faiss.Index:
    """The index step's output as readers load it (its delta merged in), checked to hold
    every embedded listing once, each found first by its own vector."""
    loaded, ids, _ = load_index(paths.step_dir("index"))  # evaluate's
    read = live_index(paths.path(INDEX), paths.path(INDEX_DELTA), ids, mapped=False)  # service's
    listing_ids = pq.read_table(paths.path(EMBEDDED_IDS))["listing_id"].to_pylist()
    vectors = Embeddings(paths.step_dir("embed") / "embeddings").all()
    for served in (loaded, read):
        assert sorted(labels_of(served)) == sorted(ids.labels)  # nothing not live
        _, rows = RowIndex(served, ids, listing_ids).search(vectors, 1)
        assert rows[:, 0].tolist() == list(range(len(listing_ids)))
    return loaded


def test_a_small_refresh_keeps_the_release_s_index_file_and_writes_only_a_delta(copied):
    released = _current(copied)["files"][INDEX.name]
    before = copied.path(INDEX).stat()
    change_catalog(copied.workdir / "catalog", 2, 1, 1, 1)  # 2 new, 2 changed, 1 removed
    _read_catalog(copied)

    kept = _index_after_refresh_embed(copied, compact_above=0.5)

    assert kept["build"] == "update" and "compacted" not in kept
    after = copied.path(INDEX).stat()  # the workdir's own file, the release's: not written
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sha256_file(copied.path(INDEX)) == released["sha256"]
    assert (kept["delta_vectors"], kept["dead_vectors"]) == (4, 3)
    assert _live_listings_found_by_their_vectors(copied).ntotal == 61


def test_a_refresh_past_compact_above_writes_the_index_whole_and_an_empty_delta(copied):
    change_catalog(copied.workdir / "catalog", 2, 1, 1, 1)
    _read_catalog(copied)

    whole = _index_after_refresh_embed(copied, compact_above=0.01)

    assert whole["build"] == "update" and "past index.compact_above" in whole["compacted"]
    assert faiss.read_index(str(copied.path(INDEX_DELTA))).ntotal == 0
    assert faiss.read_index(str(copied.path(INDEX))).ntotal == 61
    _live_listings_found_by_their_vectors(copied)


def test_a_release_written_before_index_deltas_is_updated_and_written_whole(copied):
    _republish(copied, without_delta=True)
    change_catalog(copied.workdir / "catalog", 2, 1, 1, 1)
    _read_catalog(copied)

    whole = _index_after_refresh_embed(copied, compact_above=0.5)

    assert whole["build"] == "update" and "before index deltas" in whole["compacted"]
    assert faiss.read_index(str(copied.path(INDEX_DELTA))).ntotal == 0
    _live_listings_found_by_their_vectors(copied)


def test_a_release_whose_delta_is_not_of_its_index_s_type_is_built_in_full(copied):
    _republish(copied, factory="IVF4,Flat", keep_delta=True)  # the Flat release's delta

    built = _index_after_refresh_embed(copied, factory="IVF4,Flat")

    assert built["build"] == "full" and "delta is not an index of its" in built["reason"]


def test_an_ivf_index_past_max_imbalance_is_built_in_full(copied):
    _republish(copied, factory="IVF4,Flat")

    even_enough = _index_after_refresh_embed(copied, factory="IVF4,Flat", max_imbalance=100.0)
    assert even_enough["build"] == "update"

    strict = _index_after_refresh_embed(copied, factory="IVF4,Flat", max_imbalance=1.0)
    assert strict["build"] == "full" and "over index.max_imbalance" in strict["reason"]


def test_an_index_written_before_labels_is_built_in_full(copied):
    _republish(copied, factory="Flat", wrap=False)

    built = _index_after_refresh_embed(copied)

    assert built["build"] == "full" and "before vectors were labelled" in built["reason"]


def test_an_index_update_takes_fingerprints_from_the_release_s_listings_not_its_id_map(copied):
    _republish(copied, stale_fingerprints=True)
    changes = change_catalog(copied.workdir / "catalog", 1, 2, 0, 0)
    _read_catalog(copied)

    built = _index_after_refresh_embed(copied)

    # unchanged listings kept (the id map's fingerprints would call all 60 changed)
    assert built["build"] == "update"
    assert built["counts"] | {"dim": 0} == {
        "vectors": 61,
        "dim": 0,
        "kept": 58,
        "added": len(changes["added"]),
        "changed": 2,
        "removed": 0,
    }


def test_an_index_missing_a_label_it_should_hold_is_built_in_full(copied):
    changes = change_catalog(copied.workdir / "catalog", 0, 1, 0, 0)
    ids = read_id_table(copied.workdir / "embed" / "listing_ids.parquet")
    label = ids["listing_id"].to_pylist().index(changes["changed"][0])
    _republish(copied, drop_label=label)  # the changed listing's vector is not there
    _read_catalog(copied)

    built = _index_after_refresh_embed(copied)

    assert built["build"] == "full" and "did not hold every label" in built["reason"]
    assert built["counts"]["vectors"] == 60


def test_an_index_another_model_embedded_is_built_in_full(copied):
    _republish(copied, manifest={"embedding_model_sha256": "0" * 64})

    built = _index_after_refresh_embed(copied)

    assert built["build"] == "full" and "embedded by another model" in built["reason"]


# 3. every staleness reason


@pytest.fixture
def training(copied):
    """What staleness compares with: the training release's profile and metrics, and
    measure() of a catalog profile and metrics against it."""
    store = production.open_store(copied)
    current = _current(copied)
    local = copied.workdir / "training"
    names = [PROFILE.name, EMBEDDED_IDS.name]
    production.download(store, current["version"], current, names, local)
    then = np.load(local / PROFILE.name)

    def measure(profile: np.ndarray, metrics: dict) -> dict:
        config = StalenessConfig(drift_alpha=0.05, permutations=100, max_recall_drop=0.03)
        return staleness.measure(
            copied,
            current["version"],
            local / EMBEDDED_IDS.name,
            profile,
            metrics,
            config,
            copied.workdir / "staleness-cache",
        )

    return then, current["metrics"], measure


def test_the_same_catalog_and_recall_are_fresh(training):
    then, metrics, measure = training

    found = measure(then, metrics)

    assert found["stale"] is False and found["reasons"] == [] and found["new_or_changed"] == 0


def test_a_drifted_catalog_profile_is_stale(training):
    then, metrics, measure = training
    shifted = then + 3.0 * np.random.default_rng(0).normal(size=then.shape[1])

    found = measure(shifted, metrics)

    assert found["drift"]["p_value"] < 0.05
    (reason,) = found["reasons"]
    assert "the catalog drifted" in reason and "drift_alpha 0.05" in reason


def test_a_recall_drop_past_the_limit_is_stale(training):
    then, metrics, measure = training
    key = "query_to_listing/recall@10"

    within = measure(then, metrics | {key: metrics[key] - 0.02})
    beyond = measure(then, metrics | {key: metrics[key] - 0.05})

    assert within["stale"] is False
    (reason,) = beyond["reasons"]
    assert reason.startswith(f"{key} fell from") and "max_recall_drop 0.03" in reason


def test_a_profile_of_other_encoders_is_stale(training):
    then, metrics, measure = training

    found = measure(np.zeros((len(then), then.shape[1] + 8), np.float32), metrics)

    (reason,) = found["reasons"]
    assert "encoders changed" in reason and "drift" not in found


# 4. one model for the index and the queries


def test_a_refresh_stops_when_the_registered_weights_are_not_the_release_s(copied):
    version = _republish(copied, model={"sha256": "f" * 64})

    with pytest.raises(ValueError, match=f"not the ones release {version} recorded"):
        embed.run(REFRESH_EMBED, copied)


def test_the_service_refuses_a_release_whose_index_another_model_embedded(copied, tmp_path):
    store = production.open_store(copied)
    keeper = ReleaseKeeper(store, copied, CatalogRoot(copied.catalog), CPU, tmp_path / "srv")
    assert keeper.refresh()
    served = keeper.current.version

    refused = _republish(copied, manifest={"embedding_model_sha256": "0" * 64})

    assert keeper.refresh() is False
    assert keeper.current.version == served  # the old release still answers
    assert refused in keeper.last_error and "two models" in keeper.last_error


# 5. a removal written while a refresh runs


def test_a_removal_written_during_a_refresh_survives_its_promote(copied, tmp_path):
    paths = copied
    store = production.open_store(paths)
    params = with_overrides(refresh_params(paths), refresh.REFRESH)
    late = production.load_current_index(store).ids.listing_ids[7]
    change_catalog(paths.workdir / "catalog", 1, 0, 0, 0)  # so the refresh publishes
    for step in ("validate", "featurize", "embed"):
        refresh.run_step(step, params, paths)

    tombstones.write(store, [late], "sold")  # after embed read the tombstones
    for step in ("index", "evaluate", "promote"):
        refresh.run_step(step, params, paths)

    current = production.load_current_index(store)
    assert current.version != production.read_pointer(store).previous
    assert late in current.ids.listing_ids  # embedded before the removal
    (held,) = tombstones.read_all(store)
    assert held.listing_ids == (late,)  # not retired by a release that holds the listing
    keeper = ReleaseKeeper(store, paths, CatalogRoot(paths.catalog), CPU, tmp_path / "srv")
    keeper.refresh()
    assert keeper.current.vector_of(late) is None  # the service applies it

    refresh.run(refresh_params(paths), paths.tracking_uri)

    assert late not in production.load_current_index(store).ids.listing_ids
    assert tombstones.read_all(store) == [held]  # the catalog still lists it


# 6. gates skipped for too few test queries


def test_recall_gates_on_too_few_test_queries_are_skipped_and_say_so(copied):
    paths = copied
    gates = EVALUATE.gates.model_copy(update={"min_queries": 10_000})
    config = EVALUATE.model_copy(update={"gates": gates})

    result = evaluate.run(config, paths)

    rows = json.loads((paths.step_dir("evaluate") / "gates.json").read_text())
    skipped = [r for r in rows if r["note"].startswith("skipped:")]
    recall = [r for r in rows if r["gate"] != "index:every_listing_once"]
    assert skipped == recall and len(skipped) == 8  # every recall gate, none failed
    queries = {r["metric"].split("/")[0]: r["note"] for r in skipped}
    counts = json.loads((paths.step_dir("evaluate") / "manifest.json").read_text())["counts"]
    for task, note in queries.items():
        assert 0 < counts[task] < 10_000
        assert note == f"skipped: only {counts[task]} test queries (< 10000) for this task"
    assert all(r["passed"] and r["value"] is None for r in skipped)
    (coverage,) = [r for r in rows if r["gate"] == "index:every_listing_once"]
    assert coverage["value"] == 0  # still measured
    assert "8 of 8 recall gates skipped (too few test queries)" in result.summary
    promote.run(PromoteConfig(), paths)  # the outcome: promotable
