"""FAISS indexes on disk: building an empty index of an `index_factory` string checked
to fit the data, query-time search params, and loading the index step's output.

Inner product on unit vectors throughout: the index answers cosine similarity. Every
vector carries a 64-bit label, which `ids.parquet` maps to its listing (`listing_id`,
`id`): IVF indexes store labels themselves, the others are wrapped in an `IDMap2`, so that a
refresh can remove a listing's vector by its label and add new ones under new labels. A
full build labels the vectors 0..N-1 in the embeddings' order.

A refresh does not rewrite the index file: it writes the vectors it adds to a delta
(`delta.faiss`, an index of the same type and training) and keeps the file of the release
it builds on, as Lance keeps a version's unchanged data files. A vector of the index file
is live while the id map names its label and the delta does not hold that label (the
delta's vector replaces it). `live_index` gives the service the two merged in memory, and
evaluate the index file memory-mapped beside the delta, searched side by side
(`SplitIndex`): no copy of a file a refresh left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.config import IndexConfig
from components.contract import INDEX, INDEX_DELTA, INDEX_IDS
from components.io import atomic
from components.io.manifest import verify_outputs

# faiss 1.15 scans the stored vectors once per query unless queries x dimensions reach
# `distance_compute_blas_threshold` (128,000 by default: 500 queries of 256 dimensions).
# Over 1M vectors a batch of 256 queries took 11.4 s that way and 0.55 s as one matrix
# product, 32 queries 1,512 ms and 176 ms; one query 98 ms either way. Evaluate's batches
# of test queries go as a matrix product (`as_matrix_product`); the service keeps faiss's
# default (small batches over small indexes: benchmarks/faiss_batches.py).
BLAS_THRESHOLD = 20
MATRIX_PRODUCT_FROM = 20  # queries in a batch from which evaluate searches that way


@contextmanager
def as_matrix_product(queries: int) -> Iterator[None]:
    """Searches in the body go as one matrix product when `queries` (a batch's size) is
    at least MATRIX_PRODUCT_FROM; faiss's threshold is restored after."""
    if queries < MATRIX_PRODUCT_FROM:
        yield
        return
    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = before


@dataclass(frozen=True)
class IndexIds:
    """Which listing each label of an index is: `ids.parquet` in memory."""

    listing_ids: list[str]
    labels: np.ndarray  # int64, one per listing id

    def __post_init__(self) -> None:
        if len(self.listing_ids) != len(self.labels):
            raise ValueError(f"{len(self.listing_ids)} listing ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.listing_ids)

    def listing_of(self) -> dict[int, str]:
        return dict(zip(self.labels.tolist(), self.listing_ids, strict=True))

    def label_of(self) -> dict[str, int]:
        return dict(zip(self.listing_ids, self.labels.tolist(), strict=True))


ID_SCHEMA = pa.schema([("listing_id", pa.string()), ("id", pa.int64())])


def read_id_table(path: Path) -> pa.Table:
    """An index's id map as a table: listing_id and id (its label). One written before
    labels were stored labels its rows 0..N-1; a fingerprint column that id maps carried
    for a while is left out (the release's listing_ids.parquet holds them)."""
    table = pq.read_table(path, columns=[n for n in ID_SCHEMA.names if n in _columns(path)])
    if "id" not in table.column_names:
        table = table.append_column("id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return table.select(ID_SCHEMA.names).cast(ID_SCHEMA)


def _columns(path: Path) -> list[str]:
    return pq.ParquetFile(path).schema_arrow.names


def read_ids(path: Path) -> IndexIds:
    """An index's id map, in memory."""
    table = read_id_table(path)
    return IndexIds(table["listing_id"].to_pylist(), table["id"].to_numpy().astype(np.int64))


def write_ids(path: Path, table: pa.Table) -> None:
    """The id map: a table of listing_id and id, one row per vector (zstd: every refresh
    uploads it)."""
    atomic.write_table(table.select(ID_SCHEMA.names).cast(ID_SCHEMA), path, compression="zstd")


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
    if isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return index  # IVF types store each vector's label themselves
    return faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)


def unwrapped(index: faiss.Index) -> faiss.Index:
    """The index inside an IDMap wrapper (or the index itself)."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return faiss.downcast_index(index)


def labelled(index: faiss.Index) -> bool:
    """Whether the index takes vectors under labels of our choosing (one built before
    labels were stored does not)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVF | faiss.IndexIDMap2)


def removable(index: faiss.Index) -> bool:
    """Whether vectors can be removed by label: IVF types and the flat-code types (Flat,
    PQ, SQ) can; graph types (HNSW) and re-ranking wrappers (Refine) cannot."""
    inner = unwrapped(index)
    return isinstance(inner, faiss.IndexIVF | faiss.IndexFlatCodes)


def imbalance(index: faiss.Index) -> float:
    """How unevenly an IVF index's lists are filled (1.0: evenly; faiss's imbalance
    factor); 1.0 for other types."""
    return imbalance_of(list_sizes(index))


def list_sizes(index: faiss.Index, without: np.ndarray | None = None) -> np.ndarray | None:
    """The vectors in each list of an IVF index, those labelled in `without` not counted;
    None for other types."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists, sizes = ivf.invlists, np.zeros(ivf.nlist, np.int64)
    for i in range(ivf.nlist):
        sizes[i] = lists.list_size(i)
        if without is not None and len(without) and sizes[i]:
            labels = faiss.rev_swig_ptr(lists.get_ids(i), int(sizes[i]))
            sizes[i] -= int(np.isin(labels, without).sum())
    return sizes


def imbalance_of(sizes: np.ndarray | None) -> float:
    """faiss's imbalance factor of IVF list sizes (1.0: even; also for no lists)."""
    if sizes is None or not sizes.sum():
        return 1.0
    sizes = sizes.astype(np.float64)
    return float(len(sizes) * np.sum(sizes**2) / np.sum(sizes) ** 2)


def live_mask(labels: np.ndarray, named: np.ndarray, replaced: np.ndarray) -> np.ndarray:
    """Which vectors of an index file, labelled `labels`, are live: the id map names their
    label (`named`) and the delta does not hold it (`replaced`)."""
    return np.isin(labels, named) & ~np.isin(labels, replaced)


def live_index(index_file: Path, delta_file: Path | None, ids: IndexIds, mapped: bool):
    """The index that serves `ids`: `index_file`'s vectors that are live and `delta_file`'s
    (None: an index written before deltas, all of it live). `mapped`: for searching only:
    the index file is memory-mapped, never read into memory, and where it holds vectors no
    longer live or a delta sits beside it, the two are searched side by side
    (`SplitIndex`); else the delta is merged into the index read whole (what the service
    serves from memory)."""
    flags = faiss.IO_FLAG_MMAP_IFC if mapped else 0
    index = faiss.read_index(str(index_file), flags)
    delta = faiss.read_index(str(delta_file)) if delta_file is not None else None
    if delta is None or (delta.ntotal == 0 and index.ntotal == len(ids)):
        return index
    labels = labels_of(index)
    dead = np.unique(labels[~live_mask(labels, ids.labels, labels_of(delta))])
    if mapped:
        return SplitIndex(index, delta, dead)
    if len(dead):
        index.remove_ids(dead)
    if delta.ntotal:
        index.merge_from(delta, 0)
    return index


class SplitIndex:
    """An index file's live vectors and its delta, searched side by side with their top
    lists merged: the answers of the two merged into one index (`live_index`), without
    reading the file into memory or copying its vectors to grow them (at 1M `Flat`
    vectors, 1.3 s and a second gigabyte). Searching only: faiss's `search`, `ntotal`,
    `d`; `parts` take the search params."""

    def __init__(self, index: faiss.Index, delta: faiss.Index, dead: np.ndarray) -> None:
        self.parts = (index, delta)
        self.dead = dead  # labels of `index`'s vectors that are not live, sorted
        self.d = index.d
        self.ntotal = index.ntotal - len(dead) + delta.ntotal

    def labels(self) -> np.ndarray:
        """The label of every live vector (`labels_of`)."""
        index, delta = self.parts
        labels = labels_of(index)
        return np.concatenate([labels[~np.isin(labels, self.dead)], labels_of(delta)])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, labels = self._live(queries, k)
        delta = self.parts[1]
        if delta.ntotal:
            more_scores, more_labels = delta.search(queries, k)
            scores, labels = _best(
                np.hstack([scores, more_scores]), np.hstack([labels, more_labels]), k
            )
        return scores, labels

    def _live(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index file's top `k` live vectors per query: its top `k` and a few more
        (four times the dead vectors expected among `k`), the dead dropped; a query that
        lost more than that is searched again, four times as deep each time, up to as
        deep as every dead vector (exact: of its top k + dead, at least k are live)."""
        index, dead = self.parts[0], self.dead
        if not len(dead):
            return index.search(queries, k)
        extra = min(len(dead), 8 + 4 * -(-k * len(dead) // max(1, index.ntotal)))
        scores = np.full((len(queries), k), _MISSING, np.float32)
        labels = np.full((len(queries), k), -1, np.int64)
        todo = np.arange(len(queries))
        while len(todo):
            found = index.search(queries[todo], k + extra)
            filled = found[1][:, -1] >= 0  # rows the index could have filled further
            top_scores, top_labels = _without(*found, dead)
            done = ~(filled & (top_labels[:, k - 1] < 0)) | (extra == len(dead))
            scores[todo[done]], labels[todo[done]] = top_scores[done, :k], top_labels[done, :k]
            todo, extra = todo[~done], min(len(dead), extra * 4)
        return scores, labels


_MISSING = -np.finfo(np.float32).max  # faiss's score of no result under inner product


def _without(scores: np.ndarray, labels: np.ndarray, dead: np.ndarray):
    """Search results with the vectors labelled in `dead` taken out, the rest moved up
    in order (the freed places at the end: label -1, faiss's score of no result)."""
    gone = np.isin(labels, dead) | (labels < 0)
    order = np.argsort(gone, axis=1, kind="stable")
    scores = np.take_along_axis(np.where(gone, _MISSING, scores), order, axis=1)
    return scores, np.take_along_axis(np.where(gone, -1, labels), order, axis=1)


def _best(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `k` highest scores (inner product) and their labels, best first."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(labels, order, axis=1)


def same_kind(index: faiss.Index, delta: faiss.Index) -> bool:
    """Whether `delta` can merge into `index`: the same types, dimension and metric, and
    for IVF the same number of lists (its training is taken to be the index's: the index
    step writes them together)."""
    pairs = [(faiss.downcast_index(index), faiss.downcast_index(delta))]
    pairs.append((unwrapped(index), unwrapped(delta)))
    if any(
        type(a) is not type(b) or a.d != b.d or a.metric_type != b.metric_type for a, b in pairs
    ):
        return False
    ivf, other = faiss.try_extract_index_ivf(index), faiss.try_extract_index_ivf(delta)
    return ivf is None or (other is not None and ivf.nlist == other.nlist)


def emptied(index: faiss.Index, factory: str, index_file: Path) -> faiss.Index:
    """An empty index of the type and training of `index` (read from `index_file`): a
    delta to grow beside it. A type that needs no training is made new; the others (and
    an index whose file holds another class of the type) are read again into memory and
    emptied (a pass over the file: only for an index written before deltas)."""
    if faiss.index_factory(index.d, factory, faiss.METRIC_INNER_PRODUCT).is_trained:
        # as read back from a file (a Flat written is read as a FlatIP: another class)
        fresh = faiss.deserialize_index(faiss.serialize_index(new_index(factory, index.d, 0)))
        if same_kind(index, fresh):
            return fresh
    copy = faiss.read_index(str(index_file))
    copy.reset()
    return copy


def allow_reconstruct(index: faiss.Index) -> None:
    """Let `reconstruct(label)` work on any label (IVF types need a direct map)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)


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
    if isinstance(index, SplitIndex):
        for part in index.parts:
            apply_search_params(part, factory, params)
        return
    space = faiss.ParameterSpace()
    for name, value in params.items():
        if name == "nprobe" and faiss.try_extract_index_ivf(index) is None:
            continue
        if name == "efSearch" and "HNSW" not in factory:
            continue
        if name == "k_factor_rf" and not isinstance(unwrapped(index), faiss.IndexRefine):
            continue
        space.set_index_parameter(index, name, value)


def load_index(index_dir: Path) -> tuple[faiss.Index, IndexIds, dict]:
    """The saved index (with its delta: `live_index`) with its search params applied, its
    id map and its manifest; every file is checked against the manifest's sha256 first
    (AlteredFile). For searching only: a flat store of vectors (`Flat`, or an HNSW graph's)
    is memory-mapped, not read (1M vectors: 0.9 s -> 0.05 s; the page cache serves the
    searches as fast), and searched beside its delta (`SplitIndex`)."""
    # a workdir indexed before deltas has none
    delta = INDEX_DELTA.name if (index_dir / INDEX_DELTA.name).is_file() else None
    manifest = verify_outputs(index_dir, (INDEX.name, INDEX_IDS.name, *([delta] if delta else [])))
    ids = read_ids(index_dir / INDEX_IDS.name)
    delta_file = index_dir / delta if delta else None
    index = live_index(index_dir / INDEX.name, delta_file, ids, mapped=True)
    apply_search_params(index, manifest["params"]["factory"], manifest["search_params"])
    if len(ids) != index.ntotal:
        raise ValueError(
            f"{index_dir}: {index.ntotal} vectors but {len(ids)} ids in {INDEX_IDS.name}"
        )
    return index, ids, manifest


def labels_of(index: faiss.Index) -> np.ndarray:
    """The label of every vector the index holds (int64, in no particular order): an
    IDMap's id map, an IVF index's inverted lists, else 0..ntotal-1 (an index built before
    labels were stored)."""
    if isinstance(index, SplitIndex):
        return index.labels()
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return np.arange(index.ntotal, dtype=np.int64)
    lists = ivf.invlists
    return np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
            for i in range(ivf.nlist)
            if lists.list_size(i)
        ]
    ).astype(np.int64)


def coverage(
    ids: IndexIds, listing_ids: list[str], removed: set[str], labels: np.ndarray
) -> dict[str, int]:
    """How far the index is from holding every embedded listing exactly once and nothing
    else. `labels`: those of the index's vectors (`labels_of`), matched to listings by the
    id map `ids`. Counts embedded listings it lacks (no vector under any of their labels),
    listings it holds more than once, listings it holds that were not embedded, and of
    those the removed ones (`removed`: tombstoned), and vectors whose label is no
    listing's."""
    present, per_label = np.unique(labels, return_counts=True)
    at = np.clip(np.searchsorted(present, ids.labels), 0, max(0, len(present) - 1))
    mapped = (present[at] == ids.labels) if len(present) else np.zeros(len(ids), bool)
    vectors = np.where(mapped, per_label[at] if len(present) else 0, 0)
    # vectors per listing, in Arrow: a million listings without a Python object each
    per_listing = (
        pa.table({"listing_id": pa.array(ids.listing_ids, pa.string()), "vectors": vectors})
        .group_by("listing_id")
        .aggregate([("vectors", "sum")])
    )
    held = per_listing.filter(pc.greater(per_listing.column("vectors_sum"), 0))
    held_ids = held.column("listing_id")
    embedded = pc.unique(pa.array(listing_ids, pa.string()))
    foreign = held_ids.filter(pc.invert(pc.is_in(held_ids, value_set=embedded)))
    gone = pa.array(sorted(removed), pa.string())
    owned = np.isin(present, ids.labels)
    return {
        "index/missing_listings": _count(pc.invert(pc.is_in(embedded, value_set=held_ids))),
        "index/repeated_listings": _count(pc.greater(held.column("vectors_sum"), 1)),
        "index/foreign_listings": len(foreign),
        "index/removed_listings": _count(pc.is_in(foreign, value_set=gone)),
        "index/unlabelled_vectors": int(per_label[~owned].sum()),
    }


def _count(mask) -> int:
    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


class RowIndex:
    """An index whose search answers rows of `listing_ids` (the embeddings' order)
    instead of labels (-1 for a label of no embedded listing): what evaluation compares
    with exact search."""

    def __init__(self, index: faiss.Index, ids: IndexIds, listing_ids: list[str]) -> None:
        self.index = index
        found = pc.index_in(
            pa.array(ids.listing_ids, pa.string()), value_set=pa.array(listing_ids, pa.string())
        )
        rows = pc.fill_null(found, -1).to_numpy().astype(np.int64)
        order = np.argsort(ids.labels)
        self._labels, self._rows = ids.labels[order], rows[order]

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with as_matrix_product(len(vectors)):
            scores, labels = self.index.search(vectors, k)
        at = np.clip(np.searchsorted(self._labels, labels), 0, max(0, len(self._labels) - 1))
        known = (labels >= 0) & (self._labels[at] == labels) if len(self._labels) else labels < -1
        return scores, np.where(known, self._rows[at] if len(self._rows) else -1, -1)
