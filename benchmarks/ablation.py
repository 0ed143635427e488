"""Ablation of the alignment objectives on the sample catalog's test split.

Trains every objective with several seeds on the cached features of `artifacts/featurize`
(run `make run` first), each in its own work dir, and prints query-to-listing and
held-out-view-to-listing Recall@1/10/50 and MRR on the **test** split (exact search),
mean ± std over seeds, with the training wall time. Model selection and early stopping
use the validation split only.

    .venv/bin/python benchmarks/ablation.py [--seeds 0 1 2] [--objectives ...] [--set k=v]

Tuning never looks at the test split: `--split val --vary train.alpha=0.3,0.7 ...` trains
the first objective once with the params as given and once per value of each varied key
(one key at a time), and reports the validation split.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from components import train
from components.config import StepPaths, load_params
from components.contract import MODEL_WEIGHTS
from components.io.manifest import read_manifest
from components.io.training_data import load_training_data

OBJECTIVES = ("single_view", "factorized", "pairwise", "sinkhorn")
COLUMNS = ("recall@1", "recall@10", "recall@50", "mrr")


def run_one(
    objective: str, seed: int, overrides: list[str], root: Path, split: str = "test"
) -> dict:
    params = load_params("params.yaml", [f"train.objective={objective}", *overrides])
    label = " ".join([objective, *overrides])
    work = root / f"{_slug(label)}-seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    for step in ("catalog", "featurize"):
        link = work / step
        if not link.exists():
            link.symlink_to(Path("artifacts", step).resolve())
    paths = StepPaths(
        workdir=work,
        catalog=str(work / "catalog"),
        tracking_uri=f"sqlite:///{(root / 'mlflow.db').resolve()}",
        seed=seed,
    )
    start = time.perf_counter()
    result = train.run(params.train, paths)
    seconds = time.perf_counter() - start
    data = load_training_data(
        work / "featurize",
        read_manifest(work / "featurize"),
        params.train.val_fraction,
        params.train.test_fraction,
    )
    model = train.build_model(params.train, data)
    model.load_state_dict(torch.load(result.out_dir / MODEL_WEIGHTS.name))
    metrics = train.evaluate_split(model, data, split, [1, 10, 50], torch.device("cpu"))
    return {
        "objective": label,
        "seed": seed,
        "seconds": seconds,
        "epochs": read_manifest(result.out_dir)["counts"]["epochs"],
        **{key.replace(f"{split}/", "", 1): value for key, value in metrics.items()},
    }


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def variants(objective: str, vary: list[str]) -> list[tuple[str, list[str]]]:
    """The objective as configured, then one run per value of each `key=v1,v2` in `vary`."""
    runs = [(objective, [])]
    for spec in vary:
        key, _, values = spec.partition("=")
        runs += [(objective, [f"{key}={value}"]) for value in values.split(",")]
    return runs


def table(rows: list[dict]) -> str:
    lines = [
        "| objective | task | " + " | ".join(COLUMNS) + " | train wall s | epochs |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for objective in dict.fromkeys(r["objective"] for r in rows):
        mine = [r for r in rows if r["objective"] == objective]
        for task in ("query_to_listing", "view_to_listing"):
            cells = []
            for column in COLUMNS:
                values = [r[f"{task}/{column}"] for r in mine]
                cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}")
            seconds = f"{np.mean([r['seconds'] for r in mine]):.0f}"
            epochs = f"{np.mean([r['epochs'] for r in mine]):.1f}"
            lines.append(
                f"| {objective} | {task} | " + " | ".join(cells) + f" | {seconds} | {epochs} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument(
        "--vary", action="append", default=[], metavar="KEY=V1,V2", help="val sweeps only"
    )
    parser.add_argument("--out", default="artifacts/ablation")
    args = parser.parse_args()
    if args.vary and args.split != "val":
        parser.error("--vary tunes params: use it with --split val, never on the test split")
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.out)
    runs = (
        variants(args.objectives[0], args.vary) if args.vary else [(o, []) for o in args.objectives]
    )
    rows = [
        run_one(objective, seed, [*args.overrides, *extra], root, args.split)
        for objective, extra in runs
        for seed in args.seeds
    ]
    (root / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"seeds {args.seeds}, {args.split} split, exact search, "
        f"CPU threads {torch.get_num_threads()}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
