"""The listings expectation suite, run with Great Expectations 1.x.

GE checks columns of scalars. A listing row has list columns and free-typed values, so
the suite runs on a *validation frame*: one row per listing with the value checked and
derived facts (the value's type, lengths, counts). Every expectation carries the
quarantine reason in its `meta`, and GE's `unexpected_index_list` says which rows fail.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from components.config import ValidateConfig

# GE would otherwise try to send usage statistics over the network at import time.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import great_expectations as gx
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

logging.getLogger("great_expectations").setLevel(logging.WARNING)

STRING, NULL, STRING_LIST = "string", "null", "list<string>"


def type_name(value: Any) -> str:
    """The catalog-contract type of one cell value, e.g. "string", "list<string>", "int"."""
    if value is None:
        return NULL
    if isinstance(value, str):
        return STRING
    if isinstance(value, list):
        return STRING_LIST if all(isinstance(v, str) for v in value) else "list<mixed>"
    return type(value).__name__


def validation_frame(table: pa.Table) -> pd.DataFrame:
    """One row per listing: checked values and derived facts, positional index = row number.

    Columns of the contract's types (string, list of strings) are derived by Arrow over
    the whole column; a column of any other type cell by cell (`type_name`), which is
    what both give for every value."""
    frame = {}
    for name in ("listing_id", "title"):
        column = table.column(name)
        frame[name] = _strings(column)
        frame[f"{name}_type"] = _types(column)
    for name in ("description", "category"):
        column = table.column(name)
        frame[f"{name}_type"] = _types(column)
        frame[f"{name}_chars"] = _chars(column)
    tags = table.column("tags")
    frame["tags_type"] = _types(tags)
    frame["tag_count"] = _counts(tags)
    frame["longest_tag_chars"] = _longest_element(tags)
    images = table.column("image_uris")
    frame["image_uris_type"] = _types(images)
    frame["image_count"] = _counts(images)
    return pd.DataFrame(frame)


def is_string(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _is_string_list(arrow_type: pa.DataType) -> bool:
    listed = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
    return listed and is_string(arrow_type.value_type)


def _types(column: pa.ChunkedArray) -> list[str] | np.ndarray:
    """`type_name` of every cell."""
    if is_string(column.type):
        return np.where(_valid(column), STRING, NULL)
    if _is_string_list(column.type):
        # a list holding a null is not a list of strings
        flat = pc.list_flatten(column)
        holes = np.zeros(len(column), dtype=bool)
        np.logical_or.at(holes, _parents(column), ~_valid(flat))
        return np.where(_valid(column), np.where(holes, "list<mixed>", STRING_LIST), NULL)
    return [type_name(v) for v in column.to_pylist()]


def _strings(column: pa.ChunkedArray) -> list[str | None]:
    if is_string(column.type):
        return column.to_pylist()
    return [_str_or_none(v) for v in column.to_pylist()]


def _chars(column: pa.ChunkedArray) -> list[int] | np.ndarray:
    if is_string(column.type):
        return _filled(pc.utf8_length(column))
    return [len(v) if isinstance(v, str) else 0 for v in column.to_pylist()]


def _counts(column: pa.ChunkedArray) -> list[int] | np.ndarray:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return _filled(pc.list_value_length(column))
    return [len(v) if isinstance(v, list) else 0 for v in column.to_pylist()]


def _longest_element(column: pa.ChunkedArray) -> list[int] | np.ndarray:
    if not _is_string_list(column.type):
        return [_longest(v) for v in column.to_pylist()]
    longest = np.zeros(len(column), dtype=np.int64)
    np.maximum.at(longest, _parents(column), _filled(pc.utf8_length(pc.list_flatten(column))))
    return longest


def _parents(column: pa.ChunkedArray) -> np.ndarray:
    """The row of each element of `pc.list_flatten(column)`."""
    return np.asarray(pc.list_parent_indices(column), dtype=np.int64)


def _valid(column) -> np.ndarray:
    return np.asarray(pc.is_valid(column), dtype=bool)


def _filled(lengths) -> np.ndarray:
    return np.asarray(pc.fill_null(lengths, 0), dtype=np.int64)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _longest(values: Any) -> int:
    if not isinstance(values, list):
        return 0
    return max((len(v) for v in values if isinstance(v, str)), default=0)


def listings_suite(config: ValidateConfig) -> gx.ExpectationSuite:
    """The expectations every listing must meet; `meta["reason"]` is the quarantine reason."""
    e = gx.expectations
    rules = [
        e.ExpectColumnValuesToNotBeInSet(
            column="listing_id_type", value_set=[NULL], meta={"reason": "listing_id_missing"}
        ),
        e.ExpectColumnValuesToBeInSet(
            column="listing_id_type",
            value_set=[STRING, NULL],
            meta={"reason": "listing_id_not_string"},
        ),
        e.ExpectColumnValuesToMatchRegex(
            column="listing_id", regex=r"\S", meta={"reason": "listing_id_empty"}
        ),
        e.ExpectColumnValueLengthsToBeBetween(
            column="listing_id",
            max_value=config.max_listing_id_chars,
            meta={"reason": "listing_id_too_long"},
        ),
        e.ExpectColumnValuesToBeUnique(
            column="listing_id", meta={"reason": "duplicate_listing_id"}
        ),
        e.ExpectColumnValuesToNotBeInSet(
            column="title_type", value_set=[NULL], meta={"reason": "title_missing"}
        ),
        e.ExpectColumnValuesToBeInSet(
            column="title_type", value_set=[STRING, NULL], meta={"reason": "title_not_string"}
        ),
        e.ExpectColumnValuesToMatchRegex(
            column="title", regex=r"\S", meta={"reason": "title_empty"}
        ),
        e.ExpectColumnValueLengthsToBeBetween(
            column="title", max_value=config.max_title_chars, meta={"reason": "title_too_long"}
        ),
        e.ExpectColumnValuesToBeInSet(
            column="description_type",
            value_set=[STRING, NULL],
            meta={"reason": "description_not_string"},
        ),
        e.ExpectColumnValuesToBeBetween(
            column="description_chars",
            max_value=config.max_description_chars,
            meta={"reason": "description_too_long"},
        ),
        e.ExpectColumnValuesToBeInSet(
            column="category_type", value_set=[STRING, NULL], meta={"reason": "category_not_string"}
        ),
        e.ExpectColumnValuesToBeBetween(
            column="category_chars",
            max_value=config.max_category_chars,
            meta={"reason": "category_too_long"},
        ),
        e.ExpectColumnValuesToBeInSet(
            column="tags_type",
            value_set=[STRING_LIST, NULL],
            meta={"reason": "tags_not_list_of_strings"},
        ),
        e.ExpectColumnValuesToBeBetween(
            column="tag_count", max_value=config.max_tags, meta={"reason": "too_many_tags"}
        ),
        e.ExpectColumnValuesToBeBetween(
            column="longest_tag_chars",
            max_value=config.max_tag_chars,
            meta={"reason": "tag_too_long"},
        ),
        e.ExpectColumnValuesToBeInSet(
            column="image_uris_type",
            value_set=[STRING_LIST],
            meta={"reason": "image_uris_not_list_of_strings"},
        ),
        e.ExpectColumnValuesToBeBetween(
            column="image_count", min_value=1, meta={"reason": "no_images"}
        ),
        e.ExpectColumnValuesToBeBetween(
            column="image_count", max_value=config.max_images, meta={"reason": "too_many_images"}
        ),
    ]
    return gx.ExpectationSuite(name="listings", expectations=rules)


def run_suite(frame: pd.DataFrame, suite: gx.ExpectationSuite) -> dict[str, tuple[str, list[int]]]:
    """Validate the frame; return, per failed reason, the column checked and failing rows.

    Raises:
        RuntimeError: an expectation could not be evaluated (a bug, not bad data).
    """
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        ),
    )
    batch = (
        context.data_sources.add_pandas("catalog")
        .add_dataframe_asset("listings")
        .add_batch_definition_whole_dataframe("all_rows")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(context.suites.add(suite), result_format={"result_format": "COMPLETE"})
    failed: dict[str, tuple[str, list[int]]] = {}
    for outcome in result.results:
        reason = outcome.expectation_config.meta["reason"]
        if outcome.exception_info and outcome.exception_info.get("raised_exception"):
            message = outcome.exception_info.get("exception_message")
            raise RuntimeError(f"expectation for {reason!r} could not run: {message}")
        if not outcome.success:
            rows = [int(i) for i in outcome.result.get("unexpected_index_list") or []]
            failed[reason] = (outcome.expectation_config.kwargs["column"], rows)
    return failed
