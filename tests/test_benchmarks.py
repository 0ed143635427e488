"""Benchmarks that the suite runs small, so that they still run when they are needed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_prints_its_table():
    """The prepared GPU check (benchmarks/gpu.sh) as a smoke test: every row measured."""
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--device", "cpu", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    table = {row.split(" | ")[0].lstrip("| "): row for row in rows[1:]}
    for what in (
        "train step, factorized",
        "train step, pairwise",
        "featurize images, efficientnet-lite0",
        "featurize images, efficientnet-lite2",
        "embed listings",
    ):
        assert what in table, f"{what} missing from:\n{done.stdout}"
    for row in rows[1:]:
        value = float(row.split(" | ")[2])
        assert value > 0, row


def test_refresh_scale_builds_catalogs_of_distinct_listings_on_hard_linked_photos(
    featurized, tmp_path
):
    """benchmarks/refresh_scale.py's catalog: N listings from the sample's, none alike
    (exact duplicates tie and made its ANN gate unstable), every photo a hard link."""
    import os

    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import refresh_scale

    source = Path(featurized.catalog)
    # more copies of the 60 than there are title suffixes
    refresh_scale.build_catalog(source, tmp_path / "big", 500)

    rows = pq.read_table(tmp_path / "big" / "listings.parquet").to_pylist()
    assert len({r["listing_id"] for r in rows}) == len({r["title"] for r in rows}) == 500
    first = rows[60]["image_uris"][0]  # the first copy's photo: its own path, the same file
    assert first.startswith("images/c1/")
    original = source / first.removeprefix("images/c1/")
    assert os.path.samefile(tmp_path / "big" / first, original)


def test_refresh_scale_changes_bring_new_photo_content_at_every_seed(featurized, tmp_path):
    """Each change's new and rephotographed listings have photos no earlier change made:
    a seed's photos found in the feature store from another seed would not be encoded,
    and the benchmark would time a cheaper change than it says."""
    import hashlib

    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import refresh_scale

    catalog = tmp_path / "big"
    refresh_scale.build_catalog(Path(featurized.catalog), catalog, 600)

    def fresh_content(seed: int) -> set[str]:
        refresh_scale.change_catalog(catalog, seed=seed)
        rows = pq.read_table(catalog / "listings.parquet").to_pylist()
        refs = {ref for row in rows for ref in row["image_uris"] if f"fresh/{seed}-" in ref}
        assert len(refs) >= refresh_scale.CHANGES["new"] + refresh_scale.CHANGES["rephotographed"]
        return {hashlib.sha256((catalog / ref).read_bytes()).hexdigest() for ref in refs}

    first, second = fresh_content(0), fresh_content(1)
    assert not first & second
