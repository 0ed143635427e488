"""`featurize` step: frozen encoders turn every view of every clean listing, and every query,
into a feature vector, cached by content in a sharded store under `<workdir>/featurize/`.

Outputs:
    views.parquet     one row per usable view: listing_id, modality, view, position, ref, key
    queries.parquet   the clean queries with the content key of their text
    skipped.parquet   views that could not be read or decoded, with listing id and reason
    store/<encoder>/  the content-addressed feature shards (kept between runs)
    image_keys.parquet  each image's content key under its identity (kept between runs)
    views_index.parquet  each listing's state and where its rows are in views.parquet

Listings are read `listings_per_chunk` at a time and images encoded `image_batch_size` at
a time, so memory stays bounded whatever the catalog size. A view whose content was
encoded before (by this or an earlier run) is looked up, not recomputed. Unless validate
verified content (`validate.verify_content`, the retrain's default), an image whose size
and mtime (S3: size and ETag) are those it had when last hashed, and whose features the
store holds, is not read at all (components/io/image_identity.py).

Sharded (`--shard I/N`, components/core/shards.py): shard I featurizes the listings whose
id hashes to I and writes its views, skipped views and a per-chunk row count under
`shards/I-of-N/` (shard 0 also the queries), adding to the shared store under file names
of its own; `--gather N` then writes the outputs above from the N shards, chunk by chunk
in the clean listings' order: the files one unsharded run writes.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from components.config import FeaturizeConfig, StepPaths
from components.contract import (
    CLEAN,
    CLEAN_QUERIES,
    FEATURE_STORE,
    IMAGE_KEYS,
    LISTING_STATE,
    QUERY_FEATURES,
    SKIPPED_VIEWS,
    STEPS,
    VIEWS,
)
from components.core import encoders
from components.core.shards import Shard, every_shard
from components.core.views import view_text
from components.io import listing_state
from components.io.allocator import keep_freed_memory
from components.io.atomic import writing
from components.io.catalog_reader import (
    TRUSTED_MAX_BYTES,
    TRUSTED_SCHEMES,
    CatalogRoot,
    read_image_bytes,
)
from components.io.feature_store import FeatureStore, content_key
from components.io.image_identity import (
    Identities,
    ImageRecords,
    ReadCounter,
    fingerprint,
    read_records,
    write_records,
)
from components.io.images import DecodeBudget, ImageRefError, decode_image
from components.io.manifest import (
    Timer,
    describe_files,
    read_manifest,
    require_run,
    verify_outputs,
    write_manifest,
)
from components.io.parquet_rows import RowReader
from components.io.progress import progress
from components.io.view_reuse import IndexWriter, PreviousViews

STEP = STEPS["featurize"]
SHARDS = "shards"  # <featurize>/shards/I-of-N/: one shard's files until they are gathered
CHUNK_ROWS = "chunks.parquet"  # a shard's views and skipped rows per chunk of clean listings
OUTPUTS = (VIEWS.name, QUERY_FEATURES.name, SKIPPED_VIEWS.name)

VIEWS_SCHEMA = pa.schema(
    [
        ("listing_id", pa.string()),
        ("modality", pa.string()),  # "image" or "text"
        ("view", pa.string()),  # "image", "title", "description", "tags", "category"
        ("position", pa.int32()),  # 0 = the primary view of its modality
        ("ref", pa.string()),  # image reference, or the text itself
        ("key", pa.string()),  # sha256 of the content: the feature store key
    ]
)
SKIPPED_SCHEMA = pa.schema(
    [
        ("listing_id", pa.string()),
        ("ref", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

log = logging.getLogger(__name__)


# counts that depend on what earlier runs left (the feature store, the previous views):
# run.json, not the manifest
ENCODED = ("images_encoded", "texts_encoded", "encode_seconds", "listings_reused")
READS = tuple(ReadCounter().as_dict())  # what was read from the catalog: run.json too
KEYS = fingerprint(content_key="sha256 of the bytes")  # what the recorded keys are
# encoded vectors are written out this often at the latest: a run killed mid-way loses at
# most this much encoding, and a refresh that encodes a view or two per chunk writes one
# feature shard, not one per chunk (each is a file every reader of the store opens)
FLUSH_SECONDS = 30.0


@dataclass
class Counts:
    image_views: int = 0
    text_views: int = 0
    images_encoded: int = 0
    texts_encoded: int = 0
    skipped: int = 0
    encode_seconds: float = 0.0
    listings_reused: int = 0  # views taken whole from the previous run (view_reuse.py)
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FeaturizeResult:
    out_dir: Path
    counts: dict
    summary: str


@dataclass(frozen=True)
class ImageJob:
    listing_id: str
    position: int
    ref: str


def run(config: FeaturizeConfig, paths: StepPaths, shard: Shard | None = None) -> FeaturizeResult:
    """Encode every view of `<workdir>/validate/clean.parquet` and every clean query (with
    `shard`: that shard's listings, and the queries in shard 0)."""
    timer = Timer()
    keep_freed_memory()  # each photo batch would page-fault its activations in anew
    validate_dir = paths.step_dir("validate")
    validated = read_manifest(validate_dir)
    store_root = paths.step_dir(STEP.name) / FEATURE_STORE.name
    out = paths.step_dir(STEP.name) if shard is None else shard_dir(paths, shard)
    out.mkdir(parents=True, exist_ok=True)
    device = encoders.pick_device(config.device)
    # Built on first use: a run with everything cached never loads a model.
    image_factory = encoders.image_factory(config.image_encoder, config.colour_histogram)
    image_encoder = _Lazy(image_factory, device, config.image_size)
    text_encoder = _Lazy(
        encoders.TEXT_ENCODERS[config.text_encoder], device, config.text_batch_size
    )
    log.info("featurize: %s + %s on %s", image_encoder.id, text_encoder.id, device)
    writer = "" if shard is None else shard.name  # shards write files of their own
    image_store = FeatureStore(
        store_root, image_encoder.id, image_encoder.dim, config.shard_rows, writer
    )
    text_store = FeatureStore(
        store_root, text_encoder.id, text_encoder.dim, config.shard_rows, writer
    )
    counts = Counts()
    root = CatalogRoot(paths.catalog)
    # what validate trusted, featurize trusts: validate.verify_content reads everything
    records = ImageRecords(
        paths.path(IMAGE_KEYS), KEYS, trusted=not validated["params"].get("verify_content", True)
    )
    featurizer = _Featurizer(
        config, root, image_encoder, text_encoder, image_store, text_store, counts, records
    )
    reuse = _reuse_fingerprint(config)
    states, previous = _states(paths, validated), None
    if records.trusted:  # verify_content: every listing is worked on in full
        previous = PreviousViews.open(out, reuse, image_store.files() | text_store.files())
    index = featurizer.listings(paths.path(CLEAN), out, shard, states, previous)
    records.save(out / IMAGE_KEYS.name)  # a shard's: gathered with its files
    query_count = 0
    if shard is None or shard.index == 0:
        query_count = featurizer.queries(paths.path(CLEAN_QUERIES), out)
    image_store.flush()
    text_store.flush()
    index.write(out, reuse, image_store.files() | text_store.files())
    reads = featurizer.reads
    summary = _summary(counts, query_count, device, shard) + (
        f"; {reads.images_opened} images read ({reads.bytes_read / 2**20:.1f} MiB), "
        f"{reads.images_trusted} unchanged since read; {counts.listings_reused} listings "
        "unchanged since featurized"
    )
    names = OUTPUTS if shard is None or shard.index == 0 else (VIEWS.name, SKIPPED_VIEWS.name)
    _record(
        out,
        config,
        paths,
        validated,
        timer,
        outputs=[*names, *([CHUNK_ROWS] if shard else [])],
        counts={**counts.__dict__, "queries": query_count},
        reads=reads.as_dict(),
        summary=summary,
        device=str(device),
        encoders={
            "image": _store_record(image_encoder, image_store, store_root),
            "text": _store_record(text_encoder, text_store, store_root),
        },
        **({"shard": str(shard)} if shard else {}),
    )
    log.info("%s", summary)
    return FeaturizeResult(out_dir=out, counts=counts.__dict__, summary=summary)


def _reuse_fingerprint(config: FeaturizeConfig) -> str:
    """What a listing's views depend on besides its state: the params and this code."""
    return fingerprint(version=1, params=config.model_dump(mode="json"), keys=KEYS)


def _states(paths: StepPaths, validated: dict) -> pa.Table | None:
    """Validate's state of each clean listing, when written for today's clean rows."""
    clean_sha256 = validated["outputs"][CLEAN.name]["sha256"]
    states = listing_state.read(paths.path(LISTING_STATE), clean_sha256)
    if states is None:
        log.info("featurize: no listing states for these clean rows: every listing is featurized")
    return states


def _record(
    out,
    config,
    paths,
    validated,
    timer,
    *,
    outputs,
    summary,
    device,
    encoders,
    counts,
    reads,
    **extra,
):
    """Write the manifest of a run, a shard or a gather (what was encoded now, rather
    than found in the store, goes to its run record)."""
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs={
            "validate": validated["outputs"],
            "catalog": paths.catalog,
            "catalog_sha256": validated["inputs"].get("catalog_sha256"),
        },
        outputs=describe_files(out, outputs),
        counts={key: value for key, value in counts.items() if key not in ENCODED},
        extra={"encoders": encoders, **extra},
        run={
            "summary": summary,
            "device": device,
            "reads": reads,
            **{key: counts[key] for key in ENCODED},
        },
    )


def _store_record(encoder: _Lazy, store: FeatureStore, store_root: Path) -> dict:
    """What the manifest says of an encoder: the consumers open its store from this
    (relative to the featurize folder)."""
    relative = store.dir.relative_to(store_root.parent)
    return {"id": encoder.id, "dim": encoder.dim, "store": str(relative)}


def shard_dir(paths: StepPaths, shard: Shard) -> Path:
    return paths.step_dir(STEP.name) / SHARDS / shard.name


def gather(config: FeaturizeConfig, paths: StepPaths, count: int) -> FeaturizeResult:
    """Write the featurize outputs from the files of its `count` shards: views and skipped
    views chunk by chunk in the clean listings' order (within a chunk text views before
    image views, as `_Featurizer.listings` writes them), the queries of shard 0.

    Raises:
        FileNotFoundError: a shard has not run.
        ValueError: a shard ran with other params or on other validated data.
        AlteredFile: a shard's file is not the one it wrote.
    """
    timer = Timer()
    validated = read_manifest(paths.step_dir("validate"))
    out = paths.step_dir(STEP.name)
    shards = every_shard(count)
    manifests = [_finished_shard(config, paths, shard, validated) for shard in shards]
    views = [RowReader(shard_dir(paths, shard) / VIEWS.name) for shard in shards]
    skipped = [RowReader(shard_dir(paths, shard) / SKIPPED_VIEWS.name) for shard in shards]
    chunk_rows = [
        pq.read_table(shard_dir(paths, shard) / CHUNK_ROWS).to_pylist() for shard in shards
    ]
    clean = pq.ParquetFile(paths.path(CLEAN))
    with (
        writing(out / VIEWS.name) as views_path,
        writing(out / SKIPPED_VIEWS.name) as skipped_path,
        pq.ParquetWriter(views_path, VIEWS_SCHEMA) as views_out,
        pq.ParquetWriter(skipped_path, SKIPPED_SCHEMA) as skipped_out,
    ):
        batches = clean.iter_batches(config.listings_per_chunk, columns=["listing_id"])
        for chunk, batch in enumerate(batches):
            order = {lid: i for i, lid in enumerate(batch.column(0).to_pylist())}
            parts = [
                reader.take(rows[chunk]["views"])
                for reader, rows in zip(views, chunk_rows, strict=True)
            ]
            views_out.write_table(_in_order(parts, order, VIEWS_SCHEMA, by_modality=True))
            parts = [
                reader.take(rows[chunk]["skipped"])
                for reader, rows in zip(skipped, chunk_rows, strict=True)
            ]
            skipped_out.write_table(_in_order(parts, order, SKIPPED_SCHEMA))
    with writing(out / QUERY_FEATURES.name) as tmp:
        tmp.write_bytes((shard_dir(paths, shards[0]) / QUERY_FEATURES.name).read_bytes())
    counts = Counts()
    runs = [require_run(shard_dir(paths, shard)) for shard in shards]
    for manifest, record in zip(manifests, runs, strict=True):
        for key in ENCODED:
            setattr(counts, key, getattr(counts, key) + record[key])
        for key, value in manifest["counts"].items():
            if key == "reasons":
                for reason, n in value.items():
                    counts.reasons[reason] = counts.reasons.get(reason, 0) + n
            elif key != "queries":
                setattr(counts, key, getattr(counts, key) + value)
    queries = manifests[0]["counts"]["queries"]
    summary = _summary(counts, queries, runs[0]["device"]) + f" (gathered from {count} shards)"
    found = {}
    for shard in shards:  # each shard's image keys, for the next run to trust
        if (shard_dir(paths, shard) / IMAGE_KEYS.name).is_file():
            found |= read_records(shard_dir(paths, shard) / IMAGE_KEYS.name, KEYS)
    write_records(paths.path(IMAGE_KEYS), found, KEYS)
    _record(
        out,
        config,
        paths,
        validated,
        timer,
        outputs=OUTPUTS,
        counts={**counts.__dict__, "queries": queries, "shards": count},
        reads={k: sum(r.get("reads", {}).get(k, 0) for r in runs) for k in READS},
        summary=summary,
        device=runs[0]["device"],
        encoders=manifests[0]["encoders"],
    )
    log.info("%s", summary)
    return FeaturizeResult(out_dir=out, counts=counts.__dict__, summary=summary)


def _finished_shard(config, paths: StepPaths, shard: Shard, validated: dict) -> dict:
    """The manifest of a shard that ran with these params on this validated data, its
    files checked against it."""
    where = shard_dir(paths, shard)
    if not (where / "manifest.json").is_file():
        raise FileNotFoundError(
            f"featurize shard {shard} has not finished ({where} has no manifest.json): run "
            f"python -m components featurize --shard {shard} first"
        )
    manifest = read_manifest(where)
    if (
        manifest["params"] != config.model_dump()
        or manifest["inputs"]["validate"] != validated["outputs"]
    ):
        raise ValueError(
            f"featurize shard {shard} ran with other featurize params or on other validated "
            f"data than this gather; run it again (python -m components featurize --shard {shard})"
        )
    return verify_outputs(where, manifest["outputs"], manifest)


def _in_order(
    parts: list[pa.Table], order: dict[str, int], schema: pa.Schema, by_modality: bool = False
) -> pa.Table:
    """The shards' rows of one chunk in the unsharded order: by clean position (text
    views first when `by_modality`), each listing's rows in the order its shard wrote them."""
    table = pa.concat_tables(parts).cast(schema)
    position = np.array([order[lid] for lid in table.column("listing_id").to_pylist()])
    if by_modality:
        image = np.array([m == "image" for m in table.column("modality").to_pylist()])
        position = position + image * len(order)
    return table.take(pa.array(np.argsort(position, kind="stable"), pa.int64()))


class _Lazy:
    """An encoder whose `id`, `dim` (and `query_prefix`) are known up front and whose
    model loads on the first encode call."""

    def __init__(self, factory, *args) -> None:
        self._factory = factory
        self._args = args
        self._encoder = None
        self.id = factory.cache_id(*args)
        self.dim = factory.dim
        self.query_prefix = getattr(factory, "query_prefix", "")

    def _loaded(self):
        if self._encoder is None:
            self._encoder = self._factory(*self._args)
        return self._encoder

    def encode(self, items: list) -> np.ndarray:
        return self._loaded().encode(items)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._loaded().encode_queries(texts)


class _Featurizer:
    """Holds the encoders and stores for one run; streams listings chunk by chunk."""

    def __init__(
        self,
        config,
        root,
        image_encoder,
        text_encoder,
        image_store,
        text_store,
        counts: Counts,
        records: ImageRecords,
    ) -> None:
        self.config = config
        self.root = root
        self.records = records  # each image's content key under its identity
        self.identities = Identities(root)
        self.reads = ReadCounter()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_store = image_store
        self.text_store = text_store
        self.counts = counts
        self.progress = None  # a progress bar counting images while listings() runs
        self.decode_budget = DecodeBudget(config.decode_memory_mb << 20)

    def listings(
        self,
        clean_path: Path,
        out: Path,
        shard: Shard | None = None,
        states: pa.Table | None = None,
        previous: PreviousViews | None = None,
    ) -> IndexWriter:
        """Every clean listing's views (a shard's listings only); a shard also writes how
        many views and skipped rows each chunk of clean listings gave it. A listing whose
        state (`states`, validate's, in clean order) is the one `previous` recorded takes
        its rows from there. Returns where each listing's rows were written."""
        parquet = pq.ParquetFile(clean_path)
        columns = ["listing_id", "image_uris", *self.config.text_views]
        matched = np.full(parquet.metadata.num_rows, -1, np.int64)
        if states is not None and previous is not None:
            matched = previous.match(states.column("listing_id"), states.column("state"))
        total_images, fresh_refs, owned_refs = self._focus(parquet, shard, matched)
        chunk_rows = []
        index = IndexWriter()
        # images dominate the cost: the bar counts them, so its rate is images/s
        self.progress = progress(
            total=total_images, desc="featurize: images", unit="img", mininterval=2
        )
        with (
            writing(out / VIEWS.name) as views_path,
            writing(out / SKIPPED_VIEWS.name) as skipped_path,
            pq.ParquetWriter(views_path, VIEWS_SCHEMA) as views,
            pq.ParquetWriter(skipped_path, SKIPPED_SCHEMA) as skipped,
            ThreadPoolExecutor(self.config.workers) as pool,
        ):
            start = 0
            batches = parquet.iter_batches(self.config.listings_per_chunk, columns=columns)
            try:
                for batch in batches:
                    owned = _owned_mask(batch, shard)
                    batch, rows = batch.filter(owned), np.flatnonzero(owned) + start
                    start += len(owned)
                    found = self._chunk(batch, matched[rows], previous, pool)
                    table, *counts, bad = found
                    views.write_table(table)
                    skipped.write_table(pa.Table.from_pylist(bad, schema=SKIPPED_SCHEMA))
                    chunk_rows.append({"views": table.num_rows, "skipped": len(bad)})
                    if states is not None:
                        state = states.column("state")
                        if len(rows) and rows[-1] - rows[0] == len(rows) - 1:  # a run: a slice
                            state = state.slice(int(rows[0]), len(rows))
                        else:
                            state = state.take(pa.array(rows))
                        index.add(batch.column(0), _without_skipped(state, batch, bad), *counts)
                    self._flush(FLUSH_SECONDS)
            except BaseException:  # what was encoded is kept, however the run stops
                self._flush()
                raise
        self.progress.close()
        self.records.keep_others(fresh_refs, owned_refs)
        if shard is not None:
            schema = pa.schema([("views", pa.int64()), ("skipped", pa.int64())])
            with writing(out / CHUNK_ROWS) as tmp:
                pq.write_table(pa.Table.from_pylist(chunk_rows, schema=schema), tmp)
        return index

    def _flush(self, seconds: float = 0.0) -> None:
        """Write what the stores buffered `seconds` ago or earlier (0: all of it)."""
        self.image_store.flush_stale(seconds)
        self.text_store.flush_stale(seconds)

    def _focus(
        self, parquet: pq.ParquetFile, shard: Shard | None, matched: np.ndarray
    ) -> tuple[int, list[str], pa.Array]:
        """Load the image records of the listings to work on (`matched` -1, of `shard`);
        returns how many images the listings of `shard` have, the references of those
        worked on and of them all."""
        total, start, refs, owned_refs = 0, 0, [], []
        for batch in parquet.iter_batches(columns=["listing_id", "image_uris"]):
            owned = _owned_mask(batch, shard)
            uris = batch.column(1)
            owned_refs.append(pc.list_flatten(uris.filter(owned)))
            total += len(owned_refs[-1])
            fresh = owned & (matched[start : start + len(owned)] < 0)
            start += len(owned)
            refs += pc.list_flatten(uris.filter(fresh)).to_pylist()
        self.records.focus(refs)
        return total, refs, pa.chunked_array(owned_refs, pa.string()).combine_chunks()

    def _chunk(self, batch: pa.RecordBatch, matched: np.ndarray, previous, pool):
        """One chunk's views in the order they are written (text rows, then image rows,
        each in the listings' order), each listing's number of text and image rows and
        the views skipped."""
        fresh, reused = np.flatnonzero(matched < 0), np.flatnonzero(matched >= 0)
        rows = batch.take(pa.array(fresh, pa.int64())).to_pylist() if len(fresh) else []
        text_rows = self._text_views(rows)
        image_rows, bad = self._image_views(rows, pool)
        ids = batch.column(0)
        parts = {}
        for modality, made in (("text", text_rows), ("image", image_rows)):
            made = pa.Table.from_pylist(made, schema=VIEWS_SCHEMA)
            parts[modality] = (
                made,
                pc.index_in(made.column("listing_id"), value_set=ids).to_numpy(),
            )
        if len(reused):
            text, text_n, image, image_n = previous.rows(matched[reused])
            for modality, taken, counts in (("text", text, text_n), ("image", image, image_n)):
                made, where = parts[modality]
                parts[modality] = (
                    pa.concat_tables([made, taken.cast(VIEWS_SCHEMA)]),
                    np.concatenate([where, np.repeat(reused, counts)]),
                )
            self.counts.listings_reused += len(reused)
            self.counts.text_views += text.num_rows
            self.counts.image_views += image.num_rows
            self.reads.trusted(image.num_rows)
            self.progress.update(image.num_rows)
        ordered, counts = [], []
        for modality in ("text", "image"):
            table, where = parts[modality]
            if len(where) and (np.diff(where) < 0).any():  # else in order already
                table = table.take(pa.array(np.argsort(where, kind="stable"), pa.int64()))
            ordered.append(table)
            counts.append(np.bincount(where.astype(np.int64), minlength=len(ids)))
        return pa.concat_tables(ordered), counts[0], counts[1], bad

    def queries(self, queries_path: Path, out: Path) -> int:
        if not queries_path.is_file():
            empty = {"query_id": pa.array([], pa.string()), "key": pa.array([], pa.string())}
            with writing(out / QUERY_FEATURES.name) as tmp:
                pq.write_table(pa.table(empty), tmp)
            return 0
        table = pq.read_table(queries_path)
        texts = table.column("query").to_pylist()
        keys = self._encode_texts(texts, queries=True)
        with writing(out / QUERY_FEATURES.name) as tmp:
            pq.write_table(table.append_column("key", pa.array(keys, pa.string())), tmp)
        return len(set(table.column("query_id").to_pylist()))

    def _text_views(self, rows: list[dict]) -> list[dict]:
        found = []
        for row in rows:
            for position, view in enumerate(self.config.text_views):
                text = view_text(row.get(view))
                if text:
                    found.append(
                        {
                            "listing_id": row["listing_id"],
                            "modality": "text",
                            "view": view,
                            "position": position,
                            "ref": text,
                        }
                    )
        keys = self._encode_texts([r["ref"] for r in found])
        for row, key in zip(found, keys, strict=True):
            row["key"] = key
        self.counts.text_views += len(found)
        return found

    def _encode_texts(self, texts: list[str], queries: bool = False) -> list[str]:
        """Content keys of `texts`, encoding those not in the store yet. A query of an
        asymmetric encoder is keyed with its instruction: it is a different vector."""
        prefix = self.text_encoder.query_prefix if queries else ""
        encode = self.text_encoder.encode_queries if queries else self.text_encoder.encode
        keys = [content_key(prefix + text) for text in texts]
        todo = dict(zip(keys, texts, strict=True))
        todo = {k: t for k, t in todo.items() if k not in self.text_store}
        for start in range(0, len(todo), self.config.text_batch_size):
            chunk = list(todo.items())[start : start + self.config.text_batch_size]
            vectors = self._timed(encode, [t for _, t in chunk])
            self.text_store.add([k for k, _ in chunk], vectors)
            self.counts.texts_encoded += len(chunk)
        return keys

    def _image_views(self, rows: list[dict], pool: ThreadPoolExecutor):
        jobs = [
            ImageJob(row["listing_id"], position, ref)
            for row in rows
            for position, ref in enumerate(row["image_uris"])
        ]
        good, bad = [], []
        for start in range(0, len(jobs), self.config.image_batch_size):
            chunk = jobs[start : start + self.config.image_batch_size]
            known = self._recorded([job.ref for job in chunk])
            todo = [job for job, key in zip(chunk, known, strict=True) if key is None]
            read = iter(pool.map(self._load, todo) if todo else ())
            loaded = [(key, None, None) if key else next(read) for key in known]
            pending: dict[str, Image.Image] = {}
            for job, (key, image, error) in zip(chunk, loaded, strict=True):
                if error is not None:
                    bad.append(
                        {
                            "listing_id": job.listing_id,
                            "ref": job.ref,
                            "reason": error.code,
                            "detail": error.detail,
                        }
                    )
                    log.warning(
                        "featurize: listing %s: skipped view %s (%s)",
                        job.listing_id,
                        job.ref,
                        error.code,
                    )
                    continue
                good.append(
                    {
                        "listing_id": job.listing_id,
                        "modality": "image",
                        "view": "image",
                        "position": job.position,
                        "ref": job.ref,
                        "key": key,
                    }
                )
                if image is not None and key not in self.image_store:
                    pending[key] = image
            if pending:
                vectors = self._timed(self.image_encoder.encode, list(pending.values()))
                self.image_store.add(list(pending), vectors)
                self.counts.images_encoded += len(pending)
            self.progress.update(len(chunk))
        self.counts.image_views += len(good)
        self.counts.skipped += len(bad)
        for item in bad:
            self.counts.reasons[item["reason"]] = self.counts.reasons.get(item["reason"], 0) + 1
        return good, bad

    def _recorded(self, refs: list[str]) -> list[str | None]:
        """The content key recorded for each of `refs`, when its identity is the one
        recorded (found by reference alone, `Identities.of_refs`) and the store holds its
        features; None for one that must be loaded (`_load`)."""
        if not self.records.trusted:
            return [None] * len(refs)
        identities = self.identities.of_refs(refs, self._resolve)
        keys = [
            key if key is not None and key in self.image_store else None
            for key in self.records.lookup(refs, identities)
        ]
        kept = [i for i, key in enumerate(keys) if key is not None]
        self.records.keep(
            [refs[i] for i in kept], [identities[i] for i in kept], [keys[i] for i in kept]
        )
        self.reads.trusted(len(kept))
        return keys

    def _resolve(self, ref: str):
        # validation already enforced the scheme, bucket and size rules on the clean set
        return self.root.resolve_image(ref, list(TRUSTED_SCHEMES), None)

    def _load(self, job: ImageJob) -> tuple[str | None, Image.Image | None, ImageRefError | None]:
        """Read and hash one image; decode it only if its features are not cached yet. An
        image whose identity is the one it had when last hashed, and whose features the
        store holds, is not read at all."""
        try:
            location = self._resolve(job.ref)
            identity = self.identities.of(location)
            key = self.records.get(location, identity)
            if key is not None and key in self.image_store:
                self.records.put(location, identity, key)
                self.reads.trusted()
                return key, None, None
            data = read_image_bytes(location, TRUSTED_MAX_BYTES)
            self.reads.opened(len(data))
            key = content_key(data)
            self.records.put(location, identity, key)
            if key in self.image_store:
                return key, None, None
            image = decode_image(
                data, job.ref, budget=self.decode_budget, fit=self.config.image_size
            )
            return key, image, None
        except ImageRefError as err:
            return None, None, err
        except OSError as err:
            return None, None, ImageRefError("image_unreadable", f"{job.ref!r}: {err}")

    def _timed(self, encode, items: list) -> np.ndarray:
        start = time.perf_counter()
        vectors = encode(items)
        self.counts.encode_seconds += time.perf_counter() - start
        return vectors


def _without_skipped(state: pa.ChunkedArray, batch: pa.RecordBatch, bad: list[dict]):
    """`state` with no state for the listings of `bad`: they are worked on again next time."""
    if not bad:
        return state.combine_chunks()
    lost = pa.array(sorted({row["listing_id"] for row in bad}), pa.string())
    return pc.if_else(
        pc.is_in(batch.column(0), value_set=lost), pa.scalar(None, state.type), state
    ).combine_chunks()


def _owned_mask(batch: pa.RecordBatch, shard: Shard | None) -> np.ndarray:
    """Which rows of `batch` (first column: listing_id) are `shard`'s (all when None)."""
    if shard is None:
        return np.ones(batch.num_rows, bool)
    return np.array([shard.owns(i) for i in batch.column(0).to_pylist()], bool)


def _summary(counts: Counts, queries: int, device, shard: Shard | None = None) -> str:
    encoded = counts.images_encoded + counts.texts_encoded
    rate = encoded / counts.encode_seconds if counts.encode_seconds else 0.0
    skipped = f"{counts.skipped} views skipped"
    if counts.reasons:
        skipped += " (" + ", ".join(f"{r}: {n}" for r, n in counts.reasons.items()) + ")"
    where = "" if shard is None else f" shard {shard}"
    return (
        f"featurize{where}: {counts.image_views} image views ({counts.images_encoded} encoded, "
        f"the rest cached or repeated), {counts.text_views} text views and {queries} queries "
        f"({counts.texts_encoded} texts encoded), {skipped}; {rate:.0f} items/s encoding on "
        f"{device}"
    )
