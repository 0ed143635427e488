"""Ablation of the alignment objectives (and any param) against the frozen encoders.

Trains every objective with several seeds on the cached features of a work dir's
`featurize` step (`--features`, default `artifacts`: run `make run` first; any catalog and
encoders a work dir was featurized with), each run in its own work dir, and prints
query-to-listing and held-out-view-to-listing Recall@1/10/50 and MRR (exact search),
mean ± std over seeds, with the training wall time. The first row is the frozen encoders
alone on the same queries (`frozen`: the mean of a listing's views; `frozen_max`: its best
view), the baseline a trained model must beat. A task without queries has no row. Model
selection and early stopping use the validation split only.

    .venv/bin/python benchmarks/ablation.py [--features DIR] [--seeds 0 1 2] [--set k=v]

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
from components.core.batching import pad_views
from components.core.retrieval import FROZEN, TASKS, frozen_metrics
from components.io.manifest import read_manifest
from components.io.training_data import TrainingData, load_training_data

OBJECTIVES = ("single_view", "factorized", "pairwise", "sinkhorn")
COLUMNS = ("recall@1", "recall@10", "recall@50", "mrr")


def run_one(
    objective: str, seed: int, overrides: list[str], root: Path, source: Path, split: str
) -> dict:
    params = load_params("params.yaml", [f"train.objective={objective}", *overrides])
    label = " ".join([objective, *overrides])
    work = root / f"{_slug(label)}-seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    for step in ("catalog", "featurize"):
        link = work / step
        if not link.exists():
            link.symlink_to((source / step).resolve())
    paths = StepPaths(
        workdir=work,
        catalog=str(work / "catalog"),
        tracking_uri=f"sqlite:///{(root / 'mlflow.db').resolve()}",
        seed=seed,
    )
    start = time.perf_counter()
    result = train.run(params.train, paths)
    seconds = time.perf_counter() - start
    data = _data(source, params.train)
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


def _data(source: Path, config) -> TrainingData:
    featurize_dir = source / "featurize"
    return load_training_data(
        featurize_dir, read_manifest(featurize_dir), config.val_fraction, config.test_fraction
    )


def frozen_rows(source: Path, split: str) -> list[dict]:
    """The frozen encoders' metrics on the split, one row per baseline."""
    data = _data(source, load_params("params.yaml").train)
    rng = np.random.default_rng(0)  # unused: every view is taken
    batches = [
        (
            pad_views(data.image_features, data.images[start : start + 1024], None, rng),
            pad_views(data.text_features, data.texts[start : start + 1024], None, rng),
        )
        for start in range(0, len(data.listing_ids), 1024)
    ]
    metrics, _ = frozen_metrics(data.tasks(split), batches, [1, 10, 50], len(data.listing_ids))
    rows = []
    for baseline in FROZEN:
        row = {"objective": f"(no training: {baseline})", "seed": 0, "seconds": 0, "epochs": 0}
        for task in TASKS:
            for column in COLUMNS:
                if (key := f"{task}/{baseline}/{column}") in metrics:
                    row[f"{task}/{column}"] = metrics[key]
        rows.append(row)
    return rows


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
        for task in TASKS:
            if f"{task}/recall@10" not in mine[0]:
                continue  # no queries for this task on this catalog
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
    parser.add_argument("--features", default="artifacts", help="work dir with featurize/")
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
    root, source = Path(args.out), Path(args.features)
    runs = (
        variants(args.objectives[0], args.vary) if args.vary else [(o, []) for o in args.objectives]
    )
    rows = frozen_rows(source, args.split) + [
        run_one(objective, seed, [*args.overrides, *extra], root, source, args.split)
        for objective, extra in runs
        for seed in args.seeds
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    encoders = read_manifest(source / "featurize")["encoders"]
    print(
        f"features {source} ({encoders['image']['id']} + {encoders['text']['id']}), seeds "
        f"{args.seeds}, {args.split} split, exact search, CPU threads {torch.get_num_threads()}"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
