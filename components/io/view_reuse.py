"""What featurize wrote for each listing, so that a listing that did not change is taken
whole from the previous run: no text hashed, no image looked at, no row built in Python.

`views_index.parquet` (beside `views.parquet`) holds, per listing featurized, the state it
was featurized in (validate's `listing_state.parquet`: a hash of its row and its images'
identities) and where its text and image rows are in `views.parquet`. A listing of today
whose state is the recorded one takes those rows, read one row group at a time (a run
writes one per chunk, so a catalog in a stable order reads the previous file once, front
to back). The index is used only with the `views.parquet` it was written beside (its size
and mtime recorded), the same featurize params and code (`fingerprint`), and every feature
store file it relied on still there. A listing with a skipped view is never indexed: it is
worked on again.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.contract import VIEWS, VIEWS_INDEX
from components.io import atomic
from components.io.listing_state import STATE

INDEX = VIEWS_INDEX.name
SCHEMA = pa.schema(
    [
        ("listing_id", pa.string()),
        ("state", STATE),
        ("text_row", pa.int64()),  # first text row in views.parquet
        ("text_rows", pa.int64()),
        ("image_row", pa.int64()),  # first image row
        ("image_rows", pa.int64()),
    ]
)
_META = b"views_index"
_CACHED_GROUPS = 4
_MAX_SLICES = 16  # runs of rows past which one take is cheaper than slicing

log = logging.getLogger(__name__)


def views_stamp(views: Path) -> dict:
    status = views.stat()
    return {"bytes": status.st_size, "mtime_ns": status.st_mtime_ns}


class PreviousViews:
    """The previous run's views of the listings it indexed."""

    def __init__(self, index: pa.Table, views: Path) -> None:
        self.index = index
        self._columns = {
            name: index.column(name).to_numpy()
            for name in ("text_row", "text_rows", "image_row", "image_rows")
        }
        self._file = pq.ParquetFile(views)
        sizes = [
            self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)
        ]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._groups: OrderedDict[int, pa.Table] = OrderedDict()

    @classmethod
    def open(cls, out: Path, fingerprint: str, store_files: set[str]) -> PreviousViews | None:
        """The previous views of `out`, or None when they cannot be trusted (said why)."""
        index_path, views = out / INDEX, out / VIEWS.name
        if not index_path.is_file() or not views.is_file():
            return None
        index = pq.read_table(index_path)
        recorded = json.loads((index.schema.metadata or {}).get(_META, b"{}"))
        why = None
        if recorded.get("fingerprint") != fingerprint:
            why = "featurize params or code changed"
        elif recorded.get("views") != views_stamp(views):
            why = "views.parquet is not the one the index was written with"
        elif not set(recorded.get("store_files", [])) <= store_files:
            why = "feature store files it used are gone"
        if why is not None:
            log.info("featurize: previous views not reused (%s): every listing is featurized", why)
            return None
        return cls(index.cast(SCHEMA), views)

    def match(self, listing_ids: pa.Array, states: pa.Array) -> np.ndarray:
        """Per listing, its row in the index when its state is the recorded one, else -1."""
        current = pa.table(
            {
                "listing_id": listing_ids,
                "state": states,
                "at": pa.array(np.arange(len(listing_ids), dtype=np.int64)),
            }
        )
        indexed = self.index.select(["listing_id", "state"]).append_column(
            "row", pa.array(np.arange(self.index.num_rows, dtype=np.int64))
        )
        joined = current.join(indexed, keys=["listing_id", "state"], join_type="inner")
        found = np.full(len(listing_ids), -1, np.int64)
        found[joined.column("at").to_numpy()] = joined.column("row").to_numpy()
        return found

    def rows(self, entries: np.ndarray) -> tuple[pa.Table, np.ndarray, pa.Table, np.ndarray]:
        """The text rows and image rows of the index `entries`, each listing's in order,
        with the number of rows of each listing."""
        text_start = self._columns["text_row"][entries]
        text_count = self._columns["text_rows"][entries]
        image_start = self._columns["image_row"][entries]
        image_count = self._columns["image_rows"][entries]
        return (
            self._take(_ranges(text_start, text_count)),
            text_count,
            self._take(_ranges(image_start, image_count)),
            image_count,
        )

    def _take(self, rows: np.ndarray) -> pa.Table:
        if not len(rows):
            return self._file.schema_arrow.empty_table()
        groups = np.searchsorted(self._starts, rows, side="right") - 1
        needed = np.unique(groups)
        tables = [self._group(int(g)) for g in needed]
        base = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])])[:-1]
        where = base[np.searchsorted(needed, groups)] + rows - self._starts[groups]
        whole = pa.concat_tables(tables)
        # listings kept in their order are runs of rows: slices, no copy (a stable catalog
        # is mostly that), else one take
        breaks = np.flatnonzero(np.diff(where) != 1) + 1
        if len(breaks) >= _MAX_SLICES:
            return whole.take(pa.array(where))
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(where)]])
        return pa.concat_tables(
            [whole.slice(int(where[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]
        )

    def _group(self, group: int) -> pa.Table:
        if group in self._groups:
            self._groups.move_to_end(group)
        else:
            self._groups[group] = self._file.read_row_group(group)
            if len(self._groups) > _CACHED_GROUPS:
                self._groups.popitem(last=False)
        return self._groups[group]


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """start, start + 1, ..., start + count - 1 for each (start, count), concatenated."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    offsets = np.repeat(ends - counts, counts)
    return np.repeat(starts, counts) + np.arange(total, dtype=np.int64) - offsets


class IndexWriter:
    """Collects, chunk by chunk, where each listing's rows land in the views written now."""

    def __init__(self) -> None:
        self._parts: list[pa.Table] = []
        self._rows = 0

    def add(
        self,
        listing_ids: pa.Array,
        states: pa.Array,
        text_counts: np.ndarray,
        image_counts: np.ndarray,
    ) -> None:
        """One chunk, written next: its listings' text rows first, then their image rows,
        each listing's contiguous and in this order (null states: not indexed)."""
        text_total = int(text_counts.sum())
        text_row = self._rows + np.concatenate([[0], np.cumsum(text_counts)])[:-1]
        image_row = self._rows + text_total + np.concatenate([[0], np.cumsum(image_counts)])[:-1]
        self._rows += text_total + int(image_counts.sum())
        part = pa.table(
            {
                "listing_id": listing_ids,
                "state": states,
                "text_row": pa.array(text_row.astype(np.int64)),
                "text_rows": pa.array(text_counts.astype(np.int64)),
                "image_row": pa.array(image_row.astype(np.int64)),
                "image_rows": pa.array(image_counts.astype(np.int64)),
            },
            schema=SCHEMA,
        )
        self._parts.append(part.filter(pc.is_valid(part.column("state"))))

    def write(self, out: Path, fingerprint: str, store_files: set[str]) -> None:
        """Beside the `views.parquet` just written in `out`."""
        table = pa.concat_tables(self._parts) if self._parts else SCHEMA.empty_table()
        meta = {
            "fingerprint": fingerprint,
            "views": views_stamp(out / VIEWS.name),
            "store_files": sorted(store_files),
        }
        atomic.write_table(table.replace_schema_metadata({_META: json.dumps(meta)}), out / INDEX)
