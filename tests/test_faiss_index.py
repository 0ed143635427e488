"""The index coverage behind the gate `index:every_listing_once`, on real FAISS indexes of
each kind that labels its vectors (an IDMap2 around Flat and HNSW, IVF's own lists, an
index from before labels): every embedded listing exactly once, and each way of breaking
that is counted and fails the gate."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from components.config import GatesConfig
from components.core.gates import check_gates, failed
from components.io import faiss_index
from components.io.faiss_index import IndexIds, coverage, labels_of, new_index

DIM, N = 8, 40
LISTINGS = [f"L{i}" for i in range(N)]
NO_RECALL_GATES = GatesConfig(min={}, max_regression={}, min_gain_over_frozen={}, max_ann_loss=None)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    points = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def _index(factory: str, labels: np.ndarray) -> faiss.Index:
    """An index of `factory` (as the index step makes it) holding one vector per label."""
    index = new_index(factory, DIM, N)
    if not index.is_trained:
        index.train(_vectors(N, seed=1))
    index.add_with_ids(_vectors(len(labels)), labels.astype(np.int64))
    return index


def _gate(found: dict) -> list:
    (result,) = check_gates(found, None, NO_RECALL_GATES)
    assert result.gate == "index:every_listing_once"
    return [result] if failed([result]) else []


FACTORIES = ["Flat", "HNSW8", "IVF4,Flat"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_an_index_holding_every_listing_once_passes(factory):
    labels = np.arange(N) * 3 + 7  # any labels, as long as the id map names them
    index = _index(factory, labels)

    found = coverage(IndexIds(LISTINGS, labels), LISTINGS, set(), labels_of(index))

    assert set(found.values()) == {0} and _gate(found) == []


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_listing_missing_from_the_index_fails_the_gate(factory):
    labels = np.arange(N)
    index = _index(factory, labels[1:])  # L0's vector was never added

    found = coverage(IndexIds(LISTINGS, labels), LISTINGS, set(), labels_of(index))

    assert found["index/missing_listings"] == 1
    (result,) = _gate(found)
    assert "1 missing listings" in result.note


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_listing_held_twice_fails_the_gate(factory):
    # L5 under two labels (a changed listing added again without its old vector removed)
    labels = np.arange(N + 1)
    index = _index(factory, labels)

    twice = IndexIds([*LISTINGS, "L5"], labels)
    found = coverage(twice, LISTINGS, set(), labels_of(index))

    assert found["index/repeated_listings"] == 1
    assert _gate(found)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_the_same_label_added_twice_fails_the_gate(factory):
    index = _index(factory, np.concatenate([np.arange(N), [9]]))

    found = coverage(IndexIds(LISTINGS, np.arange(N)), LISTINGS, set(), labels_of(index))

    assert found["index/repeated_listings"] == 1 and _gate(found)


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_vector_whose_label_is_no_listing_s_fails_the_gate(factory):
    # every listing held once, and one more vector under a label no row of the id map has
    labels = np.arange(N)
    index = _index(factory, np.concatenate([labels, [10_000]]))

    found = coverage(IndexIds(LISTINGS, labels), LISTINGS, set(), labels_of(index))

    assert found["index/unlabelled_vectors"] == 1
    assert found["index/missing_listings"] == found["index/foreign_listings"] == 0
    (result,) = _gate(found)
    assert result.note == "1 unlabelled vectors"


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_removed_listing_left_in_the_index_fails_the_gate(factory):
    # embed left the tombstoned L7 out; the index still holds it
    labels = np.arange(N)
    index = _index(factory, labels)
    embedded = [i for i in LISTINGS if i != "L7"]

    found = coverage(IndexIds(LISTINGS, labels), embedded, {"L7"}, labels_of(index))

    assert found["index/foreign_listings"] == 1 and found["index/removed_listings"] == 1
    (result,) = _gate(found)
    assert "1 removed listings" in result.note


def test_an_index_from_before_labels_is_read_as_labelled_in_order():
    index = faiss.index_factory(DIM, "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(_vectors(N))

    assert np.array_equal(labels_of(index), np.arange(N))
    found = coverage(IndexIds(LISTINGS, np.arange(N)), LISTINGS, set(), labels_of(index))
    assert set(found.values()) == {0}


def test_a_batch_searched_as_a_matrix_product_finds_what_the_scan_finds():
    """faiss's default scans every vector once per query below 128,000 queries x dims (at
    1M listings 256 test queries took 11.4 s that way, 0.55 s as a matrix product):
    evaluate's batches go the second way, with the same answers, and the default stays."""
    rng = np.random.default_rng(3)
    stored = rng.standard_normal((500, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    flat = faiss.IndexFlatIP(16)
    flat.add(stored)
    default = faiss.cvar.distance_compute_blas_threshold

    scanned = flat.search(queries, 5)
    with faiss_index.as_matrix_product(len(queries)):
        assert faiss.cvar.distance_compute_blas_threshold == faiss_index.BLAS_THRESHOLD
        product = flat.search(queries, 5)

    assert faiss.cvar.distance_compute_blas_threshold == default > 40 * 16
    np.testing.assert_array_equal(product[1], scanned[1])
    np.testing.assert_allclose(product[0], scanned[0], rtol=1e-5, atol=1e-5)


def _split_and_merged(factory: str, dead: np.ndarray, tmp_path):
    """An index file of MANY vectors, `dead` of its labels no longer live, and a delta of
    10 new labels (and 5 of the dead ones' replacements), read both ways `live_index`
    reads them: searched side by side (mapped) and merged into one index."""
    index = new_index(factory, DIM, MANY)
    if not index.is_trained:
        index.train(_vectors(MANY, seed=1))
    index.add_with_ids(_vectors(MANY), np.arange(MANY, dtype=np.int64))
    delta = faiss.clone_index(index)
    delta.reset()
    replaced, added = dead[:5], np.arange(MANY, MANY + 10)
    delta.add_with_ids(_vectors(15, seed=2), np.concatenate([replaced, added]).astype(np.int64))
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    faiss.write_index(delta, str(tmp_path / "delta.faiss"))
    gone = np.setdiff1d(dead, replaced)
    labels = np.concatenate([np.setdiff1d(np.arange(MANY), gone), added])
    ids = IndexIds([f"L{label}" for label in labels], labels)
    files = (tmp_path / "index.faiss", tmp_path / "delta.faiss", ids)
    split = faiss_index.live_index(*files, mapped=True)
    merged = faiss_index.live_index(*files, mapped=False)
    for each in (split, merged):
        faiss_index.apply_search_params(each, factory, {"nprobe": 4})
    return split, merged, labels


MANY = 400


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
@pytest.mark.parametrize("k", [1, 5, MANY + 20])
def test_an_index_and_its_delta_searched_side_by_side_answer_as_the_two_merged(
    factory, k, tmp_path
):
    queries = _vectors(30, seed=3)
    # the first query's 40 nearest vectors are no longer live: far more than the few dead
    # vectors a search expects among its top k, so it must search again, deeper
    dead = np.argsort(-(_vectors(MANY) @ queries[0]))[:40]
    split, merged, labels = _split_and_merged(factory, dead, tmp_path)

    assert isinstance(split, faiss_index.SplitIndex)
    assert split.ntotal == merged.ntotal == len(labels)
    assert sorted(labels_of(split)) == sorted(labels_of(merged)) == sorted(labels)
    split_scores, split_labels = split.search(queries, k)
    merged_scores, merged_labels = merged.search(queries, k)
    np.testing.assert_array_equal(split_labels, merged_labels)
    np.testing.assert_allclose(split_scores, merged_scores, rtol=1e-5)
