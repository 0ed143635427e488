"""`validate` step: check every listing, quarantine bad rows with reasons, write the clean set.

Two layers of checks: the Great Expectations suite over the table (schema, types,
uniqueness, lengths; components/io/expectations.py) and per-row checks GE cannot do (every
image resolves inside the catalog, is allowed, exists, decodes fully, has a sane size).
Every input row ends up in exactly one of clean.parquet and quarantine.parquet.

Each image's verdict is recorded under its identity (size and mtime, S3: size and ETag) in
`image_checks.parquet`; with `verify_content` off (a refresh) an image whose identity did
not move keeps that verdict without being opened (components/io/image_identity.py). Each
clean listing's state, a hash of its row and its images' identities, goes to
`listing_state.parquet` (components/io/listing_state.py) with the rules it was judged by:
featurize reuses the views of a listing whose state did not change, and the next validate
(`verify_content` off) keeps the verdict of one whose state and rules did not, checking
only the other rows (a listing_id two rows hold is always checked, so the suite sees it).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.config import StepPaths, ValidateConfig
from components.contract import (
    CLEAN,
    CLEAN_QUERIES,
    HELD_OUT_MIN_PHOTOS,
    IMAGE_CHECKS,
    LISTING_STATE,
    LISTINGS,
    QUARANTINE,
    QUARANTINED_QUERIES,
    QUERIES,
    STEPS,
    VALIDATION_REPORT,
)
from components.errors import StepFailed
from components.io import atomic, expectations, listing_state
from components.io.catalog_reader import (
    CatalogRoot,
    read_image_bytes,
    read_listings,
    read_queries,
)
from components.io.image_identity import (
    Identities,
    ImageRecords,
    ReadCounter,
    fingerprint,
)
from components.io.images import DecodeBudget, ImageBounds, ImageRefError, verify_image
from components.io.listing_state import image_identities
from components.io.manifest import Timer, describe_files, sha256_file, write_manifest
from components.io.progress import progress

STEP = STEPS["validate"]
EXAMPLES_PER_REASON = 3

log = logging.getLogger(__name__)

# per row with a problem: (reason, detail) pairs (a dict: a million clean rows hold nothing)
Issues = defaultdict[int, list[tuple[str, str]]]


@dataclass(frozen=True)
class ValidateResult:
    out_dir: Path
    report: dict
    summary: str


def run(config: ValidateConfig, paths: StepPaths) -> ValidateResult:
    """Validate `<catalog>/listings.parquet` into `<workdir>/validate/`.

    Raises:
        CatalogError: listings.parquet is missing, not Parquet, or lacks a column.
        StepFailed: more than `max_bad_fraction` of the rows were quarantined (the
            outputs and report are written first).
    """
    timer = Timer()
    out = paths.step_dir(STEP.name)
    out.mkdir(parents=True, exist_ok=True)
    root = CatalogRoot(paths.catalog)
    listings = read_listings(root)
    log.info("validate: %d listings read from %s", listings.num_rows, root.uri)
    records = ImageRecords(
        out / IMAGE_CHECKS.name, image_rules(config), trusted=not config.verify_content
    )
    checker = ImageChecker(root, config, records)
    images = ImageLists.of(listings.column("image_uris"))
    identities = checker.identities.of_refs(images.refs, checker.resolve, images.texts)
    found_states = listing_state.states(
        listings, image_identities(listings.num_rows, images.rows, images.counts, identities)
    )
    rules = verdict_rules(config)
    unchanged = np.zeros(listings.num_rows, bool)
    if records.trusted:
        unchanged = _unchanged(listings, found_states, out / LISTING_STATE.name, rules)
    todo = np.flatnonzero(~unchanged)
    issues = table_issues(listings, config, todo)
    checked = images.of_rows(todo)
    image_issues(listings, checker, issues, checked, [identities[i] for i in checked.at])
    checker.reads.trusted(len(images.refs) - len(checked.refs))
    records.keep_others(checked.refs, images.refs)
    records.save()
    clean, quarantine = split_rows(listings, issues)
    atomic.write_table(clean, out / CLEAN.name)
    atomic.write_table(quarantine, out / QUARANTINE.name)
    _write_states(listings, found_states, issues, out, rules)
    queries_report = _write_queries(root, clean, out)
    report = build_report(listings, issues, config, queries_report)
    atomic.write_text(
        out / VALIDATION_REPORT.name, json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    )
    reads = checker.reads
    summary = format_summary(report, reads, int(unchanged.sum()))
    outputs = [CLEAN.name, QUARANTINE.name, VALIDATION_REPORT.name]
    if queries_report is not None:
        outputs += [CLEAN_QUERIES.name, QUARANTINED_QUERIES.name]
    write_manifest(
        out,
        step=STEP.name,
        params=config,
        timer=timer,
        inputs={
            "catalog": root.uri,
            "catalog_sha256": {name: root.sha256(name) for name in (LISTINGS.name, QUERIES.name)},
        },
        outputs=describe_files(out, outputs),
        counts={k: report[k] for k in ("total", "clean", "quarantined")},
        run={
            "summary": summary,
            "reads": reads.as_dict(),
            "listings_unchanged": int(unchanged.sum()),
        },
    )
    log.info("%s", summary.splitlines()[0])
    if not report["passed"]:
        raise StepFailed(failure_message(report, out / VALIDATION_REPORT.name))
    if (missing := too_little(report, clean, root, config)) is not None:
        raise StepFailed(missing)
    return ValidateResult(out_dir=out, report=report, summary=summary)


def _write_states(
    listings: pa.Table, found: pa.Array, issues: Issues, out: Path, rules: str
) -> None:
    """Each clean listing's state (components/io/listing_state.py): featurize reuses the
    views of a listing that did not change, the next validate its verdict."""
    clean = clean_mask(listings.num_rows, issues)
    ids = listings.column("listing_id").filter(clean).cast(pa.string()).combine_chunks()
    listing_state.write(
        out / LISTING_STATE.name, ids, found.filter(clean), sha256_file(out / CLEAN.name), rules
    )


def verdict_rules(config: ValidateConfig) -> str:
    """What a listing's verdict depends on besides its state: every rule of the suite and
    of the image checks, and their version (not how the run is done or judged whole)."""
    how = {"workers", "verify_content", "max_bad_fraction", "min_clean_listings"}
    rules = config.model_dump(mode="json", exclude=how | {"require_eval_queries"})
    return fingerprint(version=1, rules=rules, images=image_rules(config))


def _unchanged(listings: pa.Table, found: pa.Array, previous: Path, rules: str) -> np.ndarray:
    """The rows whose verdict stands without a check: the previous validate found them
    clean under these `rules` in the state they are in now (`found`), and no other row
    has their listing_id (a duplicate quarantines every row holding it)."""
    none = np.zeros(listings.num_rows, bool)
    states = listing_state.read_verdicts(previous, rules)
    ids = listings.column("listing_id")
    if states is None or not expectations.is_string(ids.type):
        return none
    ids = ids.combine_chunks().cast(pa.string())
    was = states.column("state").take(pc.index_in(ids, value_set=states.column("listing_id")))
    same = pc.fill_null(pc.equal(was, found), False)
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        same = pc.and_(same, pc.invert(pc.is_in(ids, value_set=repeated)))
    return same.to_numpy(zero_copy_only=False)


def too_little(report: dict, clean: pa.Table, root: CatalogRoot, config: ValidateConfig):
    """Why the clean set cannot make a model, in one line (None: it can): no listings,
    fewer clean ones than `min_clean_listings`, or nothing to select and judge a model
    with (no query of a clean listing and no clean listing with a photo to hold out)."""
    where = f"{root.uri}/listings.parquet"
    if report["total"] == 0:
        return f"{where} has no listings: nothing to train on"
    if report["clean"] < config.min_clean_listings:
        return (
            f"{report['clean']} clean listings of {report['total']} in {where} "
            f"({report['quarantined']} quarantined): training needs at least "
            f"validate.min_clean_listings={config.min_clean_listings}"
        )
    queries = (report["queries"] or {}).get("clean", 0)
    photos = pc.list_value_length(clean.column("image_uris"))
    held_out = pc.any(pc.greater_equal(photos, HELD_OUT_MIN_PHOTOS)).as_py()
    if config.require_eval_queries and queries == 0 and not held_out:
        return (
            f"no query of a clean listing ({root.uri}/queries.parquet is "
            f"{'absent' if report['queries'] is None else 'without one'}) and no clean listing "
            f"with {HELD_OUT_MIN_PHOTOS}+ photos to hold one out: train could not select a "
            "model and evaluate would have no test queries; add queries.parquet or photos"
        )
    return None


def table_issues(listings: pa.Table, config: ValidateConfig, rows=None) -> Issues:
    """Run the GE suite over `rows` of `listings` (all by default); return each row's
    (reason, detail) pairs. Every row holding a repeated listing_id must be among `rows`
    for the uniqueness expectation to see the repeat."""
    issues: Issues = defaultdict(list)
    rows = np.arange(listings.num_rows) if rows is None else np.asarray(rows, np.int64)
    if not len(rows):
        return issues
    if len(rows) != listings.num_rows:
        listings = listings.take(pa.array(rows, pa.int64()))
    frame = expectations.validation_frame(listings)
    failed = expectations.run_suite(frame, expectations.listings_suite(config))
    for reason, (column, at) in failed.items():
        for index in at:
            value = frame.at[index, column]
            shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
            issues[int(rows[index])].append((reason, f"{column}={shown!r}"))
    return issues


def image_issues(
    listings: pa.Table,
    checker: ImageChecker,
    issues: Issues,
    images: ImageLists,
    identities: list[str | None],
) -> None:
    """Judge every image of `images` (rows whose image_uris is a list of strings), whose
    `identities` are given: its header against the bounds, then a full decode within the
    shared decode budget (an image the checker's records vouch for: its recorded verdict)."""
    column = listings.column("image_uris")
    to_check = checker.recorded(images.rows, images.counts, images.refs, identities, issues)
    taken = column.take(pa.array(to_check, pa.int64())).to_pylist()
    uris = dict(zip(to_check, taken, strict=True))
    if checker.records is not None:
        checker.records.focus([ref for row in to_check for ref in uris[row]])
    with ThreadPoolExecutor(max_workers=checker.config.workers) as pool:
        checked = pool.map(lambda row: checker.listing(uris[row]), to_check)
        for row, found in progress(
            zip(to_check, checked, strict=True),
            total=len(to_check),
            desc="validate: images read",
            unit="listing",
            mininterval=2,
        ):
            issues[row].extend(found)


@dataclass(frozen=True)
class ImageLists:
    """The rows whose image_uris is a non-empty list of strings, their references one
    after another, how many each has, and (`at`) where each reference is in the lists it
    was taken from."""

    rows: list[int]
    refs: list[str]
    counts: list[int]
    at: np.ndarray
    texts: pa.Array | None = None  # refs as Arrow strings, when read in Arrow

    @classmethod
    def of(cls, column: pa.ChunkedArray) -> ImageLists:
        """A list<string> column is read in Arrow (a million rows in a fraction of a
        second); any other type value by value."""
        if pa.types.is_list(column.type) and pa.types.is_string(column.type.value_type):
            lists = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
            holes = pc.is_null(pc.list_flatten(lists)).to_numpy(zero_copy_only=False)
            holed = np.zeros(len(lists), bool)
            holed[pc.list_parent_indices(lists).to_numpy()[holes]] = True
            chosen = np.flatnonzero((lengths > 0) & ~holed)
            texts = pc.list_flatten(lists.take(chosen))
            refs = texts.to_pylist()
            at = np.arange(len(refs))
            return cls(chosen.tolist(), refs, lengths[chosen].tolist(), at, texts)
        uris = column.to_pylist()
        rows = [
            row
            for row, value in enumerate(uris)
            if expectations.type_name(value) == expectations.STRING_LIST and value
        ]
        refs = [ref for row in rows for ref in uris[row]]
        return cls(rows, refs, [len(uris[row]) for row in rows], np.arange(len(refs)))

    def of_rows(self, wanted: np.ndarray) -> ImageLists:
        """The lists of the table rows `wanted` (sorted), `at` counting in these lists."""
        rows, counts = np.asarray(self.rows, np.int64), np.asarray(self.counts, np.int64)
        keep = np.isin(rows, wanted, assume_unique=True)
        if keep.all():
            return self
        starts = np.cumsum(counts) - counts
        lengths = counts[keep]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        at = np.repeat(starts[keep], lengths) + within
        refs = [self.refs[i] for i in at]
        return ImageLists(rows[keep].tolist(), refs, lengths.tolist(), self.at[at])


def image_rules(config: ValidateConfig) -> str:
    """What an image's recorded verdict depends on: the image rules and their version."""
    return fingerprint(
        version=1,
        sides=(config.min_image_side, config.max_image_side),
        bytes=config.max_image_bytes,
        frames=config.max_image_frames,
    )


class ImageChecker:
    """The image rules of `validate`, shared by every worker thread (one decode budget).

    With `records`, an image whose identity (size and mtime, size and ETag) is the one it
    had when last checked takes that verdict without being opened
    (components/io/image_identity.py); `reads` counts what is opened."""

    def __init__(
        self,
        root: CatalogRoot,
        config: ValidateConfig,
        records: ImageRecords | None = None,
        reads: ReadCounter | None = None,
    ) -> None:
        self.root = root
        self.config = config
        self.bounds = ImageBounds(
            config.min_image_side, config.max_image_side, config.max_image_frames
        )
        self.budget = DecodeBudget(config.decode_memory_mb << 20)
        self.records = records
        self.identities = Identities(root)
        self.reads = reads or ReadCounter()

    def recorded(
        self,
        rows: list[int],
        counts: list[int],
        refs: list[str],
        identities: list[str | None],
        issues: Issues,
    ) -> list[int]:
        """Add to `issues` the recorded verdicts of each of `rows` (holding `counts`
        images, whose references and identities follow one another in `refs` and
        `identities`) whose every image kept its identity: no image opened, no path
        resolved. Returns the rows left, whose images `listing` must check."""
        if self.records is None or not self.records.trusted:
            return list(rows)
        verdicts = self.records.lookup_all(refs, identities)
        left, start, trusted = [], 0, 0
        for row, count in zip(rows, counts, strict=True):
            mine = verdicts[start : start + count]
            start += count
            if None in mine:
                left.append(row)
                continue
            trusted += count
            for index, verdict in enumerate(mine):
                if verdict:
                    code, detail = json.loads(verdict)
                    issues[row].append((code, f"image_uris[{index}]: {detail}"))
        self.reads.trusted(trusted)
        return left

    def resolve(self, ref: str):
        return self.root.resolve_image(
            ref, self.config.allowed_schemes, self.config.allowed_buckets
        )

    def listing(self, refs: list[str]) -> list[tuple]:
        """All problems with one listing's images, as (reason, detail) pairs naming the
        index."""
        found = []
        for index, ref in enumerate(refs):
            try:
                self.image(ref)
            except ImageRefError as err:
                found.append((err.code, f"image_uris[{index}]: {err.detail}"))
        return found

    def image(self, ref: str) -> None:
        """Raise ImageRefError if one image reference is not a usable image."""
        config = self.config
        location = self.resolve(ref)
        identity = self.identities.of(location) if self.records is not None else None
        if (known := self._recorded(location, identity)) is not None:
            self.reads.trusted()
            if known:
                raise ImageRefError(*json.loads(known))
            return
        try:
            data = read_image_bytes(location, config.max_image_bytes)
        except OSError as err:  # permissions, a directory, an I/O error: this row's problem
            raise ImageRefError("image_unreadable", f"{ref!r}: {err}") from None
        except ImageRefError as err:  # missing (no identity) or too large (by its size)
            self._record(location, identity, err)
            raise
        self.reads.opened(len(data))
        try:
            verify_image(data, ref, self.bounds, self.budget)
        except ImageRefError as err:
            self._record(location, identity, err)
            raise
        self._record(location, identity, None)

    def _recorded(self, location, identity: str | None) -> str | None:
        """The verdict recorded under this identity: "" (usable) or [code, detail]."""
        if self.records is None:
            return None
        known = self.records.get(location, identity)
        if known is not None:
            self.records.put(location, identity, known)  # still today's: keep it
        return known

    def _record(self, location, identity: str | None, error: ImageRefError | None) -> None:
        if self.records is not None:
            verdict = "" if error is None else json.dumps([error.code, error.detail])
            self.records.put(location, identity, verdict)


def bad_rows(issues: Issues) -> list[int]:
    """The rows with a problem, in order."""
    return sorted(row for row, found in issues.items() if found)


def clean_mask(rows: int, issues: Issues) -> pa.Array:
    """True for each of `rows` without a problem."""
    clean = np.ones(rows, bool)
    clean[bad_rows(issues)] = False
    return pa.array(clean)


def split_rows(listings: pa.Table, issues: Issues) -> tuple[pa.Table, pa.Table]:
    """Clean rows as they came in; quarantined rows plus row_number, reasons, reason_details."""
    bad = bad_rows(issues)
    clean = listings.filter(clean_mask(listings.num_rows, issues))
    quarantine = listings.take(pa.array(bad, type=pa.int64()))
    reasons = [sorted({reason for reason, _ in issues[row]}) for row in bad]
    details = [[detail for _, detail in issues[row]] for row in bad]
    for name, values, kind in (
        ("row_number", bad, pa.int64()),
        ("reasons", reasons, pa.list_(pa.string())),
        ("reason_details", details, pa.list_(pa.string())),
    ):
        column = name if name not in listings.column_names else f"quarantine_{name}"
        quarantine = quarantine.append_column(column, pa.array(values, type=kind))
    return clean, quarantine


def _write_queries(root: CatalogRoot, clean: pa.Table, out: Path) -> dict | None:
    """Keep query rows that point at a clean listing; quarantine the others with reasons."""
    queries = read_queries(root)
    if queries is None:
        return None
    clean_ids = set(clean.column("listing_id").to_pylist())
    reasons = [
        query_row_reasons(query_id, text, listing, clean_ids)
        for query_id, text, listing in zip(
            *(queries.column(c).to_pylist() for c in ("query_id", "query", "listing_id")),
            strict=True,
        )
    ]
    good = pa.array([not found for found in reasons], type=pa.bool_())
    bad_reasons = [found for found in reasons if found]
    atomic.write_table(queries.filter(good), out / CLEAN_QUERIES.name)
    quarantined = queries.filter(pc.invert(good)).append_column(
        "reasons", pa.array(bad_reasons, type=pa.list_(pa.string()))
    )
    atomic.write_table(quarantined, out / QUARANTINED_QUERIES.name)
    counts = Counter(reason for found in bad_reasons for reason in found)
    return {
        "total": queries.num_rows,
        "clean": queries.num_rows - len(bad_reasons),
        "quarantined": len(bad_reasons),
        "reasons": dict(counts.most_common()),
    }


def query_row_reasons(query_id: object, text: object, listing: object, clean_ids: set) -> list:
    """Why one queries.parquet row is unusable (empty list: it is fine)."""
    found = []
    if not isinstance(query_id, str) or not query_id.strip():
        found.append("query_id_empty")
    if not isinstance(text, str) or not text.strip():
        found.append("query_empty")
    if listing not in clean_ids:
        found.append("listing_not_clean")
    return found


def build_report(
    listings: pa.Table, issues: Issues, config: ValidateConfig, queries: dict | None
) -> dict:
    total = listings.num_rows
    bad = bad_rows(issues)
    quarantined = len(bad)
    bad_fraction = quarantined / total if total else 0.0
    counts = Counter(reason for row in bad for reason in {r for r, _ in issues[row]})
    ids = listings.column("listing_id").take(pa.array(bad, pa.int64())).to_pylist()
    examples: dict[str, list[dict]] = {}
    for row, listing_id in zip(bad, ids, strict=True):
        for reason, detail in issues[row]:
            bucket = examples.setdefault(reason, [])
            if len(bucket) < EXAMPLES_PER_REASON:
                bucket.append({"row": row, "listing_id": _printable(listing_id), "detail": detail})
    return {
        "total": total,
        "clean": total - quarantined,
        "quarantined": quarantined,
        "bad_fraction": round(bad_fraction, 6),
        "max_bad_fraction": config.max_bad_fraction,
        "passed": bad_fraction <= config.max_bad_fraction,
        "reasons": dict(counts.most_common()),
        "examples": examples,
        "queries": queries,
    }


def _printable(value: object) -> object:
    return value if isinstance(value, str | int | float) or value is None else repr(value)


def format_summary(report: dict, reads: ReadCounter | None = None, unchanged: int = 0) -> str:
    opened = ""
    if reads is not None:
        opened = (
            f"; {reads.images_opened} images opened ({reads.bytes_read / 2**20:.1f} MiB), "
            f"{reads.images_trusted} unchanged since checked; {unchanged} listings unchanged "
            "since found clean"
        )
    lines = [
        f"validate: {report['total']} listings: {report['clean']} clean, "
        f"{report['quarantined']} quarantined ({report['bad_fraction']:.2%} bad; "
        f"limit {report['max_bad_fraction']:.2%}){opened}"
    ]
    for reason, count in list(report["reasons"].items())[:10]:
        lines.append(f"  {reason:<32} {count}")
    if report["queries"] is not None:
        q = report["queries"]
        lines.append(
            f"  queries: {q['total']} rows: {q['clean']} kept, {q['quarantined']} "
            f"quarantined {q['reasons'] or ''}".rstrip()
        )
    return "\n".join(lines)


def failure_message(report: dict, report_path: Path) -> str:
    top = ", ".join(f"{r} ({n})" for r, n in list(report["reasons"].items())[:5])
    return (
        f"{report['quarantined']} of {report['total']} listings quarantined: bad fraction "
        f"{report['bad_fraction']:.2%} > validate.max_bad_fraction "
        f"{report['max_bad_fraction']:.2%}; top reasons: {top}; details in {report_path}"
    )
