"""Every registered encoder loads offline from its installed package and embeds; the
multilingual ones put a translation next to its English text; the asymmetric one keys
queries apart from views in the feature store."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from components import contract, featurize, validate
from components.config import FeaturizeConfig, ValidateConfig
from components.core.encoders import (
    IMAGE_ENCODERS,
    PACKAGES,
    POOLED_DIM,
    TEXT_ENCODERS,
    image_factory,
    luv_histograms,
    rgb_to_luv,
)
from tests.conftest import listing

CPU = torch.device("cpu")
TEXTS = ["red heart", "corazón rojo", "Santa Claus", "a red heart"]


def test_every_encoder_names_the_packages_it_loads_from():
    assert set(PACKAGES) == set(IMAGE_ENCODERS) | set(TEXT_ENCODERS)


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_text_encoders_embed_offline(name):
    encoder = TEXT_ENCODERS[name](CPU, 2)

    views, queries = encoder.encode(TEXTS), encoder.encode_queries(TEXTS)

    assert views.shape == queries.shape == (len(TEXTS), encoder.dim)
    assert views.dtype == np.float32 and np.isfinite(views).all()
    np.testing.assert_allclose(encoder.encode(TEXTS[:1]), views[:1], atol=1e-5)
    unit = views / np.linalg.norm(views, axis=1, keepdims=True)
    assert unit[0] @ unit[3] > unit[0] @ unit[2]  # "a red heart" nearer than "Santa Claus"
    if encoder.query_prefix:
        assert not np.allclose(views, queries)


@pytest.mark.parametrize("name", ["use-multilingual-v3", "multilingual-e5-small"])
def test_multilingual_encoders_put_a_translation_next_to_its_english(name):
    encoder = TEXT_ENCODERS[name](CPU, 16)
    query = encoder.encode_queries(["corazón rojo"])[0]
    views = encoder.encode(["red heart", "Santa Claus"])

    assert query @ views[0] > query @ views[1]


@pytest.mark.parametrize("name", sorted(IMAGE_ENCODERS))
def test_image_encoders_embed_offline(name):
    encoder = IMAGE_ENCODERS[name](CPU, 64)
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (64, 64), (0, 0, 0))]

    features = encoder.encode(images)

    assert features.shape == (2, encoder.dim) and encoder.dim == POOLED_DIM
    assert np.isfinite(features).all() and not np.allclose(features[0], features[1])
    assert encoder.id.startswith(name)


def test_an_asymmetric_encoder_keys_a_query_apart_from_the_same_text_as_a_view(
    make_catalog, step_paths
):
    root = make_catalog([listing("a", title="Red heart"), listing("b")])
    pq.write_table(
        pa.table({"query_id": ["q1"], "query": ["Red heart"], "listing_id": ["a"]}),
        root / "queries.parquet",
    )
    paths = step_paths(root)
    validate.run(ValidateConfig(workers=2, min_clean_listings=1), paths)

    featurize.run(
        FeaturizeConfig(text_encoder="multilingual-e5-small", image_size=64, workers=2), paths
    )

    views = pq.read_table(paths.path(contract.VIEWS)).to_pylist()
    title_key = next(v["key"] for v in views if v["listing_id"] == "a" and v["view"] == "title")
    query_key = pq.read_table(paths.path(contract.QUERY_FEATURES)).column("key")[0].as_py()
    assert query_key != title_key


def test_luv_conversion_matches_the_cie_values_of_known_colours():
    rgb = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]], np.float32)

    luv = rgb_to_luv(rgb)

    # CIE L*u*v* (D65) of sRGB white, black, red and blue
    expected = [[100, 0, 0], [0, 0, 0], [53.24, 175.01, 37.76], [32.30, -9.41, -130.35]]
    np.testing.assert_allclose(luv, expected, atol=0.1)


def test_colour_histograms_put_a_solid_colour_in_one_bin_per_channel():
    red, half = Image.new("RGB", (50, 30), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    half.paste((255, 0, 0), (0, 0, 32, 64))  # half blue, half red

    features = luv_histograms([red, half], bins=4)

    assert features.shape == (2, 12)
    for channel in range(3):
        part = features[:, 4 * channel : 4 * channel + 4]
        np.testing.assert_allclose(np.linalg.norm(part, axis=1), 1.0, rtol=1e-6)
        assert np.count_nonzero(part[0]) == 1  # one colour: one bin per channel
    # half the pixels in each of two chroma bins: sqrt(0.5) each
    np.testing.assert_allclose(sorted(features[1, 4:8])[-2:], [np.sqrt(0.5)] * 2, rtol=0.05)


def test_an_encoder_with_colour_appends_the_histograms_under_its_own_cache_id():
    factory = image_factory("efficientnet-lite0", colour_bins=8)
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 30, 200))]

    encoder = factory(CPU, 64)
    features = encoder.encode(images)

    assert factory.dim == encoder.dim == POOLED_DIM + 24 == features.shape[1]
    assert factory.cache_id(CPU, 64) == encoder.id == "efficientnet-lite0-64px+luv8"
    plain = IMAGE_ENCODERS["efficientnet-lite0"](CPU, 64).encode(images)
    np.testing.assert_allclose(features[:, :POOLED_DIM], plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features[:, POOLED_DIM:], luv_histograms(images, 8))
    assert image_factory("efficientnet-lite0") is IMAGE_ENCODERS["efficientnet-lite0"]
    with pytest.raises(ValueError, match="colour_histogram: 0"):
        factory(CPU, 64, tuned_blocks=1)
