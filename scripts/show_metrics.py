"""`make metrics`: every metric of the last run, one per line, per file.

`dvc metrics show` prints one column per metric: the headline (three numbers) reads well,
the details (about 90 metrics) do not. This prints the same files long: the evaluate step's
headline and details and the best epoch's validation metrics, metric names as DVC and
params.yaml's gates use them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FILES = (
    "artifacts/evaluate/metrics.json",
    "artifacts/evaluate/details.json",
    "artifacts/train/metrics.json",
)


def flat(values: dict, prefix: str = "") -> dict[str, object]:
    """Nested metrics as `a/b` keys (DVC's own naming)."""
    found: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            found |= flat(value, f"{prefix}{key}/")
        else:
            found[f"{prefix}{key}"] = value
    return found


def render(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        lines.append(f"{path}:")
        if not path.is_file():
            lines.append("  (not there: run the pipeline, make run)")
            continue
        metrics = flat(json.loads(path.read_text()))
        width = max((len(key) for key in metrics), default=0)
        for key, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    print(render([Path(name) for name in (argv or FILES)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
