"""Diagnostics: modality gap, alignment, uniformity, and chunked top-k under three scorings."""

from __future__ import annotations

import numpy as np
import pytest

from components.core.diagnostics import alignment, modality_gap, scored_top_k, uniformity


def test_modality_gap_is_zero_for_one_cloud_and_the_shift_for_a_translated_one():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(40, 8))
    shift = np.full(8, 0.5)

    assert modality_gap(cloud, cloud) == pytest.approx(0.0, abs=1e-6)
    assert modality_gap(cloud, cloud + shift) == pytest.approx(np.linalg.norm(shift), rel=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        modality_gap(cloud[:0], cloud)


def test_alignment_and_uniformity_on_known_points():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 1.0], [0.0, 1.0]])

    assert alignment(a, a) == 0.0
    assert alignment(a, b) == pytest.approx(1.0)  # (2 + 0) / 2
    # one pair at squared distance 2: log exp(-2 * 2)
    assert uniformity(a) == pytest.approx(-4.0)
    spread = np.eye(4)
    bunched = np.tile([[1.0, 0.0, 0.0, 0.0]], (4, 1)) + 0.01 * np.eye(4)
    assert uniformity(spread) < uniformity(bunched)


def _histograms(x: np.ndarray) -> np.ndarray:
    split = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=1)
    return split / split.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("scoring", ["cosine", "euclidean", "manhattan", "chi_square"])
def test_chunked_top_k_equals_a_full_sort(scoring):
    rng = np.random.default_rng(1)
    queries, items = rng.normal(size=(40, 6)), rng.normal(size=(50, 6))
    if scoring == "cosine":
        full = queries @ items.T
    elif scoring == "chi_square":  # written out per pair, as the definition reads
        p, q = _histograms(queries), _histograms(items)
        full = np.array([[-np.sum((a - b) ** 2 / (a + b + 1e-300)) for b in q] for a in p])
    else:
        p = 2 if scoring == "euclidean" else 1
        full = -(np.sum(np.abs(queries[:, None] - items[None]) ** p, axis=-1) ** (1 / p))

    got = scored_top_k(queries, items, 7, scoring, chunk=8)

    want = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(got, want)


def test_ties_go_to_the_lower_index_and_k_is_capped():
    items = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])

    got = scored_top_k(np.array([[1.0, 0.0]]), items, 10, chunk=1)

    assert got.tolist() == [[0, 1, 2]]


def test_blocks_larger_than_k_keep_every_tie_at_the_boundary_and_the_lower_index():
    rng = np.random.default_rng(3)
    # few distinct vectors: a block's k-th best score is shared by many items
    items = rng.integers(0, 3, size=(400, 4)).astype(np.float32)
    queries = rng.integers(0, 3, size=(30, 4)).astype(np.float32)

    got = scored_top_k(queries, items, 9, chunk=64)

    want = np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(got, want)
