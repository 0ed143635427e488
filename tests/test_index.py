"""The index step against brute-force search, factory checks, and the saved id map."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import contract, index
from components.config import IndexConfig, StepPaths
from components.core.diagnostics import scored_top_k
from components.io import embedding_files, faiss_index
from components.io.manifest import describe_files

pytestmark = pytest.mark.integration
N, DIM = 3000, 32


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, DIM))
    points = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def embedded(tmp_path) -> StepPaths:
    """An embed step's outputs: two parts of unit vectors and their listing ids."""
    paths = StepPaths(workdir=tmp_path, catalog=str(tmp_path / "catalog"), seed=0)
    out = paths.step_dir("embed")
    (out / "embeddings").mkdir(parents=True)
    vectors = _clustered(N, seed=1)
    np.save(out / "embeddings" / "part-000000.npy", vectors[:2000])
    np.save(out / "embeddings" / "part-000001.npy", vectors[2000:])
    pq.write_table(
        pa.table({"listing_id": [f"L{i}" for i in range(N)]}), out / "listing_ids.parquet"
    )
    outputs = describe_files(out, ["embeddings", "listing_ids.parquet"])
    (out / "manifest.json").write_text(json.dumps({"step": "embed", "outputs": outputs}))
    return paths


def _search_params_of(index: faiss.Index) -> dict:
    """The search params a loaded index holds, where they differ from faiss's defaults."""
    found = {}
    inner = faiss_index.unwrapped(index)
    if isinstance(inner, faiss.IndexRefine):
        found["refine_k_factor"] = int(inner.k_factor)
        inner = faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexHNSW) and inner.hnsw.efSearch != 16:
        found["ef_search"] = inner.hnsw.efSearch
    if isinstance(inner, faiss.IndexIVF) and inner.nprobe != 1:
        found["nprobe"] = inner.nprobe
    return found


@pytest.mark.parametrize(
    ("factory", "params", "min_recall"),
    [
        ("Flat", {}, 1.0),
        ("IVF16,Flat", {"nprobe": 16}, 1.0),  # every list probed: exact
        ("IVF16,PQ8", {"nprobe": 4}, 0.5),
        # the same codes, 8 x 10 candidates re-ranked with 8-bit vectors
        ("IVF16,PQ8,Refine(SQ8)", {"nprobe": 4, "refine_k_factor": 8}, 0.9),
        ("HNSW32", {"ef_search": 256}, 0.95),
    ],
)
def test_index_finds_what_brute_force_finds(embedded, factory, params, min_recall):
    config = IndexConfig(factory=factory, **params)

    index.run(config, embedded)
    loaded, ids, manifest = faiss_index.load_index(embedded.step_dir("index"))

    queries = _clustered(200, seed=2)
    vectors = np.concatenate(
        [np.load(p) for p in embedding_files.embedding_parts(embedded.step_dir("embed"))]
    )
    _, found = loaded.search(queries, 10)
    exact = scored_top_k(queries, vectors, 10)
    # ties allowed: a hit is an item scoring at least the 10th exact score
    tenth = np.sort(queries @ vectors.T, axis=1)[:, -10]
    scores = np.take_along_axis(queries @ vectors.T, np.maximum(found, 0), axis=1)
    recall = float(np.mean((scores >= tenth[:, None] - 1e-6) & (found >= 0)))
    assert recall >= min_recall
    assert ids.listing_ids == [f"L{i}" for i in range(N)] and loaded.ntotal == N
    assert ids.labels.tolist() == list(range(N))  # a full build labels rows 0..N-1
    assert manifest["counts"] == {"vectors": N, "dim": DIM}
    assert _search_params_of(loaded) == params  # read back from the loaded index itself
    if factory == "Flat":
        np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(exact, axis=1))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("IVF4096,Flat", "needs at least 4096 vectors to train"),
        ("IVF16,PQ7", "is not valid for dim 32"),
        ("Flatt", "is not valid for dim 32"),
    ],
)
def test_a_factory_that_does_not_fit_is_named_before_any_work(embedded, factory, message):
    with pytest.raises(ValueError, match=message) as error:
        index.run(IndexConfig(factory=factory), embedded)

    assert "index.factory" in str(error.value) and factory in str(error.value)
    assert not (embedded.step_dir("index") / contract.INDEX.name).exists()


def test_rebuilding_with_nothing_changed_reuses_the_index(embedded):
    first = index.run(IndexConfig(factory="HNSW32"), embedded)
    stamp = (first.out_dir / contract.INDEX.name).stat().st_mtime_ns

    second = index.run(IndexConfig(factory="HNSW32"), embedded)

    assert "nothing rebuilt" in second.summary
    assert "s on CPU" not in second.summary  # not the first build's account of its work
    assert (second.out_dir / contract.INDEX.name).stat().st_mtime_ns == stamp


@pytest.mark.skipif(
    hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0, reason="faiss sees a GPU"
)
def test_gpu_always_without_a_gpu_is_a_clear_error(embedded):
    with pytest.raises(ValueError, match="index.gpu is 'always'"):
        index.run(IndexConfig(gpu="always"), embedded)
