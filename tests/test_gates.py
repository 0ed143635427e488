"""The recall gates as pure functions: pass, absolute fail, regression fail, no champion."""

from __future__ import annotations

import pytest

from components.config import GatesConfig
from components.core.gates import check_gates, failed, failure_message, table

GATES = GatesConfig(
    min={"query_to_listing/recall@10": 0.4},
    max_regression={"query_to_listing/recall@10": 0.02},
    max_ann_loss=0.05,
)


def _metrics(recall: float = 0.5, through_index: float | None = None) -> dict:
    through_index = recall if through_index is None else through_index
    return {
        "query_to_listing/recall@10": recall,
        "query_to_listing/index/recall@10": through_index,
        "view_to_listing/recall@10": 0.6,
        "view_to_listing/index/recall@10": 0.6,
    }


def test_all_pass_against_a_champion():
    results = check_gates(_metrics(0.5), {"query_to_listing/recall@10": 0.51}, GATES)

    assert not failed(results)
    assert [r.gate for r in results] == [
        "min:query_to_listing/recall@10",
        "max_regression:query_to_listing/recall@10",
        "max_ann_loss:query_to_listing",
        "max_ann_loss:view_to_listing",
    ]
    regression = results[1]
    assert regression.value == pytest.approx(0.01) and regression.passed


def test_absolute_minimum_fails_with_value_and_threshold():
    results = check_gates(_metrics(0.3), None, GATES)

    (bad,) = failed(results)
    assert bad.gate == "min:query_to_listing/recall@10"
    assert (bad.value, bad.threshold) == (0.3, 0.4)
    assert "min:query_to_listing/recall@10 = 0.3000 (needs >= 0.4000)" in failure_message(results)


def test_regression_beyond_the_limit_fails():
    results = check_gates(_metrics(0.45), {"query_to_listing/recall@10": 0.5}, GATES)

    (bad,) = failed(results)
    assert bad.gate == "max_regression:query_to_listing/recall@10"
    assert bad.value == pytest.approx(0.05)
    assert "(needs <= 0.0200)" in failure_message(results)


def test_no_champion_yet_passes_the_regression_gate_with_a_note():
    results = check_gates(_metrics(0.5), None, GATES)

    regression = results[1]
    assert regression.passed and regression.value is None and regression.note == "no champion yet"


def test_ann_loss_fails_when_the_index_loses_too_much_recall():
    results = check_gates(_metrics(0.5, through_index=0.4), None, GATES)

    (bad,) = failed(results)
    assert bad.gate == "max_ann_loss:query_to_listing" and bad.value == pytest.approx(0.1)


def test_a_gate_on_a_metric_that_was_not_computed_fails():
    gates = GatesConfig(
        min={"query_to_listing/recal@10": 0.1}, max_regression={}, max_ann_loss=None
    )

    results = check_gates(_metrics(), None, gates)

    (bad,) = failed(results)
    assert bad.note == "metric not computed" and "missing" in failure_message(results)
    assert "FAIL" in table(results)
