"""`index` step: a FAISS index over the fused listing embeddings.

The index type is an `index_factory` string (`index.factory`: `Flat` exact; `IVF{n},PQ{m}`,
`HNSW32`, ... approximate), inner product on unit vectors. Types that need training are
trained on a seeded sample; vectors are added part by part. Built on a GPU when one is
visible and faiss has GPU support (IVF and flat types), else on the CPU. Writes to
`<workdir>/index/`:

    index.faiss     the index, every vector labelled (components/io/faiss_index.py)
    delta.faiss     what refreshes added since index.faiss was written whole (empty
                    after a full build): an index of the same type and training
    ids.parquet     the id map: listing_id and label (id) of every live vector
    manifest.json   factory, search params, size, how it was built, inputs

A factory that does not fit the data (fewer vectors than IVF lists or PQ centroids, PQ
sub-quantizers not dividing the dimension, a typo) is an error naming `index.factory`
before any long work.

A refresh (`index.update_current`) builds on the index of the release the embed step built
on, without rewriting it: index.faiss stays the release's file (this workdir's own when it
is that file, so at a million listings a gigabyte is neither read whole, copied, written
nor uploaded), and the vectors of new and changed listings go to the release's delta, from
which those of listings that left or changed are removed (a changed listing keeps its
label, a new one gets the next free label). A vector of index.faiss is live while the id
map names its label and the delta does not hold it; readers merge (`live_index`). Once the
delta and index.faiss's vectors no longer live pass `index.compact_above` of index.faiss,
when the search params changed, or for a release written before deltas, the index is
written whole again with an empty delta. It builds in full instead, and says why, when the
index type or the model changed, when the type cannot remove vectors (HNSW, Refine) or the
index was written before vectors were labelled, when it lacks a label its id map names or
its delta is not of its type, when the delta passes `index.max_delta` of the release's
listings, or when an IVF index's lists end up more unbalanced than `index.max_imbalance`
(its coarse quantizer is never retrained in place).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.config import IndexConfig, StepPaths
from components.contract import (
    EMBEDDED_IDS,
    EMBEDDINGS,
    INDEX,
    INDEX_BASE,
    INDEX_CHANGES,
    INDEX_DELTA,
    INDEX_IDS,
    STEPS,
)
from components.io import atomic
from components.io.embedding_files import Embeddings, verify_embeddings
from components.io.faiss_index import (
    apply_search_params,
    emptied,
    imbalance,
    imbalance_of,
    labelled,
    labels_of,
    list_sizes,
    live_mask,
    new_index,
    read_id_table,
    removable,
    same_kind,
    search_params,
    write_ids,
)
from components.io.manifest import (
    Timer,
    describe_files,
    read_manifest,
    sha256_file,
    unchanged_manifest,
    write_manifest,
)
from components.io.progress import progress
from components.release import base_release

STEP = STEPS["index"]
OUTPUTS = tuple(artifact.name for artifact in STEP.writes if artifact.tracked)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexResult:
    out_dir: Path
    summary: str


def run(config: IndexConfig, paths: StepPaths) -> IndexResult:
    """Build the index of `<workdir>/embed` (or update the release's, in a refresh) and
    save it with its id map."""
    timer = Timer()
    embed_dir = paths.step_dir("embed")
    embedded = read_manifest(embed_dir)
    out = paths.step_dir(STEP.name)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"embed": embedded["outputs"], "seed": paths.seed}
    if (kept := unchanged_manifest(out, config, inputs, OUTPUTS)) is not None:
        # what this run did: nothing; not the account of the build that made the files
        summary = (
            f"index: nothing rebuilt: the embed step's {kept['counts']['vectors']:,} vectors "
            f"are the ones it indexed last ({config.factory}, "
            f"{kept['index_bytes'] / 2**20:.1f} MiB)"
        )
        _write_changes(paths, embedded)
        _keep(out, config, timer, inputs, kept, embedded, summary)
        log.info("%s", summary)
        return IndexResult(out_dir=out, summary=summary)
    verify_embeddings(embed_dir, embedded)
    parts = Embeddings(paths.path(EMBEDDINGS))
    count, dim = len(parts), parts.dim
    build_start = time.perf_counter()
    built = _update(config, paths, embedded, parts) if config.update_current else None
    on_gpu = False
    if built is None or isinstance(built, str):
        if built is not None:
            log.info("index: building in full: %s", built)
        built, on_gpu = _full_build(config, paths, parts, count, dim, built)
    build_seconds = time.perf_counter() - build_start
    _write_index(out, built, config)
    write_ids(out / INDEX_IDS.name, built.ids)
    _write_changes(paths, embedded)
    size = sum((out / artifact.name).stat().st_size for artifact in (INDEX, INDEX_DELTA))
    vectors = built.ids.num_rows
    summary = (
        f"index: {config.factory} over {vectors} x {dim} vectors, {size / 2**20:.1f} MiB, "
        f"{_describe(built.how)} in {build_seconds:.1f} s on {'GPU' if on_gpu else 'CPU'}"
    )
    how = dict(built.how)
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs=inputs,
        outputs=describe_files(out, OUTPUTS),
        counts={"vectors": vectors, "dim": dim} | how.pop("counts", {}),
        extra={"index_bytes": size, "search_params": search_params(config)} | how,
        run=_run_record(out, summary, build_seconds, on_gpu),
    )
    log.info("%s", summary)
    return IndexResult(out_dir=out, summary=summary)


def _keep(out: Path, config: IndexConfig, timer: Timer, inputs, kept, embedded, summary) -> None:
    """Record an index kept as it was: its manifest as before, and this run's record (its
    changes.parquet, written anew). In a refresh built on a newer release than the one the
    index was updated from (the release that update published, then a refresh with nothing
    new), the manifest says what the index is against that release, every vector kept,
    nothing added, changed or removed, as an update with no delta would; not the earlier
    refresh's delta against the earlier release."""
    fields = {k: v for k, v in kept.items() if k not in ("step", "params", "inputs", "outputs")}
    counts = fields.pop("counts")
    base = (embedded.get("inputs", {}).get("base") or {}).get("version")
    if fields.get("build") == "update" and base is not None and fields.get("base") != base:
        vectors = counts["vectors"]
        counts = {"vectors": vectors, "dim": counts["dim"], "kept": vectors}
        counts |= {"added": 0, "changed": 0, "removed": 0}
        fields["base"] = base
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs=inputs,
        outputs=kept["outputs"],
        counts=counts,
        extra=fields,
        run=_run_record(out, summary, 0.0, False),
    )


def _run_record(out: Path, summary: str, build_seconds: float, gpu: bool) -> dict:
    """This run's machine-local facts: its changes.parquet is relative to the production
    store's release, so its hash is recorded here (promote checks it), not in the manifest."""
    return {
        "summary": summary,
        "build_seconds": build_seconds,
        "gpu": gpu,
        "local_outputs": describe_files(out, [INDEX_CHANGES.name]),
    }


@dataclass(frozen=True)
class _Built:
    """An index to write: `index` whole (None: the release's index file, kept as it is,
    at `kept`), its `delta` beside it, the id map and how it was made."""

    index: faiss.Index | None
    delta: faiss.Index
    ids: pa.Table
    how: dict
    kept: Path | None = None


def _write_index(out: Path, built: _Built, config: IndexConfig) -> None:
    """index.faiss (written, or the release's copied in when it is not already there) and
    delta.faiss."""
    target = out / INDEX.name
    if built.index is not None:
        apply_search_params(built.index, config.factory, search_params(config))
        with atomic.writing(target) as tmp:
            faiss.write_index(built.index, str(tmp))
    elif built.kept != target:
        with atomic.writing(target) as tmp:
            shutil.copyfile(built.kept, tmp)
    with atomic.writing(out / INDEX_DELTA.name) as tmp:
        faiss.write_index(built.delta, str(tmp))


def _describe(how: dict) -> str:
    if how["build"] == "update":
        c = how["counts"]
        kept = (
            f"; its index written whole again ({how['compacted']})"
            if "compacted" in how
            else f"; its index kept, {how['delta_vectors']} vectors in the delta, "
            f"{how['dead_vectors']} of the index's no longer live"
        )
        return (
            f"updated from {how['base']} ({c['kept']} kept, {c['added']} added, "
            f"{c['changed']} changed, {c['removed']} removed{kept})"
        )
    return f"built in full ({how['reason']})" if "reason" in how else "built"


def _full_build(
    config: IndexConfig, paths: StepPaths, parts: Embeddings, count: int, dim: int, reason
) -> tuple[_Built, bool]:
    """A new index of every embedding, labelled 0..N-1 in the embeddings' order, with an
    empty delta of its type and training; and whether it was built on a GPU."""
    index = new_index(config.factory, dim, count)
    gpu = _maybe_to_gpu(index, config.gpu)
    on_gpu = gpu is not index
    if not index.is_trained:
        sample = _sample(parts, count, config.train_sample, paths.seed)
        log.info("index: training %s on %d of %d vectors", config.factory, len(sample), count)
        gpu.train(sample)
    delta = faiss.clone_index(faiss.index_gpu_to_cpu(gpu) if on_gpu else index)  # empty
    _add(gpu, parts, count)
    index = faiss.index_gpu_to_cpu(gpu) if on_gpu else index
    ids = _embedded_ids(paths).append_column("id", pa.array(np.arange(count, dtype=np.int64)))
    how = {"build": "full"} | ({"reason": reason} if reason else {})
    return _Built(index, delta, ids, how), on_gpu


def _embedded_ids(paths: StepPaths) -> pa.Table:
    """listing_id and fingerprint of every embedding row (null fingerprints for embeddings
    written before there were any)."""
    table = pq.read_table(paths.path(EMBEDDED_IDS))
    if "fingerprint" not in table.column_names:
        table = table.append_column("fingerprint", pa.nulls(table.num_rows, pa.string()))
    return table.select(["listing_id", "fingerprint"])


def _update(config: IndexConfig, paths: StepPaths, embedded: dict, parts: Embeddings):
    """The release's index with the delta applied (`_Built`); or why it must be built in
    full instead (a string).

    The release's index file is kept: the vectors of new and changed listings go to its
    delta (the release's delta, less the vectors of listings that left or changed since),
    and those of the index file the id map no longer names or the delta replaces are no
    longer live. Past `index.compact_above` of the index file in the delta and in vectors
    no longer live, or when the search params changed, the index is written whole again
    (the delta merged into it, empty beside it).

    Raises:
        ValueError: the embed step built on no release (run it with reuse_current).
    """
    based_on = embedded["inputs"].get("base")
    if based_on is None:
        raise ValueError(
            "index.update_current updates the index of the release the embed step built on, "
            "and it built on none: run embed with --set embed.reuse_current=true"
        )
    names = (INDEX_IDS.name, EMBEDDED_IDS.name, INDEX_DELTA.name)
    base = base_release.version(paths, based_on["version"], paths.path(INDEX_BASE), names)
    if base.manifest.get("index", {}).get("factory") != config.factory:
        return f"index.factory is {config.factory!r}, {base.version} has another type"
    embedded_with = base.manifest.get("embedding_model_sha256", base.model.get("sha256"))
    if embedded_with != embedded["model"]["sha256"]:
        return f"{base.version}'s index was embedded by another model than these embeddings"
    source = _release_index(paths, base)
    index = faiss.read_index(str(source), faiss.IO_FLAG_MMAP_IFC)  # mapped: its labels read
    if not labelled(index):
        return f"{base.version}'s index was built before vectors were labelled"
    if not removable(index):
        return f"a {config.factory} index cannot remove vectors"
    released = read_id_table(base.local / INDEX_IDS.name)
    delta = _delta(released, paths, base.local / EMBEDDED_IDS.name)
    share = delta.size / max(1, released.num_rows)
    if share > config.max_delta:
        return f"the delta is {share:.1%} of {base.version}, more than index.max_delta"
    had_delta = INDEX_DELTA.name in base.manifest["files"]  # not before deltas
    if had_delta:
        added = faiss.read_index(str(base.local / INDEX_DELTA.name))
        if not same_kind(index, added):
            return f"{base.version}'s delta is not an index of its index's type"
    else:
        added = emptied(index, config.factory, source)
    labels, replaced = labels_of(index), labels_of(added)
    live = live_mask(labels, released["id"].to_numpy(), replaced)
    if not np.isin(delta.gone_labels, np.concatenate([labels[live], replaced])).all():
        return f"{base.version}'s index did not hold every label it should"
    added.remove_ids(delta.gone_labels)
    added.add_with_ids(parts.take(delta.fresh_rows), delta.fresh_labels)
    dead = labels[~live_mask(labels, delta.ids["id"].to_numpy(), labels_of(added))]
    how = {"build": "update", "base": base.version, "counts": delta.counts}
    whole = _compaction(config, base, index, added, dead, had_delta)
    if whole is None:
        unbalanced = imbalance_of(_sum(list_sizes(index, dead), list_sizes(added)))
        if unbalanced > config.max_imbalance:
            return f"its lists' imbalance would be {unbalanced:.2f}, over index.max_imbalance"
        how |= {"imbalance": round(unbalanced, 4), "delta_vectors": added.ntotal}
        return _Built(None, added, delta.ids, how | {"dead_vectors": len(dead)}, source)
    index = faiss.read_index(str(source))  # into memory: it changes
    index.remove_ids(np.unique(dead))
    index.merge_from(added, 0)  # which it empties
    unbalanced = imbalance(index)
    if unbalanced > config.max_imbalance:
        return f"its lists' imbalance would be {unbalanced:.2f}, over index.max_imbalance"
    how |= {"imbalance": round(unbalanced, 4), "compacted": whole}
    return _Built(index, added, delta.ids, how)


def _compaction(config: IndexConfig, base, index, added, dead, had_delta: bool) -> str | None:
    """Why the index must be written whole again, or None: the release's file is kept."""
    if not had_delta:
        return f"{base.version} was written before index deltas"
    if base.manifest.get("index", {}).get("search_params") != search_params(config):
        return f"the search params are not {base.version}'s"
    share = (added.ntotal + len(dead)) / max(1, index.ntotal)
    if share > config.compact_above:
        return f"delta and vectors no longer live at {share:.1%}, past index.compact_above"
    return None


def _sum(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    return None if first is None else first + second


def _release_index(paths: StepPaths, base: base_release.BaseRelease) -> Path:
    """The release's index file: this workdir's own when it is that file (the last run's,
    most often: at a million listings a gigabyte not copied), else fetched."""
    own, expected = paths.path(INDEX), base.manifest["files"][INDEX.name]
    if (
        own.is_file()
        and own.stat().st_size == expected["bytes"]
        and sha256_file(own) == expected["sha256"]
    ):
        return own
    fetched = base_release.version(paths, base.version, paths.path(INDEX_BASE), (INDEX.name,))
    return fetched.local / INDEX.name


@dataclass(frozen=True)
class _Delta:
    """What a refresh changes in the release's index, by label."""

    gone_labels: np.ndarray  # of listings removed or changed
    fresh_rows: np.ndarray  # embedding rows of listings changed or added
    fresh_labels: np.ndarray  # their labels: a changed listing keeps its own
    ids: pa.Table  # the updated index's id map: the release's listings that stay, the new
    counts: dict[str, int]

    @property
    def size(self) -> int:
        return self.counts["added"] + self.counts["changed"] + self.counts["removed"]


def _delta(base_ids: pa.Table, paths: StepPaths, released: Path) -> _Delta:
    """What changed between the release's listings (`base_ids`: its id map) and the
    embeddings: listings new, changed (another fingerprint) and gone, by the fingerprints
    embed recorded (the release's, in `released`: its listing_ids.parquet; the id map
    holds none, which keeps it small). One Arrow hash lookup and numpy, no Python object
    per listing: a million listings in well under a second."""
    now = _embedded_ids(paths)
    ids, labels = base_ids["listing_id"], base_ids["id"]
    row = pc.index_in(ids, value_set=now["listing_id"])  # each listing's row now; null: gone
    present = pc.is_valid(row)
    before = _fingerprints(released)
    then = pc.take(before["before"], pc.index_in(ids, value_set=before["listing_id"]))
    same = pc.fill_null(pc.equal(then, pc.take(now["fingerprint"], row)), False)
    changed = pc.and_(present, pc.invert(same))
    found = pc.filter(row, present).to_numpy().astype(np.int64)
    new = np.ones(now.num_rows, dtype=bool)
    new[found] = False  # a row no listing of the release maps to: a new listing
    added_rows = np.flatnonzero(new)
    first = int(pc.max(labels).as_py()) + 1 if len(labels) else 0
    added_labels = np.arange(first, first + len(added_rows), dtype=np.int64)
    changed_rows = pc.filter(row, changed).to_numpy().astype(np.int64)
    return _Delta(
        gone_labels=pc.filter(labels, pc.invert(same)).to_numpy(),  # removed or changed
        fresh_rows=np.concatenate([changed_rows, added_rows]),
        fresh_labels=np.concatenate([pc.filter(labels, changed).to_numpy(), added_labels]),
        ids=pa.table(
            {
                "listing_id": pc.take(now["listing_id"], np.concatenate([found, added_rows])),
                "id": np.concatenate([pc.filter(labels, present).to_numpy(), added_labels]),
            }
        ),
        counts={
            "kept": len(found) - len(changed_rows),
            "added": len(added_rows),
            "changed": len(changed_rows),
            "removed": len(labels) - len(found),
        },
    )


def _write_changes(paths: StepPaths, embedded: dict) -> None:
    """changes.parquet: the listings added, changed (another fingerprint) and removed
    since the release the embed step built on, by listing_id (none in a retrain). One
    Arrow pass over both releases' ids; what the release records of what a refresh did."""
    base = embedded.get("inputs", {}).get("base")
    rows = pa.table({"listing_id": pa.array([], pa.string()), "change": pa.array([], pa.string())})
    if base is not None:
        released = base_release.version(
            paths, base["version"], paths.path(INDEX_BASE), (EMBEDDED_IDS.name,)
        )
        rows = listing_changes(
            _fingerprints(released.local / EMBEDDED_IDS.name), _embedded_ids(paths)
        )
    atomic.write_table(rows, paths.path(INDEX_CHANGES))


def listing_changes(before: pa.Table, now: pa.Table) -> pa.Table:
    """(listing_id, change) of each listing `added` to, `changed` in (another fingerprint)
    or `removed` from `before` (listing_id, before: its fingerprint) to `now` (listing_id,
    fingerprint), in that order, each group in `now`'s or `before`'s order."""
    row = pc.index_in(before["listing_id"], value_set=now["listing_id"])
    present = pc.is_valid(row)
    same = pc.fill_null(pc.equal(before["before"], pc.take(now["fingerprint"], row)), False)
    groups = {
        "added": pc.filter(
            now["listing_id"], pc.invert(pc.is_in(now["listing_id"], before["listing_id"]))
        ),
        "changed": pc.filter(before["listing_id"], pc.and_(present, pc.invert(same))),
        "removed": pc.filter(before["listing_id"], pc.invert(present)),
    }
    return pa.concat_tables(
        pa.table(
            {
                "listing_id": ids.cast(pa.string()),
                "change": pa.array([change] * len(ids), pa.string()),
            }
        )
        for change, ids in groups.items()
    )


def _fingerprints(path: Path) -> pa.Table:
    """listing_id and `before` (its fingerprint; null when the release recorded none) of a
    release's listing_ids.parquet."""
    table = pq.read_table(path)
    before = (
        table["fingerprint"]
        if "fingerprint" in table.column_names
        else pa.nulls(table.num_rows, pa.string())
    )
    return pa.table({"listing_id": table["listing_id"], "before": before})


def _maybe_to_gpu(index: faiss.Index, mode: str) -> faiss.Index:
    """The index on GPU 0 when asked (auto: if faiss sees a GPU) and the type moves."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if mode == "never" or gpus == 0:
        if mode == "always":
            raise ValueError("index.gpu is 'always' but faiss sees no GPU (faiss-cpu build?)")
        return index
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except (RuntimeError, AttributeError) as err:
        if mode == "always":
            raise ValueError(
                f"index.gpu is 'always' but this index type cannot move: {err}"
            ) from err
        log.info("index: building on CPU (%s)", str(err).splitlines()[0])
        return index


def _sample(parts: Embeddings, count: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of up to `size` vectors, read part by part."""
    rows = np.sort(np.random.default_rng(seed).choice(count, min(size, count), replace=False))
    return parts.take(rows)


def _add(index: faiss.Index, parts: Embeddings, count: int) -> None:
    """Every live vector, labelled by its row in the embeddings (0..N-1)."""
    first = 0
    with progress(total=count, desc="index: adding", unit="vec", mininterval=2) as bar:
        for vectors in parts.chunks():
            index.add_with_ids(vectors, np.arange(first, first + len(vectors), dtype=np.int64))
            first += len(vectors)
            bar.update(len(vectors))
