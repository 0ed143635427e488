"""A refresh on a changed catalog: only the delta embedded, unchanged vectors bitwise those
of a full embed, the release's index updated in place, the same gates, a release of kind
refresh; removals through tombstones, in the service at once and folded by the next
refresh."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageOps

from components import embed, evaluate, index, promote, refresh, train
from components.cli import main
from components.config import (
    EmbedConfig,
    FeaturizeConfig,
    IndexConfig,
    Params,
    PromoteConfig,
    ValidateConfig,
    load_params,
    with_overrides,
)
from components.contract import SPLITS
from components.io.embedder import ListingEmbedder, held_out_refs
from components.io.embedding_files import read_embeddings
from components.release import production, registry, tombstones
from components.release.serving import QueryEmbedder
from components.release.storage import open_storage
from tests.conftest import REPO_ROOT
from tests.test_evaluate import TINY
from tests.test_promote import EVALUATE

pytestmark = pytest.mark.integration

FEATURIZE = FeaturizeConfig(device="cpu", image_size=96, workers=2)
VALIDATE = ValidateConfig(workers=2)


@pytest.fixture(scope="module")
def released(featurized, tmp_path_factory):
    """A workdir of its own (features copied, not shared) with a retrain promoted."""
    work = tmp_path_factory.mktemp("refresh") / "work"
    for step in ("catalog", "validate", "featurize"):
        shutil.copytree(featurized.step_dir(step), work / step)
    paths = dataclasses.replace(
        featurized,
        workdir=work,
        catalog=str(work / "catalog"),
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
    )
    train.run(TINY, paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    evaluate.run(EVALUATE, paths)
    promote.run(PromoteConfig(), paths)
    return paths


@pytest.fixture
def copied(released, tmp_path):
    """The released workdir copied for one test (store and registry included): no test
    sees what another refreshed or removed."""
    work = tmp_path / "work"
    shutil.copytree(released.workdir, work, symlinks=True)
    return dataclasses.replace(
        released,
        workdir=work,
        catalog=str(work / "catalog"),
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
    )


def _params(paths) -> Params:
    return load_params(
        REPO_ROOT / "params.yaml",
        [
            f"paths.workdir={paths.workdir}",
            f"paths.catalog={paths.catalog}",
            "validate.workers=2",
            *(f"featurize.{k}={v}" for k, v in FEATURIZE.model_dump().items() if k != "text_views"),
            "embed.device=cpu",
            "evaluate.gates.min={}",
            "evaluate.gates.min_gain_over_frozen={}",
            "evaluate.gates.min_queries=1",
            "evaluate.ks=[1, 10, 50]",
            "evaluate.bootstrap=100",
            "evaluate.staleness.profile_listings=50",
            "evaluate.staleness.permutations=100",
        ],
    )


def _change_catalog(root, added: int, retitled: int, rephotographed: int, removed: int):
    """The catalog with `added` new listings (copies of others under new ids, photos
    mirrored), `retitled` and `rephotographed` listings, and `removed` ones gone. Returns
    the ids of each group."""
    table = pq.read_table(root / "listings.parquet")
    rows = table.to_pylist()
    gone = [r["listing_id"] for r in rows[-removed:]] if removed else []
    rows = rows[: len(rows) - removed]
    retitle = [r["listing_id"] for r in rows[:retitled]]
    for row in rows[:retitled]:
        row["title"] = f"{row['title']} (new edition)"
    rephoto = [r["listing_id"] for r in rows[retitled : retitled + rephotographed]]
    for row in rows[retitled : retitled + rephotographed]:
        row["image_uris"] = [_mirrored(root, row["image_uris"][0]), *row["image_uris"][1:]]
    new = []
    for n, source in enumerate(rows[10 : 10 + added]):
        copy = dict(source, listing_id=f"new-{n}", title=f"Brand new {source['title']}")
        copy["image_uris"] = [_mirrored(root, ref) for ref in source["image_uris"]]
        rows.append(copy)
        new.append(copy["listing_id"])
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "listings.parquet")
    return {"added": new, "changed": retitle + rephoto, "removed": gone}


def _mirrored(root, ref: str) -> str:
    target = f"{ref.rsplit('.', 1)[0]}-flipped.png"
    if not (root / target).exists():
        ImageOps.flip(Image.open(root / ref).convert("RGBA")).save(root / target)
    return target


def test_a_refresh_embeds_only_the_delta_and_updates_the_release_s_index(copied, capsys):
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    before = production.read_pointer(store)
    changes = _change_catalog(paths.workdir / "catalog", 4, 2, 1, 2)

    result = refresh.run(_params(paths), paths.tracking_uri)

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
    assert main(["versions", "--set", f"paths.workdir={paths.workdir}"]) == 0
    assert f"*  {current.version}  refresh" in capsys.readouterr().out

    # unchanged listings: bitwise the vectors a full embed with the same model gives
    ids, vectors = read_embeddings(paths)
    model = registry.load_model(_uri(current), paths, CPU)
    full_ids, full = ListingEmbedder(model.model, model.spec, paths, CPU).embed_all(
        held_out_refs(paths.path(SPLITS)), 1024
    )
    assert full_ids == ids
    fresh = set(changes["changed"] + changes["added"])
    unchanged = [i for i, listing_id in enumerate(ids) if listing_id not in fresh]
    assert len(unchanged) == 55 and np.array_equal(vectors[unchanged], full[unchanged])
    np.testing.assert_allclose(vectors, full, atol=1e-6)  # the delta, by the same model

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

    code = main(["remove", gone, "--reason", "sold", "--set", f"paths.workdir={paths.workdir}"])

    assert code == 0 and "1 listing(s) tombstoned" in capsys.readouterr().out
    keeper.refresh()  # the service's next poll
    hits = keeper.current.search(vector, 5)[0]
    assert gone not in [listing for listing, _ in hits] and len(hits) == 5  # still k answers
    assert keeper.current.vector_of(gone) is None
    (tombstone,) = tombstones.read_all(store)
    assert tombstone.listing_ids == (gone,) and tombstone.reason == "sold"

    refresh.run(_params(paths), paths.tracking_uri)

    current = production.load_current_index(store)
    assert gone not in current.ids.listing_ids and current.manifest["kind"] == "refresh"
    missing = pq.read_table(paths.step_dir("embed") / "missing.parquet").to_pylist()
    assert {"listing_id": gone, "reason": "removed"} in missing  # never silently dropped
    assert tombstones.read_all(store) == []  # folded into the release: retired


def test_nothing_promoted_yet_is_a_one_line_error_for_refresh(featurized, tmp_path, capsys):
    work = tmp_path / "empty"
    for step in ("catalog", "validate", "featurize"):
        shutil.copytree(featurized.step_dir(step), work / step)

    code = main(["refresh", "--set", f"paths.workdir={work}", "--set", "featurize.image_size=96"])

    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1 and "nothing was promoted to" in err[0]


def test_a_catalog_changed_past_the_threshold_since_training_is_stale(copied, capsys):
    paths = copied
    _change_catalog(paths.workdir / "catalog", 6, 0, 0, 0)  # 6 of 66: 9% new
    params = _params(paths)

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
    assert row.split()[2] == "refresh" and row.split()[-1] == "yes"


def test_a_refresh_reads_nothing_of_this_workdir_s_train_step(copied):
    """The model and its splits come from the release (a Kubeflow refresh has no train
    folder; a retrain that failed its gates leaves another model's in the workdir)."""
    paths = copied
    store = open_storage(paths.storage, paths.storage_uri)
    before = production.load_current_index(store)
    tested = json.loads((paths.step_dir("evaluate") / "manifest.json").read_text())["counts"]
    shutil.rmtree(paths.step_dir("train"))
    _change_catalog(paths.workdir / "catalog", 2, 1, 0, 0)

    refresh.run(_params(paths), paths.tracking_uri)

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
