"""A listing's state: one hash of its whole row (every column the catalog gives) and of
the identities of its images, in order (components/io/image_identity.py).

Validate writes the state of each clean listing (`listing_state.parquet`, in the clean
rows' order, with the rules it judged by); featurize takes a listing's views whole from its
previous output when the listing's state is the one it featurized then, and the next
validate (unless it verifies content) keeps the verdict of a listing whose state and rules
did not change, so a refresh does no per-row or per-image work for a listing that did not
change. A listing with an image whose identity is unknown (a link,
a URI resolved another way) has no state and is always worked on in full.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.io import atomic

STATE = pa.binary(16)
SCHEMA = pa.schema([("listing_id", pa.string()), ("state", STATE)])
CLEAN_SHA256 = b"clean.sha256"  # parquet metadata: the clean rows the states are of
RULES = b"verdict.rules"  # parquet metadata: the rules the listings were found clean by
_COLUMNS = "\x1e"  # between a row's columns
_ITEMS = "\x1f"  # between a list's items
_NULL = "\x00"


def image_identities(
    rows: int, checked: list[int], counts: list[int], identities: list[str | None]
) -> pa.ListArray:
    """Per row of a table of `rows`, the identities of its images: `checked` rows had
    `counts` images each, whose identities follow one another in `identities`; every
    other row has none known (null)."""
    lengths = np.zeros(rows, np.int64)
    lengths[checked] = counts
    known = np.zeros(rows, bool)
    known[checked] = True
    return pa.LargeListArray.from_arrays(
        pa.array(_offsets(lengths)), pa.array(identities, pa.string()), mask=pa.array(~known)
    )


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def states(table: pa.Table, identities: pa.Array) -> pa.Array:
    """The state of each row of `table` (null where an identity is missing): a 128-bit
    hash of every column's value and of `identities` (`image_identities`)."""
    parts = [_as_text(table.column(name)) for name in table.column_names]
    known = pc.binary_join(identities, _ITEMS)  # null: a row with an unknown identity
    joined = pc.binary_join_element_wise(*parts, known, _COLUMNS, null_handling="emit_null")
    key = hashlib.sha256(json.dumps(table.column_names).encode()).digest()
    # as bytes: the same digests without a Python str decoded and encoded again per row
    return pa.array(
        [
            None if raw is None else hashlib.blake2b(raw, digest_size=16, key=key).digest()
            for raw in joined.cast(pa.large_binary()).to_pylist()
        ],
        STATE,
    )


def _as_text(column: pa.ChunkedArray) -> pa.Array:
    """One string per value, distinct for distinct values (null and lists included)."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pc.fill_null(values.cast(pa.string()), _NULL)
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    ):
        items = pc.fill_null(pc.list_flatten(values).cast(pa.string()), _NULL)
        lengths = pc.fill_null(pc.list_value_length(values), 0)
        offsets = _offsets(lengths.to_numpy(zero_copy_only=False))
        joined = pc.binary_join(pa.LargeListArray.from_arrays(pa.array(offsets), items), _ITEMS)
        text = pc.binary_join_element_wise(lengths.cast(pa.string()), joined, ":")
        return pc.if_else(values.is_null(), _NULL, text)
    return pa.array([repr(value) for value in values.to_pylist()], pa.string())


def write(
    path: Path, listing_ids: pa.Array, found: pa.Array, clean_sha256: str, rules: str
) -> None:
    table = pa.table({"listing_id": listing_ids, "state": found}, schema=SCHEMA)
    metadata = {CLEAN_SHA256: clean_sha256.encode(), RULES: rules.encode()}
    atomic.write_table(table.replace_schema_metadata(metadata), path)


def read(path: Path, clean_sha256: str) -> pa.Table | None:
    """The states of the clean rows whose sha256 is `clean_sha256`, or None (none written,
    or written for other clean rows)."""
    return _read_with(path, CLEAN_SHA256, clean_sha256)


def read_verdicts(path: Path, rules: str) -> pa.Table | None:
    """The states of the listings found clean under `rules` when `path` was written, or
    None (none written, or judged by other rules)."""
    return _read_with(path, RULES, rules)


def _read_with(path: Path, key: bytes, value: str) -> pa.Table | None:
    """The table at `path` if its metadata `key` is `value`."""
    if not path.is_file():
        return None
    table = pq.read_table(path)
    if (table.schema.metadata or {}).get(key, b"").decode() != value:
        return None
    return table
