"""FAISS indexes on disk: building an empty index of an `index_factory` string checked
to fit the data, query-time search params, and loading the index step's output.

Inner product on unit vectors throughout: the index answers cosine similarity.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import pyarrow.parquet as pq

from components.config import IndexConfig
from components.contract import INDEX, INDEX_IDS
from components.io.manifest import verify_outputs


def new_index(factory: str, dim: int, count: int) -> faiss.Index:
    """An empty index of `factory` for `count` vectors of `dim`, checked to fit them.

    Raises:
        ValueError: naming `index.factory` and why it does not fit.
    """
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).splitlines()[0]
        raise ValueError(
            f"index.factory {factory!r} is not valid for dim {dim}: {reason}"
        ) from None
    needs, what = _training_points_needed(index)
    if count < needs:
        raise ValueError(
            f"index.factory {factory!r} needs at least {needs} vectors to train "
            f"({what}), there are {count}: use fewer lists/centroids or Flat"
        )
    return index


def _training_points_needed(index: faiss.Index) -> tuple[int, str]:
    """Training needs a point per IVF list and per PQ centroid (none for Flat, HNSW), and
    which of the two sets that number."""
    ivf = faiss.try_extract_index_ivf(index)
    quantized = faiss.downcast_index(ivf if ivf is not None else index)
    pq = getattr(quantized, "pq", None)
    lists = ivf.nlist if ivf is not None else 0
    centroids = pq.ksub if pq is not None else 0
    if centroids > lists:
        return centroids, f"{centroids} centroids per PQ sub-quantizer"
    return lists, f"{lists} inverted lists"


def search_params(config: IndexConfig) -> dict[str, int]:
    """The query-time parameters of the configured index type."""
    params = {}
    if config.nprobe is not None:
        params["nprobe"] = config.nprobe
    if config.ef_search is not None:
        params["efSearch"] = config.ef_search
    if config.refine_k_factor is not None:
        params["k_factor_rf"] = config.refine_k_factor
    return params


def apply_search_params(index: faiss.Index, factory: str, params: dict[str, int]) -> None:
    """Set nprobe / efSearch / the re-ranking factor where the index type has them (others
    are ignored)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        if name == "nprobe" and faiss.try_extract_index_ivf(index) is None:
            continue
        if name == "efSearch" and "HNSW" not in factory:
            continue
        if name == "k_factor_rf" and not isinstance(index, faiss.IndexRefine):
            continue
        space.set_index_parameter(index, name, value)


def load_index(index_dir: Path) -> tuple[faiss.Index, list[str], dict]:
    """The saved index with its search params applied, its id map and its manifest; both
    files are checked against the manifest's sha256 first (AlteredFile)."""
    manifest = verify_outputs(index_dir, (INDEX.name, INDEX_IDS.name))
    index = faiss.read_index(str(index_dir / INDEX.name))
    apply_search_params(index, manifest["params"]["factory"], manifest["search_params"])
    ids = pq.read_table(index_dir / INDEX_IDS.name).column("listing_id").to_pylist()
    if len(ids) != index.ntotal:
        raise ValueError(
            f"{index_dir}: {index.ntotal} vectors but {len(ids)} ids in {INDEX_IDS.name}"
        )
    return index, ids, manifest
