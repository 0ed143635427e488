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
from components.core.encoders import IMAGE_ENCODERS, PACKAGES, POOLED_DIM, TEXT_ENCODERS
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
    validate.run(ValidateConfig(workers=2), paths)

    featurize.run(
        FeaturizeConfig(text_encoder="multilingual-e5-small", image_size=64, workers=2), paths
    )

    views = pq.read_table(paths.path(contract.VIEWS)).to_pylist()
    title_key = next(v["key"] for v in views if v["listing_id"] == "a" and v["view"] == "title")
    query_key = pq.read_table(paths.path(contract.QUERY_FEATURES)).column("key")[0].as_py()
    assert query_key != title_key
