"""A refresh on a changed catalog: only the delta embedded, unchanged vectors bitwise those
of a full embed, the release's index updated in place, the same gates, a release of kind
refresh; removals through tombstones, in the service at once and folded by the next
refresh."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from components import refresh
from components.cli import main
from components.config import load_params, with_overrides
from components.contract import EXACT_TOP, INDEX_CHANGES, PROFILE, PROFILE_SAMPLE, SPLITS
from components.core.diagnostics import scored_top_k
from components.core.query_embedder import QueryEmbedder
from components.core.retrieval import embed_queries, present
from components.errors import StepFailed
from components.io import catalog_profile, test_split, top_lists
from components.io.embedder import ListingEmbedder, held_out_refs
from components.io.embedding_files import read_embeddings
from components.io.manifest import sha256_file
from components.io.view_prints import held_out_pairs, listing_fingerprints
from components.release import production, registry, tombstones
from components.release.storage import open_storage
from components.service.server import build
from tests.conftest import REPO_ROOT
from tests.harness.refresh import change_catalog, drop_listings
from tests.harness.refresh import params as refresh_params
from tests.test_evaluate import TINY

pytestmark = pytest.mark.integration


def test_a_refresh_embeds_only_the_delta_and_updates_the_release_s_index(copied, capsys):
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    before = production.read_pointer(store)
    changes = change_catalog(paths.workdir / "catalog", 4, 2, 1, 2)

    result = refresh.run(refresh_params(paths), paths.tracking_uri)

    counts = json.loads((paths.step_dir("embed") / "manifest.json").read_text())["counts"]
    assert (counts["added"], counts["changed"], counts["removed"]) == (4, 3, 2)
    assert (counts["reused"], counts["listings"]) == (60 - 2 - 3, 62)
    built = json.loads((paths.step_dir("index") / "manifest.json").read_text())
    assert (built["build"], built["base"]) == ("update", before.version)
    assert built["counts"] == {
        "vectors": 62,
        "dim": TINY.dim,
        "kept": 55,
        "added": 4,
        "changed": 3,
        "removed": 2,
    }
    current = production.load_current_index(store)
    assert current.version != before.version and current.manifest["kind"] == "refresh"
    assert current.manifest["built_on"] == before.version == current.manifest["trained_on"]
    held = set(current.ids.listing_ids)
    assert len(held) == len(current.ids) == 62  # every listing once
    assert set(changes["added"]) <= held and not set(changes["removed"]) & held
    assert "updated from" in result.summary
    # what it read: the new photos (of the new listings, the rephotographed one's), once
    new_photos = {
        ref
        for row in pq.read_table(paths.workdir / "catalog" / "listings.parquet").to_pylist()
        for ref in row["image_uris"]
        if ref.endswith("-flipped.png")
    }
    counters = result.counters
    assert counters["validate_images_opened"] == counters["featurize_images_opened"]
    assert counters["validate_images_opened"] == len(new_photos) >= 13
    assert 0 < counters["uploaded_bytes"] == current.manifest["added_bytes"]
    # the release uploaded only what changed: splits and profile are the base's objects
    files = current.manifest["files"]
    assert 0 < current.manifest["added_bytes"] < sum(f["bytes"] for f in files.values())
    base = production.read_manifest(store, before.version)["files"]
    assert files["splits.parquet"]["object"] == base["splits.parquet"]["object"]
    # and the release's embedding parts: kept as they were, the rows replaced deleted, the
    # new and changed listings' vectors in one part appended
    parts = [name for name in base if name.startswith("embeddings/part-")]
    assert parts and all(files[name]["object"] == base[name]["object"] for name in parts)
    appended = set(files) - set(base)
    assert appended == {"embeddings/deleted.npy", f"embeddings/part-{len(parts):06d}.npy"}
    assert main(["versions", "--set", f"paths.workdir={paths.workdir}"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("*  ")]
    # the second version, a refresh built on the first: 4 added, 3 changed, 2 removed there
    assert row.split()[1:8] == ["#2", current.version, "refresh", "#1", "+4", "~3", "-2"]
    # which listings it changed, recorded with the release (not part of what it serves)
    recorded = pq.read_table(paths.path(INDEX_CHANGES)).to_pylist()
    assert files[INDEX_CHANGES.name]["sha256"] == sha256_file(paths.path(INDEX_CHANGES))
    assert {
        change: sorted(r["listing_id"] for r in recorded if r["change"] == change)
        for change in ("added", "changed", "removed")
    } == {change: sorted(ids) for change, ids in changes.items()}

    # unchanged listings: bitwise the vectors a full embed with the same model gives
    ids, vectors = read_embeddings(paths)
    model = registry.load_model(_uri(current), paths, CPU)
    full_ids, full = ListingEmbedder(model.model, model.spec, paths, CPU).embed_all(
        held_out_refs(paths.path(SPLITS)), 1024
    )
    # the release's rows in their order, then the new and changed listings
    assert sorted(full_ids) == sorted(ids)
    row_of = {listing_id: row for row, listing_id in enumerate(full_ids)}
    full = full[[row_of[listing_id] for listing_id in ids]]
    fresh = set(changes["changed"] + changes["added"])
    assert set(ids[-7:]) == fresh
    unchanged = [i for i, listing_id in enumerate(ids) if listing_id not in fresh]
    assert len(unchanged) == 55 and np.array_equal(vectors[unchanged], full[unchanged])
    np.testing.assert_allclose(vectors, full, atol=1e-6)  # the delta, by the same model

    # evaluate scored only the 7 new vectors against the test queries, carrying the rest
    # of each exact top list from the release: the lists a full search gives
    evaluated = json.loads((paths.step_dir("evaluate") / "run.json").read_text())
    assert (
        evaluated["exact_search"] == f"carried from release {before.version}, 7 new vectors scored"
    )
    row_of = {listing_id: row for row, listing_id in enumerate(ids)}
    embedder = ListingEmbedder(model.model, model.spec, paths, CPU)
    sets = present(test_split.test_split_queries(paths, embedder, row_of))
    carried = top_lists.read(paths.path(EXACT_TOP), model.reference["sha256"])
    assert sets and {s.task for s in sets} == set(carried)
    for queries in sets:
        keys = top_lists.query_keys(queries)
        width = len(next(iter(carried[queries.task].values()))[0])
        lists = top_lists.for_queries(carried[queries.task], keys, width)
        searched = scored_top_k(embed_queries(model.model, queries, CPU), vectors, len(ids))
        assert np.array_equal(lists.top(len(ids)), searched)
    # and its catalog profile: the release's rows of unchanged listings, the new and
    # changed listings profiled; what sampling every listing again gives
    # (today's listings under the release's id-hash threshold, profiled afresh)
    assert evaluated["profile"] == f"carried from release {before.version}"
    with np.load(paths.path(PROFILE_SAMPLE)) as sample:
        rows, threshold = sample["rows"], float(sample["threshold"])
    assert 0 < threshold < 1 and abs(len(rows) - 50) <= 5  # a sample, not every listing
    under = [row for row, i in enumerate(ids) if catalog_profile.id_hash(i) <= threshold]
    frozen = ListingEmbedder.frozen(paths, CPU)
    found, vectors = catalog_profile.measure(frozen, held_out_refs(paths.path(SPLITS)), ids, under)
    assert np.array_equal(rows, found)
    np.testing.assert_allclose(np.load(paths.path(PROFILE)), vectors, atol=1e-6)

    # a new listing is found by its own title, as old listings are
    titles = {
        r["listing_id"]: r["title"]
        for r in pq.read_table(paths.workdir / "catalog" / "listings.parquet").to_pylist()
    }
    queries = QueryEmbedder(model.model, model.spec, CPU).texts(
        [titles[i] for i in changes["added"]]
    )
    _, labels = current.index.search(queries, 10)
    listing_of = current.ids.listing_of()
    found = [
        new in {listing_of[int(label)] for label in row}
        for new, row in zip(changes["added"], labels, strict=True)
    ]
    assert sum(found) >= 3


CPU = torch.device("cpu")


def test_a_second_refresh_carries_the_fingerprints_of_listings_featurize_took_whole(copied):
    paths = copied
    chunked = refresh_params(paths, "featurize.listings_per_chunk=8")  # views in 8 groups
    change_catalog(paths.workdir / "catalog", 2, 1, 0, 1)
    refresh.run(chunked, paths.tracking_uri)
    assert json.loads((paths.step_dir("embed") / "run.json").read_text())["prints_carried"] == 0
    catalog = paths.workdir / "catalog" / "listings.parquet"
    rows = pq.read_table(catalog).to_pylist()
    rows[30]["title"] += " (revised)"
    pq.write_table(pa.Table.from_pylist(rows, pq.read_schema(catalog)), catalog)

    refresh.run(chunked, paths.tracking_uri)

    carried = json.loads((paths.step_dir("embed") / "run.json").read_text())["prints_carried"]
    assert 0 < carried < len(rows)  # the revised listing's group read, the others not
    # what embed wrote: the fingerprints every listing's views give afresh
    written = pq.read_table(paths.step_dir("embed") / "listing_ids.parquet")
    pairs = held_out_pairs(held_out_refs(paths.step_dir("embed") / "splits.parquet"))
    ids, prints, _ = listing_fingerprints(
        pq.read_table(paths.step_dir("featurize") / "views.parquet"), pairs
    )
    assert dict(
        zip(written["listing_id"].to_pylist(), written["fingerprint"].to_pylist(), strict=True)
    ) == dict(zip(ids, prints, strict=True))


def _uri(current) -> str:
    return f"models:/{current.manifest['model']['name']}/{current.manifest['model']['version']}"


def test_a_removed_listing_leaves_search_at_once_and_the_next_refresh_folds_it(copied, capsys):
    from components.io.catalog_reader import CatalogRoot
    from components.service.releases import ReleaseKeeper

    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    keeper = ReleaseKeeper(store, paths, CatalogRoot(paths.catalog), CPU, paths.workdir / "srv")
    keeper.refresh()
    gone = keeper.current.labels.listing_of[0]
    vector = keeper.current.vector_of(gone)
    assert keeper.current.search(vector, 5)[0][0][0] == gone  # its own nearest neighbour

    workdir = f"paths.workdir={paths.workdir}"
    code = main(["remove", gone, "no-such-listing", "--reason", "sold", "--set", workdir])

    said = capsys.readouterr().out
    assert code == 0 and "2 listing(s) tombstoned" in said and "1 of them in the current" in said
    assert "not in the current release: no-such-listing (tombstoned all the same" in said
    keeper.refresh()  # the service's next poll
    hits = keeper.current.search(vector, 5)[0]
    assert gone not in [listing for listing, _ in hits] and len(hits) == 5  # still k answers
    assert keeper.current.vector_of(gone) is None
    assert keeper.current.searchable() == keeper.current.size - 1  # "of N listings" counts
    (tombstone,) = tombstones.read_all(store)
    assert tombstone.listing_ids == (gone, "no-such-listing") and tombstone.reason == "sold"

    folded = refresh.run(refresh_params(paths), paths.tracking_uri)

    current = production.load_current_index(store)
    assert gone not in current.ids.listing_ids and current.manifest["kind"] == "refresh"
    (said,) = [line for line in folded.summary.splitlines() if line.startswith("embed: ")]
    assert "0 listings without a usable view, 1 held out by a removal" in said  # not both
    missing = pq.read_table(paths.step_dir("embed") / "missing.parquet").to_pylist()
    assert {"listing_id": gone, "reason": "removed"} in missing  # never silently dropped
    assert current.manifest["listings"]["tombstoned"] == 1
    # the catalog still lists it: the removal holds for the next release too
    assert tombstones.read_all(store) == [tombstone]


def _service(paths, tmp_path):
    """The search service over the store of `paths` (its keeper polled by hand)."""
    params = load_params(
        REPO_ROOT / "params.yaml",
        [
            f"paths.workdir={paths.workdir}",
            f"paths.catalog={paths.catalog}",
            "serve.device=cpu",
            "serve.photo_warm=false",  # text searches only
        ],
    )
    return build(params, paths.mlflow_uri, tmp_path / "releases")


def _answers(client, keeper, listing_id: str, title: str) -> dict:
    """Where `listing_id` shows in the service after its next poll: the status of its
    similar listings, and whether a search for its own title answers it."""
    keeper.refresh()
    similar = client.get(f"/listings/{listing_id}/similar")
    found = [
        hit["listing_id"] for hit in client.get("/search", params={"q": title}).json()["results"]
    ]
    return {"similar": similar.status_code, "in_search": listing_id in found}


def test_a_removal_holds_across_refreshes_until_the_operator_restores_it(copied, tmp_path, capsys):
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    gone = production.load_current_index(store).ids.listing_ids[3]
    title = {r["listing_id"]: r["title"] for r in _catalog(paths)}[gone]
    app, keeper = _service(paths, tmp_path)
    with TestClient(app) as client:
        assert _answers(client, keeper, gone, title) == {"similar": 200, "in_search": True}
        workdir = ["--set", f"paths.workdir={paths.workdir}"]

        assert main(["remove", gone, "--reason", "sold", *workdir]) == 0
        released = []
        for _ in range(2):  # the catalog still lists it, hour after hour
            refresh.run(refresh_params(paths), paths.tracking_uri)
            current = production.load_current_index(store)
            released.append(current.version)
            assert gone not in current.ids.listing_ids
            assert _answers(client, keeper, gone, title) == {"similar": 404, "in_search": False}
        assert len(tombstones.read_all(store)) == 1
        assert released[0] == released[1]  # the second had nothing new to publish
        capsys.readouterr()
        assert main(["versions", *workdir]) == 0
        (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("*  ")]
        cells = row.split()  # *, #, version, kind, built on, +added ~changed -removed, ...
        assert cells[2] == released[0] and cells[10] == "1"  # held out: 1

        assert main(["restore", gone, "--reason", "sale cancelled", *workdir]) == 0
        assert "1 listing(s) no longer removed" in capsys.readouterr().out
        assert tombstones.read_all(store) == []
        (record,) = store.list_keys(tombstones.RESTORES)
        assert json.loads(store.get_bytes(record))["listing_ids"] == [gone]
        refresh.run(refresh_params(paths), paths.tracking_uri)

        assert gone in production.load_current_index(store).ids.listing_ids
        assert _answers(client, keeper, gone, title) == {"similar": 200, "in_search": True}


def test_a_removal_is_retired_once_the_catalog_drops_the_listing(copied):
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    sold, kept = production.load_current_index(store).ids.listing_ids[:2]
    tombstones.write(store, [sold], "sold")
    tombstones.write(store, [kept, "not-in-the-catalog"], "sold")

    drop_listings(paths.workdir / "catalog", {sold})
    refresh.run(refresh_params(paths), paths.tracking_uri)

    # the one whose listing left the catalog is retired; the other still holds `kept`
    (left,) = tombstones.read_all(store)
    assert left.listing_ids == (kept, "not-in-the-catalog")
    current = production.load_current_index(store)
    assert sold not in current.ids.listing_ids and kept not in current.ids.listing_ids
    assert current.manifest["listings"]["tombstoned"] == 1  # sold is not a catalog listing


def _catalog(paths) -> list[dict]:
    return pq.read_table(f"{paths.catalog}/listings.parquet").to_pylist()


def test_nothing_promoted_yet_is_a_one_line_error_for_refresh(featurized, tmp_path, capsys):
    work = tmp_path / "empty"
    for step in ("catalog", "validate", "featurize"):
        shutil.copytree(featurized.step_dir(step), work / step)

    code = main(["refresh", "--set", f"paths.workdir={work}", "--set", "featurize.image_size=96"])

    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1 and "nothing was promoted to" in err[0]


def test_a_catalog_changed_past_the_threshold_since_training_is_stale(copied, capsys):
    paths = copied
    change_catalog(paths.workdir / "catalog", 6, 0, 0, 0)  # 6 of 66: 9% new
    params = refresh_params(paths)

    strict = refresh.run(
        with_overrides(params, ["evaluate.staleness.max_new_share=0.05"]), paths.tracking_uri
    )

    assert strict.staleness["stale"] and strict.staleness["new_or_changed"] == pytest.approx(6 / 66)
    assert "max_new_share" in strict.staleness["reasons"][0]
    assert strict.summary.splitlines()[-1].startswith("refresh: the model is stale")
    stored = production.load_current_index(open_storage(paths.storage, paths.storage_uri))
    assert stored.manifest["staleness"]["stale"] is True  # the release records it
    assert stored.manifest["staleness"]["drift"]["p_value"] > 0.01  # same kind of listings
    capsys.readouterr()
    assert main(["versions", "--set", f"paths.workdir={paths.workdir}"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[-1].startswith("the current model is stale: ") and "max_new_share" in shown[-1]
    (row,) = [line for line in shown if line.startswith("*  ")]
    assert row.split()[3] == "refresh" and row.split()[-2:] == ["yes", "manual"]


def test_a_refresh_reads_nothing_of_this_workdir_s_train_step(copied):
    """The model and its splits come from the release (a Kubeflow refresh has no train
    folder; a retrain that failed its gates leaves another model's in the workdir)."""
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    before = production.load_current_index(store)
    tested = json.loads((paths.step_dir("evaluate") / "manifest.json").read_text())["counts"]
    shutil.rmtree(paths.step_dir("train"))
    change_catalog(paths.workdir / "catalog", 2, 1, 0, 0)

    refresh.run(refresh_params(paths), paths.tracking_uri)

    current = production.load_current_index(store)
    assert current.manifest["kind"] == "refresh" and current.version != before.version
    assert current.manifest["files"]["splits.parquet"] == before.manifest["files"]["splits.parquet"]
    assert current.manifest["lineage"]["train"] == before.manifest["lineage"]["train"]
    assert current.manifest["params"]["train"] == before.manifest["params"]["train"]
    evaluated = json.loads((paths.step_dir("evaluate") / "manifest.json").read_text())["counts"]
    # the same test queries (the model's split), over two more listings
    assert {k: v for k, v in evaluated.items() if k != "listings"} == {
        k: v for k, v in tested.items() if k != "listings"
    }
    assert evaluated["listings"] == tested["listings"] + 2


def test_a_refresh_with_nothing_new_publishes_nothing_even_after_a_rollback(copied, capsys):
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    retrained = production.read_pointer(store).version
    # the profile's sample as the retrain's evaluation drew it (carried unchanged)
    same = refresh_params(paths)
    catalog = paths.workdir / "catalog" / "listings.parquet"
    original = catalog.read_bytes()

    nothing = refresh.run(same, paths.tracking_uri)  # on the retrain's own release

    assert [v.version for v in production.list_versions(store)] == [retrained]
    assert nothing.summary.splitlines()[-1] == (
        f"refresh: nothing new since {retrained}: nothing published"
    )

    change_catalog(paths.workdir / "catalog", 2, 0, 0, 0)
    refresh.run(same, paths.tracking_uri)
    assert main(["rollback", "--set", f"paths.workdir={paths.workdir}"]) == 0
    catalog.write_bytes(original)  # the catalog the rolled-back release was built from

    again = refresh.run(same, paths.tracking_uri)

    assert len(production.list_versions(store)) == 2  # no third, byte-identical version
    assert production.read_pointer(store).version == retrained
    assert "nothing published" in again.summary.splitlines()[-1]

    # a refresh on the rolled-back release: listed after the newer one, built on the first
    change_catalog(paths.workdir / "catalog", 2, 0, 0, 0)
    refresh.run(same, paths.tracking_uri)
    capsys.readouterr()
    assert main(["versions", "--set", f"paths.workdir={paths.workdir}"]) == 0
    rows = [line.removeprefix("*").split() for line in capsys.readouterr().out.splitlines()]
    first, second, third = rows[2:5]
    assert first[:4] == ["#1", retrained, "retrain", "-"]
    assert second[0] == "#2" and second[2:7] == ["refresh", "#1", "+2", "~0", "-0"]
    assert third[0] == "#3" and third[2:7] == ["refresh", "#1", "+2", "~0", "-0"]  # not on #2


def test_a_refresh_takes_the_frozen_baseline_from_the_model_s_training_release(copied, tmp_path):
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    training = production.load_current_index(store)
    production.download(store, training.version, training.manifest, ["details.json"], tmp_path)
    then = json.loads((tmp_path / "details.json").read_text())
    change_catalog(paths.workdir / "catalog", 8, 0, 0, 0)  # near-copies: they compete
    gain = "evaluate.gates.min_gain_over_frozen={query_to_listing: -1.0}"

    refresh.run(refresh_params(paths, gain), paths.tracking_uri)

    now = json.loads((paths.step_dir("evaluate") / "details.json").read_text())
    frozen = {key for key in then if "/frozen" in key}
    assert frozen and {key: now[key] for key in frozen} == {key: then[key] for key in frozen}
    # the gain the same model earned at training: both sides measured on that catalog
    rows = json.loads((paths.step_dir("evaluate") / "gates.json").read_text())
    (row,) = [r for r in rows if r["gate"] == "min_gain_over_frozen:query_to_listing"]
    model = training.manifest["metrics"]["query_to_listing/recall@10"]
    best = max(then[f"query_to_listing/{b}/recall@10"] for b in ("frozen", "frozen_max"))
    assert row["value"] == pytest.approx(model / best - 1) and "at training" in row["note"]


def test_a_refresh_with_nothing_new_takes_its_release_s_evaluation_under_today_s_gates(copied):
    """Nothing embedded anew, the index and the queries byte for byte the release's: its
    evaluation stands (at 1M listings, measuring it again was minutes of reading and
    searching every vector), no second MLflow evaluation run; the gates are checked again
    with today's thresholds, and a change measures anew."""
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    release = production.load_current_index(store).manifest
    evaluated = paths.step_dir("evaluate")

    refresh.run(refresh_params(paths), paths.tracking_uri)

    record = json.loads((evaluated / "run.json").read_text())
    assert record["recorded"] is True
    assert record["mlflow"] == release["evaluation"]["mlflow"]
    assert json.loads((evaluated / "metrics.json").read_text()) == release["metrics"]

    strict = (
        "evaluate.gates.min={query_to_listing/recall@10: 1.01}",
        "evaluate.gates.min_queries=1",
    )
    with pytest.raises(StepFailed, match="min:query_to_listing/recall@10"):
        refresh.run(refresh_params(paths, *strict), paths.tracking_uri)
    assert json.loads((evaluated / "run.json").read_text())["recorded"] is True

    change_catalog(paths.workdir / "catalog", 1, 0, 0, 0)
    refresh.run(refresh_params(paths), paths.tracking_uri)
    assert json.loads((evaluated / "run.json").read_text())["recorded"] is False


def test_a_refresh_with_nothing_new_describes_its_index_against_its_own_base(copied):
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    change_catalog(paths.workdir / "catalog", 2, 1, 0, 1)
    refresh.run(refresh_params(paths), paths.tracking_uri)
    published = production.read_pointer(store).version

    again = refresh.run(refresh_params(paths), paths.tracking_uri)  # nothing changed since

    embedded = json.loads((paths.step_dir("embed") / "manifest.json").read_text())
    indexed = json.loads((paths.step_dir("index") / "manifest.json").read_text())
    assert embedded["inputs"]["base"]["version"] == published
    assert (indexed["build"], indexed["base"]) == ("update", published)  # not the first's base
    counts = indexed["counts"]
    assert (counts["added"], counts["changed"], counts["removed"]) == (0, 0, 0)
    assert counts["kept"] == counts["vectors"] == embedded["counts"]["listings"]
    (line,) = [line for line in again.summary.splitlines() if line.startswith("index: ")]
    assert "nothing rebuilt" in line and "updated from" not in line
