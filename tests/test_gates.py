"""The recall gates as pure functions: pass, absolute fail, regression fail, no champion,
the gain over the frozen encoders, and tasks without test queries."""

from __future__ import annotations

import pytest

from components.config import GatesConfig
from components.core.gates import check_gates, failed, failure_message, table

GATES = GatesConfig(
    min={"query_to_listing/recall@10": 0.4},
    max_regression={"query_to_listing/recall@10": 0.02},
    min_gain_over_frozen={},
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


def test_ann_loss_on_a_sample_of_queries_is_against_their_exact_recall():
    # the index found what exact search found for its sample; the sample is harder than
    # the whole test set, which must not read as recall lost through the index
    metrics = _metrics(0.5, through_index=0.3) | {"query_to_listing/index/exact_recall@10": 0.3}

    results = check_gates(metrics, None, GATES)

    assert not failed(results)
    assert results[2].gate == "max_ann_loss:query_to_listing" and results[2].value == 0.0


def test_a_gate_on_a_metric_that_was_not_computed_fails():
    gates = GatesConfig(
        min={"query_to_listing/recal@10": 0.1},
        max_regression={},
        min_gain_over_frozen={},
        max_ann_loss=None,
    )

    results = check_gates(_metrics(), None, gates)

    (bad,) = failed(results)
    assert bad.note == "metric not computed" and "missing" in failure_message(results)
    assert "FAIL" in table(results)


FROZEN_GATE = GatesConfig(
    min={}, max_regression={}, min_gain_over_frozen={"query_to_listing": 0.1}, max_ann_loss=None
)


@pytest.mark.parametrize(
    ("model", "frozen", "frozen_max", "gain", "passed"),
    [
        (0.55, 0.5, 0.4, 0.10, True),  # 10% over the mean-of-views baseline
        (0.54, 0.5, 0.4, 0.08, False),
        (0.55, 0.3, 0.51, 0.0784, False),  # the best single view is the baseline to beat
    ],
)
def test_a_model_must_beat_the_best_frozen_baseline_by_the_relative_gain(
    model, frozen, frozen_max, gain, passed
):
    metrics = {
        "query_to_listing/recall@10": model,
        "query_to_listing/frozen/recall@10": frozen,
        "query_to_listing/frozen_max/recall@10": frozen_max,
    }

    (result,) = check_gates(metrics, None, FROZEN_GATE)

    assert result.passed is passed
    assert result.value == pytest.approx(gain, abs=1e-4)
    if not passed:
        assert "min_gain_over_frozen:query_to_listing" in failure_message([result])


def test_gates_on_a_task_without_test_queries_are_skipped_not_failed():
    metrics = _metrics(0.5) | {
        "query_to_listing/frozen/recall@10": 0.1,
        "query_to_listing/frozen_max/recall@10": 0.1,
        "view_to_listing/queries": 0,
    }
    metrics = {k: v for k, v in metrics.items() if not k.startswith("view_to_listing/recall")}
    metrics.pop("view_to_listing/index/recall@10")
    gates = GatesConfig(
        min={"view_to_listing/recall@10": 0.3, "query_to_listing/recall@10": 0.3},
        min_gain_over_frozen={"query_to_listing": 0.1, "view_to_listing": 0.1},
    )

    results = check_gates(metrics, None, gates)

    assert not failed(results)
    skipped = [r for r in results if r.metric.startswith("view_to_listing")]
    assert len(skipped) == 4 and all(r.value is None for r in skipped)
    assert all(r.note == "skipped: no test queries for this task" for r in skipped)


@pytest.mark.parametrize(("queries", "skipped"), [(1, True), (4, True), (5, False), (50, False)])
def test_gates_on_fewer_test_queries_than_min_queries_are_skipped_with_the_count(queries, skipped):
    metrics = _metrics(0.1) | {"query_to_listing/queries": queries}  # below the minimum 0.4
    gates = GatesConfig(
        min={"query_to_listing/recall@10": 0.4},
        max_regression={},
        min_gain_over_frozen={},
        max_ann_loss=None,
        min_queries=5,
    )

    (result,) = check_gates(metrics, None, gates)

    if skipped:
        assert result.passed and result.value is None
        assert result.note == f"skipped: only {queries} test queries (< 5) for this task"
    else:  # measured: 0.1 < 0.4 fails
        assert not result.passed and result.value == pytest.approx(0.1)


def test_a_refresh_s_gain_over_frozen_is_the_one_its_model_earned_at_training():
    # today the catalog is harder for both; the model is the same: its gain is as trained
    today = _metrics(0.3) | {
        "query_to_listing/frozen/recall@10": 0.4,
        "query_to_listing/frozen_max/recall@10": 0.4,
    }
    trained = {
        "query_to_listing/recall@10": 0.6,
        "query_to_listing/frozen/recall@10": 0.4,
        "query_to_listing/frozen_max/recall@10": 0.5,
    }
    gates = GatesConfig(
        min={}, max_regression={}, min_gain_over_frozen={"query_to_listing": 0.1}, max_ann_loss=None
    )

    (measured,) = check_gates(today, None, gates)
    (earned,) = check_gates(today, None, gates, earned=trained)

    assert not measured.passed  # 0.3 against 0.4
    assert earned.passed and earned.value == pytest.approx(0.6 / 0.5 - 1)
    assert earned.note == "model 0.6000, frozen best 0.5000 (at training: the same model)"
