"""`index` step: a FAISS index over the fused listing embeddings.

The index type is an `index_factory` string (`index.factory`: `Flat` exact; `IVF{n},PQ{m}`,
`HNSW32`, ... approximate), inner product on unit vectors. Types that need training are
trained on a seeded sample; vectors are added part by part. Built on a GPU when one is
visible and faiss has GPU support (IVF and flat types), else on the CPU. Writes to
`<workdir>/index/`:

    index.faiss     the index; row i is listing i of ids.parquet
    ids.parquet     the id map: listing_id per index row
    manifest.json   factory, search params, size, build time, inputs

A factory that does not fit the data (fewer vectors than IVF lists or PQ centroids, PQ
sub-quantizers not dividing the dimension, a typo) is an error naming `index.factory`
before any long work.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from components.config import IndexConfig, StepPaths
from components.contract import EMBEDDED_IDS, INDEX, INDEX_IDS, STEPS
from components.io import atomic
from components.io.embedding_files import embedding_parts, verify_embeddings
from components.io.faiss_index import apply_search_params, new_index, search_params
from components.io.manifest import (
    Timer,
    describe_files,
    read_manifest,
    run_summary,
    unchanged_manifest,
    write_manifest,
)

STEP = STEPS["index"]
OUTPUTS = tuple(artifact.name for artifact in STEP.writes)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexResult:
    out_dir: Path
    summary: str


def run(config: IndexConfig, paths: StepPaths) -> IndexResult:
    """Build the index of `<workdir>/embed` and save it with its id map."""
    timer = Timer()
    embed_dir = paths.step_dir("embed")
    embedded = read_manifest(embed_dir)
    out = paths.step_dir(STEP.name)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"embed": embedded["outputs"], "seed": paths.seed}
    if unchanged_manifest(out, config, inputs, OUTPUTS) is not None:
        summary = run_summary(out) + " (unchanged: nothing rebuilt)"
        log.info("%s", summary)
        return IndexResult(out_dir=out, summary=summary)
    verify_embeddings(embed_dir, embedded)
    parts = embedding_parts(embed_dir)
    count, dim = _count_and_dim(parts)
    index = new_index(config.factory, dim, count)
    gpu = _maybe_to_gpu(index, config.gpu)
    build_start = time.perf_counter()
    if not index.is_trained:
        sample = _sample(parts, count, config.train_sample, paths.seed)
        log.info("index: training %s on %d of %d vectors", config.factory, len(sample), count)
        gpu.train(sample)
    _add(gpu, parts, count)
    index = faiss.index_gpu_to_cpu(gpu) if gpu is not index else index
    build_seconds = time.perf_counter() - build_start
    apply_search_params(index, config.factory, search_params(config))
    with atomic.writing(out / INDEX.name) as tmp:
        faiss.write_index(index, str(tmp))
    shutil.copyfile(paths.path(EMBEDDED_IDS), out / INDEX_IDS.name)
    size = (out / INDEX.name).stat().st_size
    summary = (
        f"index: {config.factory} over {count} x {dim} vectors, {size / 2**20:.1f} MiB, "
        f"built in {build_seconds:.1f} s on {'GPU' if gpu is not index else 'CPU'}"
    )
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs=inputs,
        outputs=describe_files(out, OUTPUTS),
        counts={"vectors": count, "dim": dim},
        extra={"index_bytes": size, "search_params": search_params(config)},
        run={"summary": summary, "build_seconds": build_seconds, "gpu": gpu is not index},
    )
    log.info("%s", summary)
    return IndexResult(out_dir=out, summary=summary)


def _count_and_dim(parts: list[Path]) -> tuple[int, int]:
    shapes = [np.load(part, mmap_mode="r").shape for part in parts]
    dims = {shape[1] for shape in shapes}
    if len(dims) != 1:
        raise ValueError(f"embedding parts disagree on the dimension: {sorted(dims)}")
    return sum(shape[0] for shape in shapes), dims.pop()


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


def _sample(parts: list[Path], count: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of up to `size` vectors, read part by part."""
    rows = np.sort(np.random.default_rng(seed).choice(count, min(size, count), replace=False))
    taken, first = [], 0
    for part in parts:
        vectors = np.load(part, mmap_mode="r")
        mine = rows[(rows >= first) & (rows < first + len(vectors))] - first
        taken.append(np.ascontiguousarray(vectors[mine], dtype=np.float32))
        first += len(vectors)
    return np.concatenate(taken)


def _add(index: faiss.Index, parts: list[Path], count: int) -> None:
    with tqdm(total=count, desc="index: adding", unit="vec", mininterval=2) as progress:
        for part in parts:
            vectors = np.ascontiguousarray(np.load(part), dtype=np.float32)
            index.add(vectors)
            progress.update(len(vectors))
