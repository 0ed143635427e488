"""`embed` step: one fused, L2-normalised float32 embedding per clean listing.

Reads the featurize step's views and feature store one chunk of listings at a time (the
chunks featurize wrote, so memory stays bounded at any catalog size) and writes under
`<workdir>/embed/`:

    embeddings/part-NNNNNN.npy   float32 [n, dim] per chunk, unit rows (a refresh: below)
    listing_ids.parquet          listing_id and fingerprint of each live row, in order
    splits.parquet               the splits the model was trained with (evaluate's test set)
    missing.parquet              clean listings with no usable view (never silently lost)
    manifest.json                model reference, inputs, counts, timings

Every view of a listing is fused with the model's marginals, except the image views the
train step held out for evaluation (`splits.parquet`): those serve only as queries. A
listing's fingerprint hashes exactly those views' contents and types. Running again with
the same model, features and splits recomputes nothing.

A refresh (`embed.reuse_current`) embeds with the current release's model, with that
release's splits (no train step needed), and takes its vector for every listing with the
same fingerprint (the same model and the same
content give the same vector), embedding only the new and changed listings; the manifest
counts listings added, changed, removed and reused. Its embeddings are the release's parts
as they were, `embeddings/deleted.npy` (the rows of removed and changed listings) and the
new vectors in parts appended, or, past `embed.compact_above`, every live row written anew
(`compacted`; components/io/embedding_files.py). The fingerprints it compares come from its
previous run for a views row group featurize took whole (components/io/print_carry.py,
`prints_index.parquet`); every other group is read and fingerprinted.

A listing with a tombstone in the production store (`python -m components remove`) is left
out of every embed, retrain or refresh: it goes to `missing.parquet` with the reason
`removed` (counted as `tombstoned`). Its inputs name the tombstones read and, of those,
the ones settled: none of their listings is in the catalog any more (clean or
quarantined), which promote retires; the others hold for the next release too.

Sharded (`--shard I/N`, components/core/shards.py): shard I embeds the listings whose id
hashes to I, writing the same files under `shards/I-of-N/` (one part per chunk, possibly
empty, and the chunk of each id; in a refresh, only its new and changed listings, and the
release's rows it kept in `embeddings/kept.npy`); `--gather N` then writes the outputs
above from the N shards, each part's rows in the order one unsharded run gives them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.config import EmbedConfig, StepPaths
from components.contract import (
    CLEAN,
    EMBED_BASE,
    EMBED_SPLITS,
    EMBEDDED_IDS,
    EMBEDDINGS,
    MISSING,
    QUARANTINE,
    SPLITS,
    STEPS,
    VIEWS,
)
from components.core.encoders import pick_device
from components.core.shards import Shard, every_shard
from components.core.views import GroupedViews, fingerprints, group_views, subset
from components.io import atomic
from components.io.embedder import ListingEmbedder, held_out_refs
from components.io.embedding_files import ID_SCHEMA, KEPT, PART, AppendedParts, ChunkParts
from components.io.id_sets import IdSet
from components.io.manifest import (
    Timer,
    describe_files,
    read_manifest,
    require_run,
    run_summary,
    sha256_file,
    unchanged_manifest,
    verify_outputs,
    write_manifest,
)
from components.io.parquet_rows import RowReader
from components.io.print_carry import PrintCarry, Prints
from components.io.progress import progress
from components.io.view_prints import held_out_pairs, listing_fingerprints
from components.release import base_release, production, registry, tombstones
from components.release.base_release import (
    ADDED,
    CHANGED,
    REUSED,
    BaseRelease,
    ReusableVectors,
)

STEP = STEPS["embed"]
OUTPUTS = tuple(artifact.name for artifact in STEP.writes if artifact.tracked)
SHARDS = "shards"  # <embed>/shards/I-of-N/: one shard's files until they are gathered
REMOVED = "removed"  # missing.parquet's reason for a listing with a tombstone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    out_dir: Path
    counts: dict
    summary: str


def run(config: EmbedConfig, paths: StepPaths, shard: Shard | None = None) -> EmbedResult:
    """Embed every listing of `<workdir>/featurize` (those of `shard` only, if given) with
    the configured model."""
    timer = Timer()
    features_manifest = read_manifest(paths.step_dir("featurize"))
    out = paths.step_dir(STEP.name) if shard is None else shard_dir(paths, shard)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    base = None
    if config.reuse_current:
        base = base_release.current(
            paths, paths.path(EMBED_BASE), (EMBEDDED_IDS.name, EMBEDDINGS.name, EMBED_SPLITS.name)
        )
    loaded = registry.load_model(base.model_uri if base else config.model, paths, device)
    if base is not None and loaded.reference["sha256"] != base.model.get("sha256"):
        raise ValueError(
            f"{base.model_uri}: its weights are not the ones release {base.version} recorded"
        )
    splits = _splits(paths, base)
    inputs = {
        "featurize": features_manifest["outputs"],
        "model": registry.identity(loaded.reference),
        "splits_sha256": sha256_file(splits),
    }
    if base is not None:
        inputs["base"] = {"version": base.version, "kind": base.manifest.get("kind", "retrain")}
    removals = tombstones.read_all(production.open_store(paths))
    removed = tombstones.removed_ids(removals)
    if removals:  # and those whose listings the catalog dropped (promote retires them)
        inputs["tombstones"] = [tombstone.key for tombstone in removals]
        inputs["settled_tombstones"] = tombstones.settled(removals, _still_listed(paths, removed))
    if (done := _unchanged(out, config, inputs)) is not None:
        log.info("%s", done.summary)
        return done
    embedder = ListingEmbedder(loaded.model, loaded.spec, paths, device)
    embedder.features.open()  # before the progress bar: its rate is the embedding's
    held_out = held_out_refs(splits)
    atomic.copy_file(splits, out / EMBED_SPLITS.name)
    reusable = ReusableVectors(base) if base is not None else None
    counts, rate, carried = _write(embedder, out, held_out, config, shard, reusable, removed)
    missing = _write_missing(paths.path(CLEAN), out, embedder.left_out, shard)
    counts["missing"] = missing
    counts["tombstoned"] = _tombstoned(embedder.left_out)
    where = "" if shard is None else f" shard {shard}"
    delta = ""
    if reusable is not None:
        delta = (
            f" (refresh of {base.version}: {counts[REUSED]} reused, {counts[ADDED]} added, "
            f"{counts[CHANGED]} changed, {counts['removed']} removed; {carried} listings' "
            "fingerprints carried from the previous run)"
        )
    summary = (
        f"embed{where}: {counts['listings']} listings -> {loaded.model.dim}-d embeddings "
        f"with model {_describe(loaded.reference)} on {device}{delta}, "
        f"{counts['held_out_views']} held-out views left out, {_left_out_note(counts)}; "
        f"{rate:.0f} listings/s"
    )
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs=inputs,
        outputs=describe_files(out, OUTPUTS),
        counts=counts,
        extra={"model": inputs["model"]},
        run={
            "summary": summary,
            "model": loaded.reference,
            "device": str(device),
            "listings_per_s": rate,
            "prints_carried": carried,
        },
    )
    log.info("%s", summary)
    return EmbedResult(out_dir=out, counts=counts | {"listings_per_s": rate}, summary=summary)


def _splits(paths: StepPaths, base: BaseRelease | None) -> Path:
    """The splits the model was trained with: the train step's, or in a refresh those of
    the release it builds on (a release from before releases carried them: the train
    step's, when it has run here)."""
    if base is not None and (base.local / EMBED_SPLITS.name).is_file():
        return base.local / EMBED_SPLITS.name
    splits = paths.path(SPLITS)
    if not splits.is_file():
        raise FileNotFoundError(
            f"{splits} does not exist"
            + ("" if base is None else f" and release {base.version} holds no splits.parquet")
            + ": the held-out views and test queries come from the model's training; run "
            "train (python -m components train), or refresh from a newer release"
        )
    return splits


def shard_dir(paths: StepPaths, shard: Shard) -> Path:
    return paths.step_dir(STEP.name) / SHARDS / shard.name


def gather(config: EmbedConfig, paths: StepPaths, count: int) -> EmbedResult:
    """Write the embed outputs from the files of its `count` shards: part by part, each
    part's rows in the order of their listings' first views in the featurize chunk (the
    order one unsharded run writes).

    Raises:
        FileNotFoundError: a shard has not run.
        ValueError: the shards ran with other params, models or inputs.
        AlteredFile: a shard's file is not the one it wrote.
    """
    timer = Timer()
    out = paths.step_dir(STEP.name)
    shards = every_shard(count)
    manifests = [_finished_shard(paths, shard) for shard in shards]
    runs = [require_run(shard_dir(paths, shard)) for shard in shards]
    first = manifests[0]
    for shard, manifest in zip(shards, manifests, strict=True):
        if manifest["params"] != config.model_dump() or _identity(manifest) != _identity(first):
            raise ValueError(
                f"embed shard {shard} ran with other embed params, another model or other "
                f"inputs than shard {shards[0]}; run it again (python -m components embed "
                f"--shard {shard})"
            )
    views = pq.ParquetFile(paths.path(VIEWS))
    # each shard's ids say which part they belong to: rows per part, then read in step
    rows = [
        np.bincount(
            pq.read_table(shard_dir(paths, s) / EMBEDDED_IDS.name, columns=["part"])
            .column(0)
            .to_numpy(),
            minlength=views.num_row_groups,
        )
        for s in shards
    ]
    readers = [
        RowReader(shard_dir(paths, s) / EMBEDDED_IDS.name, ["listing_id", "fingerprint"])
        for s in shards
    ]
    base = first["inputs"].get("base")  # a refresh: the shards hold only what is new
    if base is not None:
        release = base_release.version(
            paths, base["version"], paths.path(EMBED_BASE), (EMBEDDED_IDS.name, EMBEDDINGS.name)
        )
    with ChunkParts(out, ID_SCHEMA) if base is None else _appended(out, release, config) as sink:
        for part in range(views.num_row_groups):
            listing_ids = views.read_row_group(part, columns=["listing_id"]).column(0)
            first_seen = {lid: i for i, lid in enumerate(dict.fromkeys(listing_ids.to_pylist()))}
            name = PART.format(part)
            vectors = [np.load(shard_dir(paths, s) / EMBEDDINGS.name / name) for s in shards]
            merged = pa.concat_tables(
                reader.take(int(counts[part])) for reader, counts in zip(readers, rows, strict=True)
            )
            merged_ids = merged.column("listing_id").to_pylist()
            order = np.argsort([first_seen[lid] for lid in merged_ids], kind="stable")
            sink.add(part, merged.take(pa.array(order)), np.concatenate(vectors)[order])
        for shard in shards if base is not None else ():
            kept = shard_dir(paths, shard) / EMBEDDINGS.name / KEPT
            if kept.is_file():
                sink.keep(np.load(kept))
    total = sum(manifest["counts"]["listings"] for manifest in manifests)
    atomic.copy_file(shard_dir(paths, shards[0]) / EMBED_SPLITS.name, out / EMBED_SPLITS.name)
    left_out = {}
    for shard in shards:
        for row in pq.read_table(shard_dir(paths, shard) / MISSING.name).to_pylist():
            left_out[row["listing_id"]] = row["reason"]
    missing = _write_missing(paths.path(CLEAN), out, left_out)
    counts = {
        "listings": total,
        "held_out_views": first["counts"]["held_out_views"],
        "missing": missing,
        "tombstoned": _tombstoned(left_out),
        "shards": count,
    }
    for delta in (REUSED, ADDED, CHANGED, "removed"):  # a refresh's, summed over shards
        if delta in first["counts"]:
            counts[delta] = sum(manifest["counts"][delta] for manifest in manifests)
    if base is not None:
        counts["compacted"] = sink.compacted
    rate = total / _wall_seconds(runs)
    summary = (
        f"embed: {total} listings gathered from {count} shards (model "
        f"{_describe(runs[0]['model'])}), {_left_out_note(counts)}"
    )
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs=first["inputs"],
        outputs=describe_files(out, OUTPUTS),
        counts=counts,
        extra={"model": first["model"]},
        run={
            "summary": summary,
            "model": runs[0]["model"],
            "device": runs[0]["device"],
            "listings_per_s": rate,
        },
    )
    log.info("%s", summary)
    return EmbedResult(out_dir=out, counts=counts | {"listings_per_s": rate}, summary=summary)


def _identity(manifest: dict) -> tuple:
    """What a shard embedded from: features, held-out views, model weights (not where the
    model was read from: each Kubeflow component reads it from a folder of its own)."""
    inputs = manifest["inputs"]
    return inputs["featurize"], inputs["splits_sha256"], inputs["model"]["sha256"]


def _finished_shard(paths: StepPaths, shard: Shard) -> dict:
    where = shard_dir(paths, shard)
    if not (where / "manifest.json").is_file():
        raise FileNotFoundError(
            f"embed shard {shard} has not finished ({where} has no manifest.json): run "
            f"python -m components embed --shard {shard} first"
        )
    return verify_outputs(where, OUTPUTS)


def _describe(reference: dict) -> str:
    if reference.get("version"):
        return f"{reference['name']} v{reference['version']}"
    return reference["sha256"][:12]


def _unchanged(out: Path, config: EmbedConfig, inputs: dict) -> EmbedResult | None:
    manifest = unchanged_manifest(out, config, inputs, OUTPUTS)
    if manifest is None:
        return None
    summary = run_summary(out) + " (unchanged: nothing recomputed)"
    return EmbedResult(out_dir=out, counts=manifest["counts"], summary=summary)


def _write(
    embedder: ListingEmbedder,
    out: Path,
    held_out: set[tuple[str, str]],
    config: EmbedConfig,
    shard: Shard | None = None,
    reusable: ReusableVectors | None = None,
    removed: frozenset[str] = frozenset(),
) -> tuple[dict, float]:
    """Embed chunk by chunk into the embeddings and their ids (a shard's: with the part of
    each). With `reusable` (a refresh), only the listings whose fingerprint it does not
    hold are embedded: appended to the release's parts (a shard: its part per chunk, and
    the release's rows it kept). Listings in `removed` are left out."""
    total, carried = 0, 0
    statuses = dict.fromkeys((REUSED, ADDED, CHANGED), 0)
    bar = progress(desc="embed: listings", unit="listing", mininterval=2)
    schema = ID_SCHEMA if shard is None else ID_SCHEMA.append(pa.field("part", pa.int64()))
    with _writer(out, schema, config, shard, reusable) as written:
        if reusable is None:
            for part, grouped in enumerate(embedder.chunks(held_out, shard)):
                chunk = _without(grouped, removed, embedder.left_out)
                ids = _ids(chunk.listing_ids, fingerprints(chunk), part, schema)
                written.add(part, ids, embedder.embed(chunk, config.batch_size))
                total += len(chunk.listing_ids)
                bar.update(len(chunk.listing_ids))
        else:
            pairs = held_out_pairs(held_out)
            carry = None
            if shard is None:
                carry = PrintCarry.open(out, embedder.views_path.parent, pairs)
            for part, group in enumerate(_refresh_groups(embedder, shard, carry, pairs)):
                carried += group.carried
                ids, found, stored, vectors = _refresh_chunk(
                    embedder, group, held_out, config.batch_size, reusable, removed
                )
                ids = _ids(*ids, part, schema)
                written.add(part, ids.filter(pa.array(stored < 0)), vectors)
                written.keep(stored[stored >= 0])
                for status in found:
                    statuses[status] += 1
                total += ids.num_rows
                bar.update(ids.num_rows)
            if carry is not None:
                carry.save(out)
    rate = bar.format_dict["n"] / max(bar.format_dict["elapsed"], 1e-9)
    bar.close()
    counts = {"listings": total, "held_out_views": len(held_out)}
    if reusable is not None:  # what the release held (of this shard) and now does not
        held = len(reusable) if shard is None else reusable.owned(shard.owns)
        statuses["removed"] = held - statuses[REUSED] - statuses[CHANGED]
        counts |= statuses
    if isinstance(written, AppendedParts):
        counts["compacted"] = written.compacted
    return counts, rate, carried


@dataclass
class _ViewGroup:
    """One row group of views.parquet in a refresh: its listings' fingerprints (as
    `listing_fingerprints` gives them) and its rows, read on first use when the
    fingerprints were carried (only a listing to embed needs them)."""

    prints: Prints
    rows: pa.Table | None
    read: Callable[[], pa.Table]
    carried: int = 0  # listings whose fingerprint was carried

    def table(self) -> pa.Table:
        if self.rows is None:
            self.rows = self.read()
        return self.rows


def _refresh_groups(embedder, shard: Shard | None, carry: PrintCarry | None, pairs):
    """Each row group of views.parquet with its listings' fingerprints: carried from the
    previous run where `carry` holds them for the whole group (components/io/print_carry.py),
    else computed in Arrow from the group's rows."""
    if carry is None:
        for table in embedder.tables(shard):
            yield _ViewGroup(listing_fingerprints(table, pairs), table, lambda t=table: t)
        return
    seen = IdSet()
    for group in range(embedder.row_groups()):
        table, prints = None, carry.group_prints(group)
        if prints is None:
            table = embedder.table(group)
            prints = listing_fingerprints(table, pairs)
            # a carried group's listings are featurize's index entries: each in one group
            seen.add(pc.unique(table.column("listing_id")))
        carry.note(prints)
        carried = 0 if table is not None else len(prints[0]) + len(prints[2])
        yield _ViewGroup(prints, table, partial(embedder.table, group), carried)
    embedder.one_group_each(seen)


def _refresh_chunk(embedder, group: _ViewGroup, held_out, batch_size: int, reusable, removed):
    """One row group of a refresh: its listings (fingerprinted) looked up in the release,
    only the new and changed ones grouped and embedded. Returns the listings and their
    fingerprints, each one's status and stored row in the release (-1: embedded now) and
    the new vectors."""
    listing_ids, prints, left_out = group.prints
    embedder.left_out.update(left_out)
    listing_ids, prints = _not_removed(listing_ids, prints, removed, embedder.left_out)
    statuses, stored = reusable.lookup(listing_ids, prints)
    fresh = [listing_ids[i] for i in np.flatnonzero(stored < 0)]
    vectors = np.zeros((0, reusable.embeddings.dim), np.float32)
    if fresh:
        vectors = embedder.embed(_grouped(group.table(), fresh, held_out), batch_size)
    return (listing_ids, prints), statuses, stored, vectors


def _ids(listing_ids: list[str], prints: list[str], part: int, schema: pa.Schema) -> pa.Table:
    """The id rows of one chunk (a shard's: with the part of each)."""
    ids = {"listing_id": listing_ids, "fingerprint": prints}
    if "part" in schema.names:
        ids["part"] = [part] * len(listing_ids)
    return pa.table(ids, schema=schema)


def _grouped(table: pa.Table, listing_ids: list[str], held_out) -> GroupedViews:
    """The views of `listing_ids` (rows of `table`), grouped, in that order."""
    wanted = pc.is_in(table.column("listing_id"), value_set=pa.array(listing_ids, pa.string()))
    chunk = group_views(table.filter(wanted).to_pylist(), held_out)
    if chunk.listing_ids != listing_ids:  # the Arrow fingerprints and the grouping disagree
        raise RuntimeError(
            f"embed: grouped {len(chunk.listing_ids)} of {len(listing_ids)} listings"
        )
    return chunk


def _not_removed(listing_ids: list[str], prints: list[str], removed, left_out: dict):
    """The listings and fingerprints but the removed ones, which go to `left_out`."""
    if not removed:
        return listing_ids, prints
    kept = [i for i, listing_id in enumerate(listing_ids) if listing_id not in removed]
    left_out.update({lid: REMOVED for lid in listing_ids if lid in removed})
    return [listing_ids[i] for i in kept], [prints[i] for i in kept]


def _writer(out: Path, schema, config: EmbedConfig, shard: Shard | None, reusable):
    """How the embeddings are written: a part per chunk (a retrain, any shard), or the
    release's parts with the refresh appended (components/io/embedding_files.py)."""
    if reusable is None or shard is not None:
        return ChunkParts(out, schema)
    return _appended(out, reusable.base, config)


def _appended(out: Path, base: BaseRelease, config: EmbedConfig) -> AppendedParts:
    return AppendedParts(
        out, base.local / EMBEDDINGS.name, base.local / EMBEDDED_IDS.name, config.compact_above
    )


def _without(chunk: GroupedViews, removed: frozenset[str], left_out: dict) -> GroupedViews:
    """The chunk but its removed listings, which are recorded in `left_out`."""
    gone = [i for i, listing_id in enumerate(chunk.listing_ids) if listing_id in removed]
    if not gone:
        return chunk
    left_out.update(dict.fromkeys((chunk.listing_ids[i] for i in gone), REMOVED))
    kept = subset(chunk, [i for i in range(len(chunk.listing_ids)) if i not in set(gone)])
    return kept


def _still_listed(paths: StepPaths, removed: frozenset[str]) -> set[str]:
    """The removed listings the catalog still lists, clean or quarantined (validate's
    outputs): their removals must hold. One Arrow lookup per batch of ids."""
    listed: set[str] = set()
    if not removed:
        return listed
    wanted = pa.array(sorted(removed), pa.string())
    for artifact in (CLEAN, QUARANTINE):
        table = pq.ParquetFile(paths.path(artifact))
        if "listing_id" not in table.schema_arrow.names:
            continue
        for batch in table.iter_batches(columns=["listing_id"]):
            ids = batch.column(0).cast(pa.string())
            listed.update(pc.filter(ids, pc.is_in(ids, value_set=wanted)).to_pylist())
    return listed


def _tombstoned(left_out: dict[str, str]) -> int:
    return sum(1 for reason in left_out.values() if reason == REMOVED)


def _left_out_note(counts: dict) -> str:
    """The clean listings left without an embedding, by why: no usable view, or a removal
    (both in missing.parquet, each with its reason)."""
    tombstoned = counts["tombstoned"]
    note = f"{counts['missing'] - tombstoned} listings without a usable view"
    return note + (f", {tombstoned} held out by a removal" if tombstoned else "")


def _wall_seconds(runs: list[dict]) -> float:
    """From the first shard's start to the last one's end (their run records): the wall
    the shards took, whether they ran side by side or one after another."""
    starts = [datetime.fromisoformat(r["started_at"]).timestamp() for r in runs]
    ends = [start + r["duration_s"] for start, r in zip(starts, runs, strict=True)]
    # starts are whole seconds: never less than the longest shard
    return max(max(ends) - min(starts), *(r["duration_s"] for r in runs), 1e-9)


def _write_missing(
    clean: Path, out: Path, left_out: dict[str, str], shard: Shard | None = None
) -> int:
    """Clean listings (of `shard`) that got no embedding, with the reason (featurize's
    skipped.parquet says which views were unusable and why). Streamed, with the embedded
    ids held as hashes (`IdSet`): bounded memory at any catalog size; should two ids share
    a hash, the counts disagree and the exact comparison is made instead."""
    embedded = IdSet()
    for batch in pq.ParquetFile(out / EMBEDDED_IDS.name).iter_batches(columns=["listing_id"]):
        embedded.add(batch.column(0))
    missing, owned = [], 0
    for batch in pq.ParquetFile(clean).iter_batches(columns=["listing_id"]):
        ids = batch.column(0)
        if shard is not None:
            ids = ids.filter(pa.array([shard.owns(i) for i in ids.to_pylist()], pa.bool_()))
        owned += len(ids)
        missing += ids.filter(pa.array(~embedded.contains(ids))).to_pylist()
    if owned - len(missing) != len(embedded):  # a hash collision hid a missing listing
        missing = _missing_exactly(clean, out, shard)
    rows = [{"listing_id": i, "reason": left_out.get(i, "no_usable_view")} for i in missing]
    schema = pa.schema([("listing_id", pa.string()), ("reason", pa.string())])
    atomic.write_table(pa.Table.from_pylist(rows, schema=schema), out / MISSING.name)
    return len(rows)


def _missing_exactly(clean: Path, out: Path, shard: Shard | None) -> list[str]:
    embedded = set(pq.read_table(out / EMBEDDED_IDS.name).column("listing_id").to_pylist())
    return [
        listing_id
        for listing_id in pq.read_table(clean, columns=["listing_id"]).column(0).to_pylist()
        if listing_id not in embedded and (shard is None or shard.owns(listing_id))
    ]
