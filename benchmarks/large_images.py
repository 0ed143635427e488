"""Peak memory of validate and featurize on a catalog of very large images.

Writes a catalog of ordinary listings plus `--huge` listings whose photo is a
12000x12000 PNG (beyond validate.max_image_side: quarantined from the header), `--large`
listings with a 6000x6000 PNG (legal: decoded, kept, featurized) and, optionally, a
listing whose PNG header claims 100000x100000 (a decompression bomb). Each step runs in
its own process; the table gives its wall time, peak resident memory (from wait4) and
what validate decided.

    .venv/bin/python benchmarks/large_images.py [--huge 12] [--large 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.contract import VALIDATION_REPORT  # noqa: E402
from tests.conftest import png_claiming  # noqa: E402


def large_png(side: int, seed: int) -> bytes:
    """A PNG of `side` x `side` with a mark that makes each one's content distinct."""
    import io

    image = Image.new("RGB", (side, side), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    offset = 50 + 37 * seed
    draw.ellipse((offset, offset, side // 2 + offset, side // 2 + offset), fill=(200, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def small_png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (seed * 7 % 256, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_catalog(root: Path, huge: int, large: int, ordinary: int, bomb: bool) -> None:
    images = root / "images"
    images.mkdir(parents=True)
    rows = []

    def add(name: str, data: bytes) -> None:
        (images / f"{name}.png").write_bytes(data)
        rows.append(
            {
                "listing_id": name,
                "title": f"listing {name}",
                "description": "",
                "tags": ["benchmark"],
                "category": "test",
                "image_uris": [f"images/{name}.png"],
            }
        )

    huge_png = large_png(12000, 0) if huge else b""  # identical bytes: decoded by none
    for i in range(huge):
        add(f"huge-{i}", huge_png)
    for i in range(large):
        add(f"large-{i}", large_png(6000, i))
    for i in range(ordinary):
        add(f"ordinary-{i}", small_png(i))
    if bomb:
        add("bomb", png_claiming(100_000, 100_000))
    pq.write_table(pa.Table.from_pylist(rows), root / "listings.parquet")


def run_step(step: str, catalog: Path, workdir: Path) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MiB and exit code of one step in a fresh process."""
    command = [
        sys.executable,
        "-m",
        "components",
        step,
        "--set",
        f"paths.catalog={catalog}",
        "--set",
        f"paths.workdir={workdir}",
        "--set",
        "validate.max_bad_fraction=1.0",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--huge", type=int, default=12, help="12000x12000 PNG listings")
    parser.add_argument("--large", type=int, default=12, help="6000x6000 PNG listings")
    parser.add_argument("--ordinary", type=int, default=40, help="96x96 PNG listings")
    parser.add_argument("--no-bomb", action="store_true", help="leave out the bomb header")
    parser.add_argument("--out", type=Path, default=None, help="keep the catalog here")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="large-images-"))
    catalog, workdir = base / "catalog", base / "work"
    start = time.perf_counter()
    write_catalog(catalog, args.huge, args.large, args.ordinary, not args.no_bomb)
    size = sum(p.stat().st_size for p in (catalog / "images").iterdir()) / 2**20
    print(
        f"catalog {catalog}: {args.huge} x 12000^2, {args.large} x 6000^2, {args.ordinary} x "
        f"96^2 PNGs{'' if args.no_bomb else ', 1 bomb header'} ({size:.0f} MiB on disk, "
        f"written in {time.perf_counter() - start:.0f} s)"
    )
    print("| step | exit | wall s | peak RSS MiB | outcome |")
    print("|---|---|---|---|---|")
    for step in ("validate", "featurize"):
        seconds, rss, code = run_step(step, catalog, workdir)
        outcome = ""
        report = workdir / "validate" / VALIDATION_REPORT.name
        if step == "validate" and report.is_file():
            found = json.loads(report.read_text())
            outcome = f"clean {found['clean']}, quarantined {found['quarantined']} " + str(
                found["reasons"]
            )
        print(f"| {step} | {code} | {seconds:.1f} | {rss:.0f} | {outcome} |")
        if code:
            break


if __name__ == "__main__":
    main()
