"""The second sample catalog (Font Awesome icons): it follows the data contract, validates
clean, holds its queries out of every text view, is deterministic, and through the
pipeline its view-to-listing task (one photo per listing) is absent, not zero."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from components import catalog, embed, evaluate, featurize, index, train, validate
from components.config import (
    CatalogConfig,
    EmbedConfig,
    EvaluateConfig,
    FeaturizeConfig,
    GatesConfig,
    IndexConfig,
    StepPaths,
    TrainConfig,
    ValidateConfig,
)
from components.io.manifest import sha256_tree
from components.sample.icons_catalog import MAX_RELEVANT, held_out_terms, load_icons, package_root
from tests.conftest import in_fresh_interpreters

ICONS = CatalogConfig(source="icons", max_listings=120, image_size=48)


@pytest.fixture(scope="module")
def icons(tmp_path_factory):
    work = tmp_path_factory.mktemp("icons")
    paths = StepPaths(
        workdir=work, catalog=str(work / "catalog"), tracking_uri=f"sqlite:///{work / 'm.db'}"
    )
    result = catalog.run(ICONS, paths)
    return paths, result


def test_the_icons_catalog_follows_the_contract_and_validates_clean(icons):
    paths, result = icons
    listings = pq.read_table(result.out_dir / "listings.parquet").to_pylist()
    manifest = json.loads((result.out_dir / "manifest.json").read_text())

    report = validate.run(ValidateConfig(workers=2), paths).report

    assert len(listings) == 120 == len({r["listing_id"] for r in listings})
    assert all(r["title"].strip() and r["image_uris"] for r in listings)
    assert report["quarantined"] == 0 and report["clean"] == 120
    assert "fontawesome" in manifest["licences"]
    assert manifest["sources"]["packages"]["fontawesomefree"] == "6.6.0"
    # structurally unlike the emoji catalog: mostly one photo, no description
    assert manifest["counts"]["share_with_2plus_image_views"] < 0.5
    assert all(r["description"] is None for r in listings)


def test_queries_are_held_out_of_every_text_view_of_their_listings(icons):
    _, result = icons
    listings = {
        r["listing_id"]: r for r in pq.read_table(result.out_dir / "listings.parquet").to_pylist()
    }
    queries = pq.read_table(result.out_dir / "queries.parquet").to_pylist()

    assert queries
    for query in queries:
        row = listings[query["listing_id"]]
        texts = [row["title"].lower(), (row["category"] or "").lower(), *row["tags"]]
        assert not any(query["query"] in text for text in texts), query
        assert query["language"] == "en"


def test_held_out_terms_are_chosen_per_term_and_never_too_broad():
    icons = load_icons(package_root())

    held = held_out_terms(icons, 0.3)

    listed = {}
    for icon in icons:
        for term in icon.terms:
            listed[term] = listed.get(term, 0) + 1
    assert held and all(listed[term] <= MAX_RELEVANT for term in held)
    # by a hash of the term: the same in any process, whatever its string-hash seed
    code = "from components.sample.icons_catalog import held_out_terms, load_icons, "
    code += "package_root; print(sorted(held_out_terms(load_icons(package_root()), 0.3)))"
    assert in_fresh_interpreters(code) == [str(sorted(held))] * 2


def test_the_same_params_build_the_same_bytes(icons, tmp_path):
    _, first = icons
    again = catalog.run(ICONS, StepPaths(workdir=tmp_path, catalog=str(tmp_path / "catalog")))

    for name in ("listings.parquet", "queries.parquet"):
        assert (again.out_dir / name).read_bytes() == (first.out_dir / name).read_bytes()
    assert sha256_tree(again.out_dir / "images") == sha256_tree(first.out_dir / "images")


@pytest.mark.integration
def test_through_the_pipeline_a_task_without_queries_is_absent_and_not_gated(icons):
    paths, _ = icons
    validate.run(ValidateConfig(workers=2), paths)
    featurize.run(FeaturizeConfig(device="cpu", image_size=64, workers=2), paths)
    train.run(TrainConfig(epochs=2, batch_size=32, hidden=64, dim=32, device="cpu"), paths)
    embed.run(EmbedConfig(device="cpu"), paths)
    index.run(IndexConfig(), paths)
    gates = GatesConfig(min={"view_to_listing/recall@10": 0.5}, min_gain_over_frozen={})

    result = evaluate.run(EvaluateConfig(champion=None, ks=[1, 10], gates=gates), paths)

    # an icon has at most two photos (solid, regular), so none is held out as a query:
    # the task is absent (no metric at all, not a zero) and its gate is skipped
    assert result.metrics["view_to_listing/queries"] == 0
    assert not [
        k for k in result.metrics if k.startswith("view_to_listing/") and "queries" not in k
    ]
    (gate,) = [g for g in result.gates if g["gate"] == "min:view_to_listing/recall@10"]
    assert gate["passed"] and gate["note"].startswith("skipped")
    assert result.metrics["query_to_listing/queries"] > 0
    assert "query_to_listing/frozen/recall@10" in result.metrics
    assert "query_to_listing/lang/en/recall@10" in result.metrics
