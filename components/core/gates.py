"""Recall gates: pure functions from metrics (and the champion's) to pass/fail results.

Three kinds, from `evaluate.gates` in params.yaml:
- `min`: a metric must be at least the threshold;
- `max_regression`: a metric may drop at most the threshold below the champion's
  (passes with a note when there is no champion yet);
- `min_gain_over_frozen`: a task's recall@10 must beat the frozen encoders' best
  no-training baseline (`<task>/frozen/...`, `<task>/frozen_max/...`) by at least the
  threshold, relative (0.1: 10% better);
- `max_ann_loss`: for each task, recall@10 through the index may be at most the
  threshold below recall@10 of exact search;
- and always, `index:every_listing_once`: the index holds every embedded listing exactly
  once, no other listing, and no vector that is no listing's (a refresh that left a
  removed listing in is stopped).

A gate on a task with fewer than `min_queries` test queries (absent: `<task>/queries` is
0) is skipped: it passes with a note, since there is too little to measure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from components.config import GatesConfig
from components.core.retrieval import FROZEN, TASKS


@dataclass(frozen=True)
class GateResult:
    gate: str  # e.g. "min:query_to_listing/recall@10"
    metric: str
    threshold: float
    value: float | None  # the compared quantity (the metric, the drop, the loss)
    passed: bool
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def check_gates(
    metrics: dict[str, float],
    champion: dict[str, float] | None,
    gates: GatesConfig,
    earned: dict[str, float] | None = None,
) -> list[GateResult]:
    """Every configured gate, evaluated. A metric a gate names but `metrics` lacks fails
    that gate with a note (a typo in params must not pass silently). `earned`: the
    metrics the model's training measured, when this evaluation is a refresh of the same
    model: its gain over the frozen encoders is the one it earned there."""
    n = gates.min_queries
    results = [
        _skipped(metrics, f"min:{name}", name, floor, n) or _minimum(metrics, name, floor)
        for name, floor in gates.min.items()
    ]
    results += [
        _skipped(metrics, f"max_regression:{name}", name, limit, n)
        or _regression(metrics, champion, name, limit)
        for name, limit in gates.max_regression.items()
    ]
    results += [
        _skipped(metrics, f"min_gain_over_frozen:{task}", f"{task}/recall@10", gain, n)
        or _gain_over_frozen(earned or metrics, task, gain, at_training=earned is not None)
        for task, gain in gates.min_gain_over_frozen.items()
    ]
    if (limit := gates.max_ann_loss) is not None:
        results += [
            _skipped(metrics, f"max_ann_loss:{task}", f"{task}/index/recall@10", limit, n)
            or _ann_loss(metrics, task, limit)
            for task in TASKS
        ]
    if any(key in metrics for key in COVERAGE):
        results.append(_coverage(metrics))
    return results


# what the index holds besides every embedded listing once (components/io/faiss_index.py)
COVERAGE = (
    "index/missing_listings",
    "index/repeated_listings",
    "index/foreign_listings",
    "index/removed_listings",
    "index/unlabelled_vectors",
)


COVERAGE_GATE = "index:every_listing_once"
# what fails it (removed listings are foreign ones, named apart in the note)
WRONG = ("missing_listings", "repeated_listings", "foreign_listings", "unlabelled_vectors")


def _coverage(metrics: dict) -> GateResult:
    """Always on: the index holds every embedded listing exactly once and no other (a
    removed listing included)."""
    found = {key.removeprefix("index/"): int(metrics.get(key, 0)) for key in COVERAGE}
    wrong = sum(found[k] for k in WRONG)
    note = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in found.items() if n)
    return GateResult(COVERAGE_GATE, "index/listings", 0, wrong, wrong == 0, note)


def _skipped(
    metrics: dict, gate: str, name: str, threshold: float, min_queries: int
) -> GateResult | None:
    """A passed result with a note when the gate's task has too few test queries."""
    queries = metrics.get(name.split("/")[0] + "/queries")
    if queries is None or queries >= min_queries:
        return None
    why = "no test queries" if queries == 0 else f"only {queries} test queries (< {min_queries})"
    return GateResult(gate, name, threshold, None, True, f"{SKIPPED}{why} for this task")


SKIPPED = "skipped: "  # the note of a gate passed for too few test queries


def failed(results: list[GateResult]) -> list[GateResult]:
    return [result for result in results if not result.passed]


def skipped(results: list[GateResult]) -> list[GateResult]:
    """The gates passed without a measurement: their task had too few test queries."""
    return [result for result in results if result.note.startswith(SKIPPED)]


def _minimum(metrics: dict, name: str, floor: float) -> GateResult:
    value = metrics.get(name)
    if value is None:
        return GateResult(f"min:{name}", name, floor, None, False, "metric not computed")
    return GateResult(f"min:{name}", name, floor, value, value >= floor)


def _regression(metrics: dict, champion: dict | None, name: str, limit: float) -> GateResult:
    gate = f"max_regression:{name}"
    value = metrics.get(name)
    if value is None:
        return GateResult(gate, name, limit, None, False, "metric not computed")
    if champion is None:
        return GateResult(gate, name, limit, None, True, "no champion yet")
    if name not in champion:
        return GateResult(gate, name, limit, None, False, "champion lacks the metric")
    drop = champion[name] - value
    note = f"champion {champion[name]:.4f}, challenger {value:.4f}"
    return GateResult(gate, name, limit, drop, drop <= limit, note)


def _gain_over_frozen(
    metrics: dict, task: str, gain: float, at_training: bool = False
) -> GateResult:
    name, gate = f"{task}/recall@10", f"min_gain_over_frozen:{task}"
    baselines = [metrics.get(f"{task}/{baseline}/recall@10") for baseline in FROZEN]
    if name not in metrics or None in baselines:
        return GateResult(gate, name, gain, None, False, "metric not computed")
    frozen = max(baselines)
    value = metrics[name] / frozen - 1 if frozen > 0 else (float("inf") if metrics[name] else 0)
    note = f"model {metrics[name]:.4f}, frozen best {frozen:.4f}"
    if at_training:
        note += " (at training: the same model)"
    return GateResult(gate, name, gain, value, value >= gain, note)


def _ann_loss(metrics: dict, task: str, limit: float) -> GateResult:
    """Recall@10 lost through the index: of the queries searched through it (all, or a
    sample whose exact recall is `<task>/index/exact_recall@10`)."""
    through_index = f"{task}/index/recall@10"
    exact = f"{task}/index/exact_recall@10"
    exact = exact if exact in metrics else f"{task}/recall@10"
    gate = f"max_ann_loss:{task}"
    if exact not in metrics or through_index not in metrics:
        return GateResult(gate, through_index, limit, None, False, "metric not computed")
    loss = metrics[exact] - metrics[through_index]
    note = f"exact {metrics[exact]:.4f}, index {metrics[through_index]:.4f}"
    return GateResult(gate, through_index, limit, loss, loss <= limit, note)


def table(results: list[GateResult]) -> str:
    """A readable table of the gates for logs and the terminal."""
    lines = [f"{'gate':<48} {'value':>9} {'threshold':>10}  result  note"]
    for r in results:
        value = "-" if r.value is None else f"{r.value:.4f}"
        verdict = "pass" if r.passed else "FAIL"
        lines.append(f"{r.gate:<48} {value:>9} {r.threshold:>10.4f}  {verdict:<6}  {r.note}")
    return "\n".join(lines)


def failure_message(results: list[GateResult]) -> str:
    """One line naming each failed gate with its value and threshold."""
    parts = []
    for r in failed(results):
        value = "missing" if r.value is None else f"{r.value:.4f}"
        bound = ">=" if r.gate.startswith("min") else "<="
        parts.append(f"{r.gate} = {value} (needs {bound} {r.threshold:.4f})")
    return f"{len(parts)} gate(s) failed: " + "; ".join(parts)
