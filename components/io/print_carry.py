"""A refresh's embed takes a listing's fingerprint from its previous run when featurize
took the listing's views whole: no view row read, nothing hashed, for a listing that did
not change.

A listing's fingerprint (`core.views.fingerprints`) is a function of its view rows less
the held-out ones, and featurize's views of a listing are a function of its state (a hash
of its row and its images' identities, components/io/listing_state.py) under featurize's
params and code. So embed records, per listing featurize indexed
(`featurize/views_index.parquet`), the state it was in and the fingerprint computed, or
why it was left out (`embed/prints_index.parquet`, a cache beside the outputs); the next
refresh takes every listing of a views row group from there when each is in the state
recorded, the row group holds no listing featurize did not index (its rows add up), and
featurize's fingerprint, the held-out views and this code are what they were. Otherwise
the group is read and fingerprinted (components/io/view_prints.py), as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.contract import PRINTS_INDEX, VIEWS, VIEWS_INDEX
from components.io import atomic
from components.io.listing_state import STATE
from components.io.view_reuse import views_stamp

VERSION = 1  # of the fingerprints recorded: another makes every record unusable
SCHEMA = pa.schema(
    [
        ("listing_id", pa.string()),
        ("state", STATE),
        ("fingerprint", pa.string()),  # null: left out, for `left_out`'s reason
        ("left_out", pa.string()),
    ]
)
_META = b"prints_index"

log = logging.getLogger(__name__)

Prints = tuple[list[str], list[str], dict[str, str]]  # as `listing_fingerprints` gives


def held_out_key(pairs: pa.Array) -> str:
    """A digest of the held-out views (`view_prints.held_out_pairs`)."""
    return hashlib.sha256("\n".join(pairs.to_pylist()).encode()).hexdigest()


@dataclass
class PrintCarry:
    """Today's views index, the fingerprints recorded by the previous run where they
    still hold, and what this run found, to record."""

    indexed: pa.Table  # today's views index: listing_id, state
    bounds: np.ndarray  # per row group, where its listings start in `recorded`
    carries: np.ndarray  # per row group: every listing in it is indexed and carried
    recorded: pa.Table | None  # indexed listings by group and first row: fingerprint...
    meta: dict
    found: list[Prints]

    @classmethod
    def open(cls, out: Path, featurize: Path, pairs: pa.Array) -> PrintCarry | None:
        """None when featurize's views index is not the one beside today's views (a
        sharded featurize writes none), so nothing can be carried or recorded."""
        views, index_path = featurize / VIEWS.name, featurize / VIEWS_INDEX.name
        if not views.is_file() or not index_path.is_file():
            return None
        index = pq.read_table(index_path)
        written = json.loads((index.schema.metadata or {}).get(b"views_index", b"{}"))
        if written.get("views") != views_stamp(views):
            return None
        meta = {
            "version": VERSION,
            "featurize": written.get("fingerprint"),
            "held_out": held_out_key(pairs),
        }
        parquet = pq.ParquetFile(views)
        sizes = np.array(
            [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)],
            np.int64,
        )
        starts = np.concatenate([[0], np.cumsum(sizes)])
        text_rows = index.column("text_rows").to_numpy()
        image_rows = index.column("image_rows").to_numpy()
        first = np.where(
            text_rows > 0, index.column("text_row").to_numpy(), index.column("image_row").to_numpy()
        )
        group = np.searchsorted(starts, first, side="right") - 1
        covered = np.bincount(group, weights=text_rows + image_rows, minlength=len(sizes))
        indexed = index.select(["listing_id", "state"])
        recorded = _recorded(out / PRINTS_INDEX.name, meta, indexed)
        carries = np.zeros(len(sizes), bool)
        bounds = np.zeros(len(sizes) + 1, np.int64)
        if recorded is not None:  # each group's listings in the order they first appear
            order = np.lexsort((first, group))
            recorded = recorded.take(pa.array(order, pa.int64()))
            bounds = np.searchsorted(group[order], np.arange(len(sizes) + 1))
            carried = recorded.column("carried").to_numpy(zero_copy_only=False)
            missed = np.bincount(group[order][~carried], minlength=len(sizes))
            carries = (covered == sizes) & (missed == 0)
        return cls(indexed, bounds, carries, recorded, meta, [])

    def group_prints(self, group: int) -> Prints | None:
        """The listings of views row group `group`, in the order they first appear, their
        fingerprints and the left-out ones with why, when every one of them is carried;
        else None (read the group)."""
        if not self.carries[group]:
            return None
        start, end = self.bounds[group], self.bounds[group + 1]
        taken = self.recorded.slice(start, end - start)
        ids = taken.column("listing_id").to_pylist()
        prints = taken.column("fingerprint").to_pylist()
        reasons = taken.column("left_out").to_pylist()
        kept = [(i, p) for i, p in zip(ids, prints, strict=True) if p is not None]
        left_out = {i: r for i, r in zip(ids, reasons, strict=True) if r is not None}
        return [i for i, _ in kept], [p for _, p in kept], left_out

    def note(self, found: Prints) -> None:
        """What this run found for one group (carried or computed), to `save`."""
        self.found.append(found)

    def save(self, out: Path) -> None:
        """The fingerprint (or why it was left out) of each indexed listing this run
        found, under the state featurize indexed it in."""
        ids, prints, reasons = [], [], []
        for kept, kept_prints, left_out in self.found:
            ids += kept + list(left_out)
            prints += kept_prints + [None] * len(left_out)
            reasons += [None] * len(kept) + list(left_out.values())
        found = pa.table(
            {
                "listing_id": pa.array(ids, pa.string()),
                "fingerprint": pa.array(prints, pa.string()),
                "left_out": pa.array(reasons, pa.string()),
            }
        )
        table = self.indexed.join(found, keys="listing_id", join_type="inner")
        table = table.select(SCHEMA.names).cast(SCHEMA)
        meta = {_META: json.dumps(self.meta).encode()}
        atomic.write_table(table.replace_schema_metadata(meta), out / PRINTS_INDEX.name)


def _recorded(path: Path, meta: dict, indexed: pa.Table) -> pa.Table | None:
    """Per listing of `indexed` (in its order): the recorded fingerprint and reason, and
    whether they carry (`carried`: recorded under `meta` in today's state)."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    if json.loads((table.schema.metadata or {}).get(_META, b"{}")) != meta:
        log.info("embed: fingerprints recorded for other views or held-out views: not used")
        return None
    at = pc.index_in(indexed.column("listing_id"), value_set=table.column("listing_id"))
    before = table.take(at)
    carried = pc.fill_null(pc.equal(before.column("state"), indexed.column("state")), False)
    return pa.table(
        {
            "listing_id": indexed.column("listing_id"),
            "fingerprint": before.column("fingerprint"),
            "left_out": before.column("left_out"),
            "carried": carried,
        }
    )
