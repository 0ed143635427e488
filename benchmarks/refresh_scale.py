"""What an hourly refresh costs as the catalog grows: does it follow the change or the
catalog?

    .venv/bin/python benchmarks/refresh_scale.py [--sizes 100000 1000000] \
        [--release artifacts] [--scratch DIR] [--keep]

Needs a promoted sample release (`make run`: `--release` is its workdir, with its store,
MLflow registry and feature cache). For each size N:

1. a catalog of N listings built from the sample's: listing i is sample listing i mod S
   under a new id (the first S keep theirs, so the sample's queries still point at them),
   its title perturbed (a suffix and the copy's number: no two listings alike), every image
   path its own hard link to the sample's file (so every image is a distinct file to stat,
   open and hash, and nothing needs encoding but the perturbed titles);
2. a base release: a refresh of the sample release onto that catalog (every listing new:
   a full embed and index build). Its cost is reported, not a target;
3. a refresh with nothing changed;
4. a refresh after 1,000 changes: 500 new listings whose photos are new content (a
   sample photo recoloured, marked with the change's seed and the photo's number, so a
   later change's photos are new content too), 300 changed (150 retitled, 150 with a new
   primary photo, also marked), 200 removed.

Each refresh runs as `python -m components refresh` in a fresh process, one run (the
machine is shared: read ratios). Reported per refresh: wall seconds, whether it
published, listings reused/added/changed/removed, images opened and MiB read from the
catalog by validate and featurize, MiB uploaded against the index file and the
embeddings, and per-step seconds (the run records).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("validate", "featurize", "embed", "index", "evaluate", "promote")
SUFFIXES = ("", " (vintage)", " - gift idea", " handmade", " new", " XL", " set of 2")
CHANGES = {"new": 500, "retitled": 150, "rephotographed": 150, "removed": 200}


def build_catalog(source: Path, target: Path, size: int) -> None:
    """`size` listings from the sample catalog at `source` (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source / "listings.parquet")
    rows = table.to_pylist()
    target.mkdir(parents=True)
    shutil.copy2(source / "queries.parquet", target / "queries.parquet")
    out, linked = [], 0
    for i in range(size):
        row = dict(rows[i % len(rows)])
        copy = i // len(rows)
        if copy:
            row["listing_id"] = f"{row['listing_id']}-{copy}"
            # no two listings alike: exact duplicates tie, and ties make recall unstable
            row["title"] = f"{row['title']}{SUFFIXES[copy % len(SUFFIXES)]} no. {copy}"
        refs = []
        for ref in row["image_uris"]:
            linked_ref = f"images/c{copy}/{ref}"
            path = target / linked_ref
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(source / ref, path)
            refs.append(linked_ref)
            linked += 1
        row["image_uris"] = refs
        out.append(row)
    pq.write_table(pa.Table.from_pylist(out, schema=table.schema), target / "listings.parquet")
    print(f"  catalog: {size:,} listings, {linked:,} image paths", flush=True)


def change_catalog(catalog: Path, seed: int = 0) -> dict[str, int]:
    """The 1,000-listing change of step 4, in place."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageOps

    table = pq.read_table(catalog / "listings.parquet")
    rows = table.to_pylist()
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), sum(CHANGES.values()) - CHANGES["new"])
    removed = set(picked[: CHANGES["removed"]])
    retitled = set(picked[CHANGES["removed"] : CHANGES["removed"] + CHANGES["retitled"]])
    rephotographed = set(picked[CHANGES["removed"] + CHANGES["retitled"] :])
    fresh = catalog / "images" / "fresh"
    fresh.mkdir(parents=True, exist_ok=True)

    def new_photo(ref: str, n: int, how: str) -> str:
        image = Image.open(catalog / ref).convert("RGB")
        if how == "mirror":
            image = ImageOps.mirror(image)
        else:  # new content: another colouring of the drawing
            image = Image.merge("RGB", image.split()[::-1])
        tag = f"{seed}-{n}-{how}"
        # content no earlier change made: the same source recoloured or mirrored by another
        # seed's change would be found encoded in the feature store, not encoded again
        for x, byte in enumerate(tag.encode()):
            image.putpixel((x % image.width, x // image.width), (byte, 255 - byte, byte))
        name = f"images/fresh/{tag}.png"  # a later change adds, never rewrites
        image.save(catalog / name)
        return name

    kept = []
    for i, row in enumerate(rows):
        if i in removed:
            continue
        if i in retitled:
            row = dict(row, title=row["title"] + " (new edition)")
        if i in rephotographed:
            row = dict(row, image_uris=[new_photo(row["image_uris"][0], i, "mirror")])
        kept.append(row)
    for n in range(CHANGES["new"]):
        source = rows[rng.randrange(len(rows))]
        refs = [
            new_photo(ref, n * 100 + k, "recolour") for k, ref in enumerate(source["image_uris"])
        ]
        kept.append(
            dict(
                source,
                listing_id=f"fresh-{seed}-{n}",
                title=f"Fresh {source['title']}",
                image_uris=refs,
            )
        )
    pq.write_table(pa.Table.from_pylist(kept, schema=table.schema), catalog / "listings.parquet")
    return dict(CHANGES)


def workdir_from(release: Path, work: Path) -> None:
    """A workdir of its own holding the release's store, registry and feature cache."""
    work.mkdir(parents=True)
    for name in ("production", "mlflow.db", "mlartifacts"):
        if (release / name).is_dir():
            shutil.copytree(release / name, work / name, symlinks=True)
        elif (release / name).is_file():
            shutil.copy2(release / name, work / name)
    store = release / "featurize" / "store"
    (work / "featurize").mkdir()
    shutil.copytree(store, work / "featurize" / "store")


def refresh(work: Path, catalog: Path) -> dict:
    """One `python -m components refresh` in a fresh process: its wall time, what it did
    and what it cost (the steps' records)."""
    command = [
        sys.executable,
        "-m",
        "components",
        "refresh",
        "--set",
        f"paths.workdir={work}",
        "--set",
        f"paths.catalog={catalog}",
    ]
    store = work / "production"
    before = _versions(store)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"refresh on {work} failed:\n{done.stderr[-3000:]}")
    runs = {step: json.loads((work / step / "run.json").read_text()) for step in STEPS}
    embedded = json.loads((work / "embed" / "manifest.json").read_text())["counts"]
    current = json.loads((store / "indices" / "CURRENT").read_text())["version"]
    manifest = json.loads((store / "indices" / current / "manifest.json").read_text())
    files = manifest["files"]
    return {
        "wall_s": wall,
        "published": len(_versions(store)) > len(before),
        "listings": embedded.get("listings"),
        **{k: embedded.get(k) for k in ("reused", "added", "changed", "removed")},
        **{
            f"{step}_{key}": runs[step].get("reads", {}).get(key, 0)
            for step in ("validate", "featurize")
            for key in ("images_opened", "bytes_read")
        },
        "uploaded_bytes": runs["promote"].get("uploaded_bytes", 0),
        "index_bytes": files["index.faiss"]["bytes"],
        "embedding_bytes": sum(e["bytes"] for n, e in files.items() if n.startswith("embeddings/")),
        "steps_s": {step: runs[step]["duration_s"] for step in STEPS},
        "index_build": json.loads((work / "index" / "manifest.json").read_text()).get("build"),
        "summary": done.stdout.strip().splitlines()[-4:],
    }


def _versions(store: Path) -> list[str]:
    indices = store / "indices"
    return sorted(p.name for p in indices.iterdir() if (p / "manifest.json").is_file())


def size_stage(size: int, release: Path, scratch: Path) -> dict:
    print(f"{size:,} listings", flush=True)
    work, catalog = scratch / f"work-{size}", scratch / f"catalog-{size}"
    start = time.perf_counter()
    build_catalog(release / "catalog", catalog, size)
    workdir_from(release, work)
    row = {"build_catalog_s": time.perf_counter() - start}
    row["base"] = refresh(work, catalog)
    print(f"  base release: {row['base']['wall_s']:.0f} s", flush=True)
    row["nothing"] = refresh(work, catalog)
    print(f"  nothing changed: {row['nothing']['wall_s']:.0f} s", flush=True)
    change_catalog(catalog)
    row["change"] = refresh(work, catalog)
    print(f"  1,000 changed: {row['change']['wall_s']:.0f} s", flush=True)
    return row


def report(results: dict[int, dict]) -> None:
    mib = 2**20
    print()
    print(
        "| listings | refresh | wall s | published | reused | added | changed | removed "
        "| images opened (validate / featurize) | MiB read | MiB uploaded | index MiB "
        "| embeddings MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, row in results.items():
        for name in ("base", "nothing", "change"):
            r = row[name]
            read = (r["validate_bytes_read"] + r["featurize_bytes_read"]) / mib
            print(
                f"| {size:,} | {name} | {r['wall_s']:.1f} | {'yes' if r['published'] else 'no'} "
                f"| {r['reused']:,} | {r['added']:,} | {r['changed']:,} | {r['removed']:,} "
                f"| {r['validate_images_opened']:,} / {r['featurize_images_opened']:,} "
                f"| {read:.1f} | {r['uploaded_bytes'] / mib:.1f} | {r['index_bytes'] / mib:.1f} "
                f"| {r['embedding_bytes'] / mib:.1f} |"
            )
    print()
    print("| listings | refresh | " + " | ".join(STEPS) + " |")
    print("|---|---|" + "---|" * len(STEPS))
    for size, row in results.items():
        for name in ("nothing", "change"):
            steps = row[name]["steps_s"]
            print(f"| {size:,} | {name} | " + " | ".join(f"{steps[s]:.1f}" for s in STEPS) + " |")
    sizes = sorted(results)
    if len(sizes) > 1:
        small, large = results[sizes[0]]["change"], results[sizes[-1]]["change"]
        print(
            f"\n1,000-listing refresh at {sizes[-1]:,} / at {sizes[0]:,}: "
            f"{large['wall_s'] / small['wall_s']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--release", type=Path, default=ROOT / "artifacts")
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not (args.release / "production" / "indices" / "CURRENT").is_file():
        sys.exit(f"{args.release}: no promoted release (run make run first)")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="refresh-scale-"))
    results = {}
    try:
        for size in args.sizes:
            results[size] = size_stage(size, args.release.resolve(), scratch)
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
