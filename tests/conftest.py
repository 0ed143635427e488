"""Shared fixtures: tiny catalogs written by the tests themselves, no network."""

from __future__ import annotations

import io
import os
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.config import StepPaths, ValidateConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shuffle",
        type=int,
        default=None,
        metavar="SEED",
        help="run the modules, and the tests within each, in an order drawn from SEED: no "
        "test may depend on another having run before it",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed = config.getoption("--shuffle")
    if seed is None:
        return
    rng = random.Random(seed)
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:  # a module's tests stay together: its fixtures are set up once
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    order = list(modules.values())
    rng.shuffle(order)
    for tests in order:
        rng.shuffle(tests)
    items[:] = [item for tests in order for item in tests]


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ: without this,
    one test's store would become the default of every later test and of the processes
    they start (a `dvc repro`, a torchrun). Each test starts without it and leaves none."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def in_fresh_interpreters(code: str, hash_seeds: tuple[int, ...] = (1, 2)) -> list[str]:
    """What `code` prints in new Python processes, one per PYTHONHASHSEED: a value meant
    to be stable must not depend on the process's string-hash randomisation."""
    outputs = []
    for seed in hash_seeds:
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"python -c failed: {done.stderr[-2000:]}")
        outputs.append(done.stdout.strip())
    return outputs


def png_bytes(
    size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (a decompression-bomb header):
    the IHDR fields are rewritten and its CRC recomputed, the pixel data stays 1x1."""
    data = bytearray(png_bytes((1, 1)))
    ihdr = 8 + 4  # after the signature and the chunk length: b"IHDR" + 13 bytes + CRC
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def listing(listing_id: str, **overrides: Any) -> dict[str, Any]:
    """A valid listing row whose one image is `images/<listing_id>.png`."""
    row = {
        "listing_id": listing_id,
        "title": f"Title of {listing_id}",
        "description": "A fine thing.",
        "tags": ["thing"],
        "category": "Things > Fine",
        "image_uris": [f"images/{listing_id}.png"],
    }
    row.update(overrides)
    return row


@pytest.fixture
def make_catalog(tmp_path: Path) -> Callable[..., Path]:
    """Write listings.parquet (and a PNG for every relative image path) into a catalog dir."""

    def make(
        rows: list[dict[str, Any]],
        *,
        schema: pa.Schema | None = None,
        name: str = "catalog",
        images: bool = True,
    ) -> Path:
        root = tmp_path / name
        (root / "images").mkdir(parents=True, exist_ok=True)
        if images:
            for row in rows:
                for ref in row.get("image_uris") or []:
                    if isinstance(ref, str) and ref.startswith("images/") and ".." not in ref:
                        path = root / ref
                        if not path.exists():
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_bytes(png_bytes())
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, root / "listings.parquet")
        return root

    return make


@pytest.fixture
def step_paths(tmp_path: Path) -> Callable[[Path | str], StepPaths]:
    def make(catalog: Path | str) -> StepPaths:
        return StepPaths(workdir=tmp_path / "work", catalog=str(catalog))

    return make


@pytest.fixture
def lenient() -> ValidateConfig:
    """Validate settings that never fail the run, so a test can inspect the quarantine."""
    return ValidateConfig(
        max_bad_fraction=1.0, workers=2, min_clean_listings=0, require_eval_queries=False
    )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 protocol server (moto_server) on 127.0.0.1 for the whole session."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_up(endpoint, server)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def _wait_until_up(endpoint: str, server: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto_server exited with {server.returncode}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout}s")


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point boto3's standard configuration chain at the local server, with dummy keys."""
    from components.io.s3 import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3_client.cache_clear()
    yield s3_endpoint
    s3_client.cache_clear()


LISTINGS = 60


@pytest.fixture(scope="session")
def featurized(tmp_path_factory):
    """A 60-listing sample catalog, validated and featurized (96 px images) once per run."""
    from components import catalog, featurize, validate
    from components.config import CatalogConfig, FeaturizeConfig

    work = tmp_path_factory.mktemp("work")
    paths = StepPaths(
        workdir=work, catalog=str(work / "catalog"), tracking_uri=f"sqlite:///{work / 'mlflow.db'}"
    )
    # the same catalog on every machine: no optional Debian data (CI has none)
    catalog.run(CatalogConfig(max_listings=LISTINGS, optional_data_roots=[]), paths)
    _add_a_third_photo(work / "catalog")
    validate.run(ValidateConfig(workers=2), paths)
    featurize.run(FeaturizeConfig(device="cpu", image_size=96, workers=2), paths)
    return paths


def _add_a_third_photo(root: Path) -> None:
    """Every listing gets a mirrored copy of its last photo as one more view, so every
    listing has the 3+ photos that let it hold one out for view-to-listing evaluation."""
    from PIL import ImageOps

    table = pq.read_table(root / "listings.parquet")
    rows = table.to_pylist()
    for row in rows:
        last = row["image_uris"][-1]
        mirrored = f"{Path(last).with_suffix('')}-mirrored.png"
        ImageOps.mirror(Image.open(root / last).convert("RGBA")).save(root / mirrored)
        row["image_uris"] = [*row["image_uris"], mirrored]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "listings.parquet")


def fresh_paths(paths: StepPaths, tmp_path, name: str) -> StepPaths:
    """Same catalog and features as `paths`, own later-step folders and MLflow store."""
    work = tmp_path / name
    work.mkdir()
    (work / "featurize").symlink_to(paths.step_dir("featurize"))
    (work / "catalog").symlink_to(paths.step_dir("catalog"))
    (work / "validate").symlink_to(paths.step_dir("validate"))
    return StepPaths(
        workdir=work, catalog=paths.catalog, tracking_uri=f"sqlite:///{work / 'mlflow.db'}", seed=3
    )


@pytest.fixture(scope="session")
def released(featurized, tmp_path_factory) -> StepPaths:
    """A workdir of its own (features copied) with a retrain of the tiny model promoted,
    once per run: what a refresh builds on (tests/harness/refresh.py)."""
    from tests.harness import refresh

    return refresh.release(featurized, tmp_path_factory.mktemp("refresh") / "work")


@pytest.fixture
def copied(released, tmp_path) -> StepPaths:
    """The released workdir copied for one test (store and registry included): no test
    sees what another refreshed or removed."""
    from tests.harness import refresh

    return refresh.copy(released, tmp_path / "work")
