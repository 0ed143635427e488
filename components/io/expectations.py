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

import pandas as pd
import pyarrow as pa

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
    """One row per listing: checked values and derived facts, positional index = row number."""
    ids, titles, descriptions, tags, categories, images = (
        table.column(name).to_pylist()
        for name in ("listing_id", "title", "description", "tags", "category", "image_uris")
    )
    return pd.DataFrame(
        {
            "listing_id": [_str_or_none(v) for v in ids],
            "listing_id_type": [type_name(v) for v in ids],
            "title": [_str_or_none(v) for v in titles],
            "title_type": [type_name(v) for v in titles],
            "description_type": [type_name(v) for v in descriptions],
            "description_chars": [len(v) if isinstance(v, str) else 0 for v in descriptions],
            "category_type": [type_name(v) for v in categories],
            "category_chars": [len(v) if isinstance(v, str) else 0 for v in categories],
            "tags_type": [type_name(v) for v in tags],
            "tag_count": [len(v) if isinstance(v, list) else 0 for v in tags],
            "longest_tag_chars": [_longest(v) for v in tags],
            "image_uris_type": [type_name(v) for v in images],
            "image_count": [len(v) if isinstance(v, list) else 0 for v in images],
        }
    )


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
