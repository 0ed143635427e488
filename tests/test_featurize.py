"""featurize with the real packaged encoders on a tiny catalog: cache, growth, bad views."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components import contract, featurize, validate
from components.config import FeaturizeConfig, ValidateConfig
from components.core.encoders import EfficientNetLite0, luv_histograms
from components.io.feature_store import FeatureStore
from components.io.manifest import read_manifest
from tests.conftest import listing, png_bytes

pytestmark = pytest.mark.integration

CONFIG = FeaturizeConfig(device="cpu", image_size=64, image_batch_size=2, workers=2)


def _colour_catalog(make_catalog, ids, **kwargs):
    rows = [listing(i, image_uris=[f"images/{i}.png", f"images/{i}-b.png"]) for i in ids]
    root = make_catalog(rows, images=False, **kwargs)
    for n, i in enumerate(ids):
        (root / "images" / f"{i}.png").write_bytes(png_bytes((40, 40), (40 * n, 90, 200)))
        (root / "images" / f"{i}-b.png").write_bytes(png_bytes((40, 40), (200, 40 * n, 90)))
    pq.write_table(
        pa.Table.from_pylist([{"query_id": "q1", "query": "a blue thing", "listing_id": ids[0]}]),
        root / "queries.parquet",
    )
    return root


def _views(result):
    return pq.read_table(result.out_dir / contract.VIEWS.name).to_pylist()


def test_featurize_caches_by_content_and_only_encodes_new_views(make_catalog, step_paths):
    root = _colour_catalog(make_catalog, ["a", "b"])
    paths = step_paths(root)
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)

    first = featurize.run(CONFIG, paths)
    again = featurize.run(CONFIG, paths)
    _colour_catalog(make_catalog, ["a", "b", "c"])  # the catalog grows by one listing
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)
    grown = featurize.run(CONFIG, paths)

    assert first.counts["images_encoded"] == 4 and first.counts["image_views"] == 4
    assert again.counts["images_encoded"] == 0 and again.counts["texts_encoded"] == 0
    assert grown.counts["images_encoded"] == 2
    # title, description, tags, category for each listing; texts shared by both listings
    # (description, tags, category) are encoded once, plus the one query
    assert first.counts["text_views"] == 8 and first.counts["texts_encoded"] == 2 + 3 + 1
    views = _views(grown)
    assert {(v["listing_id"], v["position"]) for v in views if v["modality"] == "image"} == {
        (i, p) for i in "abc" for p in (0, 1)
    }
    titles = [v for v in views if v["view"] == "title"]
    assert all(v["position"] == 0 for v in titles)


def test_features_equal_the_encoder_applied_directly(make_catalog, step_paths):
    root = _colour_catalog(make_catalog, ["a"])
    paths = step_paths(root)
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)

    result = featurize.run(CONFIG, paths)

    view = next(v for v in _views(result) if v["ref"] == "images/a.png")
    store = FeatureStore(result.out_dir / "store", "efficientnet-lite0-64px", 1280)
    encoder = EfficientNetLite0(torch.device("cpu"), image_size=64)
    with Image.open(root / "images" / "a.png") as image:
        expected = encoder.encode([image.convert("RGB")])
    np.testing.assert_allclose(store.get([view["key"]]), expected, rtol=1e-4, atol=1e-5)
    queries = pq.read_table(result.out_dir / contract.QUERY_FEATURES.name).to_pylist()
    assert [q["query_id"] for q in queries] == ["q1"] and len(queries[0]["key"]) == 64


def test_a_view_that_went_bad_after_validation_is_skipped_and_named(make_catalog, step_paths):
    root = _colour_catalog(make_catalog, ["a", "b"])
    paths = step_paths(root)
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)
    (root / "images" / "b-b.png").write_bytes(b"corrupted after validation")

    result = featurize.run(CONFIG, paths)

    skipped = pq.read_table(result.out_dir / contract.SKIPPED_VIEWS.name).to_pylist()
    assert [(s["listing_id"], s["ref"], s["reason"]) for s in skipped] == [
        ("b", "images/b-b.png", "image_undecodable")
    ]
    assert result.counts["image_views"] == 3
    assert "1 views skipped (image_undecodable: 1)" in result.summary


def test_a_run_that_dies_keeps_the_vectors_of_its_finished_chunks(
    make_catalog, step_paths, monkeypatch
):
    root = _colour_catalog(make_catalog, ["a", "b", "c"])
    paths = step_paths(root)
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)
    config = CONFIG.model_copy(update={"listings_per_chunk": 1})
    original, calls = featurize._Featurizer._image_views, []

    def dies_in_the_third_chunk(self, rows, pool):
        calls.append(rows)
        if len(calls) == 3:
            raise KeyboardInterrupt("node lost")
        return original(self, rows, pool)

    monkeypatch.setattr(featurize._Featurizer, "_image_views", dies_in_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        featurize.run(config, paths)
    monkeypatch.setattr(featurize._Featurizer, "_image_views", original)

    rerun = featurize.run(config, paths)

    assert rerun.counts["image_views"] == 6
    assert rerun.counts["images_encoded"] == 2  # only the chunk that never finished


def test_a_run_encoding_a_few_views_per_chunk_writes_one_feature_shard_per_store(
    make_catalog, step_paths
):
    root = _colour_catalog(make_catalog, ["a", "b", "c"])
    paths = step_paths(root)
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)

    result = featurize.run(CONFIG.model_copy(update={"listings_per_chunk": 1}), paths)

    stores = sorted((result.out_dir / "store").iterdir())
    assert [len(list(store.glob("shard-*.npy"))) for store in stores] == [1, 1]


def test_colour_histograms_are_featurized_and_cached_under_their_own_id(make_catalog, step_paths):
    root = _colour_catalog(make_catalog, ["a", "b"])
    paths = step_paths(root)
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)
    coloured = CONFIG.model_copy(update={"colour_histogram": 4})

    result = featurize.run(coloured, paths)

    record = read_manifest(result.out_dir)["encoders"]["image"]
    assert record["id"] == "efficientnet-lite0-64px+luv4" and record["dim"] == 1280 + 12
    view = next(v for v in _views(result) if v["ref"] == "images/a.png")
    store = FeatureStore(result.out_dir / "store", record["id"], record["dim"])
    with Image.open(root / "images" / "a.png") as image:
        expected = luv_histograms([image.convert("RGB")], 4)
    np.testing.assert_allclose(store.get([view["key"]])[:, 1280:], expected, atol=1e-6)
    assert featurize.run(coloured, paths).counts["images_encoded"] == 0  # cached by content
