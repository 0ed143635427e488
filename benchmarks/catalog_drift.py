"""Does a retrain survive the catalog it will meet next week? Retrains after typical
catalog changes and reports the regression on the unchanged listings' test queries.

The base is a work dir's catalog and features (`--features`, default `artifacts`: run
`make run` first). Each change is a catalog of its own, validated and featurized in a
scratch work dir (the base's feature store is copied, so only new content is encoded):

- `remove`: 2% of the listings removed (hash-chosen).
- `retitle`: 3% of the listings retitled (a tag or the category's last part, else the
  title reversed word by word: a title that no longer reads as before).
- `patterns`: 5% more listings of a different kind: one large (768 px), detailed
  generated picture each (hundreds of shapes, a gradient, texture noise), a title of a
  few words that the picture shows (its colour and motif), two or three tags, no
  description.
- `mismatched`: 5% more listings whose photo does not predict their title: a generated
  picture as above, titled and tagged with words drawn independently of it.

No change adds queries or held-out photos, so every change is measured on the same
queries: the base catalog's test split (splits are hash-chosen per query and per listing,
unchanged by the others). Both models of a seed are evaluated on the changed catalog's
listings (the additions are there as distractors, as the evaluate step's champion
comparison embeds the champion with the challenger's listings): `before` is the model
trained on the base catalog, `after` the one retrained on the changed catalog with the
same seed and params. Reported per change and task: recall@10 before and after (mean over
seeds) and the worst regression over the seeds, `after - before` (the issue's target: no
task below -0.01).

    .venv/bin/python benchmarks/catalog_drift.py [--features artifacts] [--seeds 0 1 2]
        [--changes remove retitle patterns mismatched] [--set train.key=value]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHANGES = ("remove", "retitle", "patterns", "mismatched")
REMOVE, RETITLE, ADD = 0.02, 0.03, 0.05
TASKS = ("query_to_listing", "view_to_listing")

# the generated listings' vocabulary: colours the picture is painted in, motifs it draws
COLOURS = {
    "red": (200, 40, 40),
    "orange": (230, 130, 30),
    "yellow": (230, 210, 40),
    "green": (50, 160, 70),
    "teal": (30, 150, 150),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "pink": (230, 120, 170),
    "brown": (120, 80, 40),
    "grey": (128, 128, 128),
}
MOTIFS = ("circles", "stripes", "triangles", "waves", "grid", "stars", "rings", "dots")
WORDS = (
    "vintage brass lamp", "ceramic mug", "leather wallet", "wool scarf", "garden bench",
    "oak bookshelf", "silver ring", "canvas tote", "bike helmet", "desk organiser",
    "linen shirt", "glass vase", "camping stove", "board game", "phone stand",
    "rain jacket", "kitchen scale", "wall clock", "yoga mat", "bird feeder",
)  # fmt: skip


def _share(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def paint(path: Path, colour: str, motif: str, rng: np.random.Generator, size: int = 768):
    """A large, detailed picture: a gradient in `colour`, hundreds of `motif` shapes in
    shades of it, texture noise; saved as PNG."""
    from PIL import Image, ImageDraw

    base = np.array(COLOURS[colour], dtype=float)
    ramp = np.linspace(0.35, 1.0, size)[:, None, None]
    pixels = np.clip(ramp * base[None, None, :] + rng.normal(0, 18, (size, size, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(150, 400))):
        shade = tuple(int(c) for c in np.clip(base * rng.uniform(0.3, 1.6), 0, 255))
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(6, 60))
        if motif in ("circles", "dots", "rings"):
            r = r // 3 if motif == "dots" else r
            box = [x - r, y - r, x + r, y + r]
            draw.ellipse(box, outline=shade, width=4) if motif == "rings" else draw.ellipse(
                box, fill=shade
            )
        elif motif == "stripes":
            draw.line([(x, 0), (x + r, size)], fill=shade, width=int(rng.integers(2, 12)))
        elif motif == "triangles":
            draw.polygon([(x, y), (x + r, y + 2 * r), (x - r, y + 2 * r)], fill=shade)
        elif motif == "waves":
            xs = np.arange(0, size, 8)
            ys = y + r * np.sin(xs / r + rng.uniform(0, 6))
            draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=shade, width=3)
        elif motif == "grid":
            step = r + 10
            draw.line([(x - x % step, 0), (x - x % step, size)], fill=shade, width=2)
            draw.line([(0, y - y % step), (size, y - y % step)], fill=shade, width=2)
        else:  # stars
            points = []
            for k in range(10):
                radius = r if k % 2 == 0 else r / 2.5
                angle = k * np.pi / 5
                points.append((x + radius * np.sin(angle), y - radius * np.cos(angle)))
            draw.polygon(points, fill=shade)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def additions(kind: str, count: int, images: Path) -> list[dict]:
    """`count` generated listings of `kind` (patterns | mismatched), images under `images`
    (the catalog's `added/` folder)."""
    rng = np.random.default_rng(0 if kind == "patterns" else 1)
    rows = []
    for i in range(count):
        colour = str(rng.choice(list(COLOURS)))
        motif = str(rng.choice(MOTIFS))
        listing_id = f"{kind}-{i:04d}"
        paint(images / listing_id / "0.png", colour, motif, rng)
        if kind == "patterns":
            title = f"{colour.capitalize()} {motif} print"
            tags = [colour, motif, "pattern"][: int(rng.integers(2, 4))]
            category = f"Prints > {motif.capitalize()}"
        else:  # the words come from another draw: the picture does not predict them
            phrase = str(rng.choice(WORDS))
            title = f"{phrase.capitalize()} no. {int(rng.integers(1, 99))}"
            tags = phrase.split()[-2:]
            category = "Home > Assorted"
        rows.append(
            {
                "listing_id": listing_id,
                "title": title,
                "description": "",
                "tags": tags,
                "category": category,
                "image_uris": [f"added/{listing_id}/0.png"],
            }
        )
    return rows


def changed_catalog(kind: str, base: Path, out: Path) -> dict:
    """The base catalog after the change `kind`, written to `out`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    # hard links: validate quarantines an image reached through a link out of the catalog
    shutil.copytree(base / "images", out / "images", copy_function=os.link)
    listings = pq.read_table(base / "listings.parquet")
    rows = listings.to_pylist()
    if kind == "remove":
        rows = [r for r in rows if _share("remove:" + r["listing_id"]) >= REMOVE]
    elif kind == "retitle":
        rows = [
            dict(r, title=_retitled(r)) if _share("retitle:" + r["listing_id"]) < RETITLE else r
            for r in rows
        ]
    else:
        template = {name: None for name in listings.schema.names}
        added = additions(kind, round(ADD * len(rows)), out / "added")
        rows += [template | row for row in added]
    pq.write_table(pa.Table.from_pylist(rows, schema=listings.schema), out / "listings.parquet")
    kept = {r["listing_id"] for r in rows}
    queries = pq.read_table(base / "queries.parquet")
    query_rows = [q for q in queries.to_pylist() if q["listing_id"] in kept]
    pq.write_table(pa.Table.from_pylist(query_rows, schema=queries.schema), out / "queries.parquet")
    return {"listings": len(rows), "base_listings": listings.num_rows}


def _retitled(row: dict) -> str:
    if row.get("tags"):
        return str(row["tags"][0]).capitalize()
    if row.get("category"):
        return row["category"].split(">")[-1].strip()
    return " ".join(reversed(row["title"].split()))


def prepare(work: Path, base: Path) -> None:
    """Validate and featurize `work`'s catalog, reusing the base's feature store."""
    shutil.copytree(base / "featurize" / "store", work / "featurize" / "store")
    for step in ("validate", "featurize"):
        command = [sys.executable, "-m", "components", step, "--set", f"paths.workdir={work}"]
        command += ["--set", f"paths.catalog={work / 'catalog'}"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{step} on {work} failed:\n{done.stderr[-3000:]}")


def train_model(work: Path, seed: int, overrides: list[str], tracking: str):
    """Train on `work`'s features; the model, loaded."""
    import torch

    from components import train
    from components.config import StepPaths, load_params
    from components.contract import MODEL_WEIGHTS

    params = load_params(ROOT / "params.yaml", overrides).train
    run_dir = work / f"seed{seed}"
    run_dir.mkdir(exist_ok=True)
    for step in ("catalog", "featurize"):
        link = run_dir / step
        if not link.exists():
            link.symlink_to((work / step).resolve())
    paths = StepPaths(
        workdir=run_dir, catalog=str(run_dir / "catalog"), tracking_uri=tracking, seed=seed
    )
    result = train.run(params, paths)
    model = train.build_model(params, data_of(work, params))
    model.load_state_dict(torch.load(result.out_dir / MODEL_WEIGHTS.name))
    return model


def data_of(work: Path, params):
    from components.io.manifest import read_manifest
    from components.io.training_data import load_training_data

    featurize = work / "featurize"
    return load_training_data(
        featurize, read_manifest(featurize), params.val_fraction, params.test_fraction
    )


def test_recall(model, data) -> dict[str, float]:
    import torch

    from components import train

    metrics = train.evaluate_split(model, data, "test", [10], torch.device("cpu"))
    return {t: metrics[f"test/{t}/recall@10"] for t in TASKS if f"test/{t}/recall@10" in metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="artifacts", help="work dir: catalog/, featurize/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--changes", nargs="+", choices=CHANGES, default=list(CHANGES))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--scratch", default=None, help="keep work dirs here (default: temp)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from components.config import load_params

    params = load_params(ROOT / "params.yaml", args.overrides).train
    base = Path(args.features)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="catalog-drift-"))
    tracking = f"sqlite:///{(scratch / 'mlflow.db').resolve()}"
    before = {}
    base_work = scratch / "base"
    base_work.mkdir(parents=True, exist_ok=True)
    for step in ("catalog", "featurize"):
        if not (base_work / step).exists():
            (base_work / step).symlink_to((base / step).resolve())
    for seed in args.seeds:
        before[seed] = train_model(base_work, seed, args.overrides, tracking)
    rows = []
    for kind in args.changes:
        work = scratch / kind
        counts = changed_catalog(kind, base / "catalog", work / "catalog")
        prepare(work, base)
        data = data_of(work, params)
        for seed in args.seeds:
            after = train_model(work, seed, args.overrides, tracking)
            old, new = test_recall(before[seed], data), test_recall(after, data)
            rows += [
                {"change": kind, "seed": seed, "task": t, "before": old[t], "after": new[t]}
                | counts
                for t in old
            ]
            print(json.dumps(rows[-1]), flush=True)
    (scratch / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nscratch {scratch}; overrides {args.overrides or 'none'}; seeds {args.seeds}")
    print("| change | listings | task | recall@10 before | after | after - before (worst seed) |")
    print("|---|---|---|---|---|---|")
    for kind in args.changes:
        for task in TASKS:
            mine = [r for r in rows if r["change"] == kind and r["task"] == task]
            if not mine:
                continue
            diffs = [r["after"] - r["before"] for r in mine]
            print(
                f"| {kind} | {mine[0]['base_listings']} -> {mine[0]['listings']} | {task} | "
                f"{np.mean([r['before'] for r in mine]):.3f} | "
                f"{np.mean([r['after'] for r in mine]):.3f} | "
                f"{np.mean(diffs):+.3f} ({min(diffs):+.3f}) |"
            )


if __name__ == "__main__":
    main()
