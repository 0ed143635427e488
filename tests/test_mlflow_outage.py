"""A real `mlflow server` on 127.0.0.1 that goes away during train and before promote:
each step fails with one line naming the tracking URI, and once the server is back the
rerun completes without a second registered version."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO_ROOT, fresh_paths

# a real MLflow server started, stopped and started again: over a minute on 2 cores, so it runs
# with the slow tests (CI runs those after make test)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = [
    "train.epochs=30",
    "train.patience=30",
    "train.batch_size=16",
    "train.hidden=128",
    "train.dim=64",
    "train.device=cpu",
    "train.val_fraction=0.2",
    "train.test_fraction=0.2",
]
LENIENT_EVALUATE = [
    "evaluate.champion=null",
    "evaluate.gates.min={}",
    "evaluate.gates.max_regression={}",
    "evaluate.gates.min_gain_over_frozen={}",
    "evaluate.bootstrap=100",
    "embed.device=cpu",
]


class TrackingServer:
    """`mlflow server` with a sqlite backend; stop() ends its whole process group."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'tracking.db'}",
                "--default-artifact-root",
                (self.root / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def step(name: str, paths, server: TrackingServer, *extra: str, background: bool = False):
    argv = [sys.executable, "-m", "components", name, "--set", f"paths.workdir={paths.workdir}"]
    argv += ["--set", f"paths.catalog={paths.catalog}", "--set", "seed=3"]
    for override in [*TRAIN, *LENIENT_EVALUATE, *extra]:
        argv += ["--set", override]
    env = os.environ | {
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }
    if background:
        return subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)


def versions(server: TrackingServer) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    return [v.version for v in client.search_model_versions("name='listing-encoder'")]


def assert_one_line_naming(done, step_name: str, server: TrackingServer) -> None:
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-2000:]
    assert err[-1].startswith(f"error: {step_name}: MLflow at {server.uri}: "), err[-1]
    assert "Traceback" not in done.stderr


def test_an_outage_during_train_and_before_promote_fails_clearly_and_reruns_cleanly(
    featurized, tmp_path
):
    paths = fresh_paths(featurized, tmp_path, "work")
    server = TrackingServer(tmp_path)
    server.start()
    try:
        training = step("train", paths, server, background=True)
        pointer = paths.step_dir("train") / "checkpoints" / "last.json"
        while not pointer.exists() and training.poll() is None:
            time.sleep(0.05)
        server.stop()  # mid-training: the next epoch's metrics have nowhere to go
        out, err = training.communicate(timeout=300)
        assert_one_line_naming(
            subprocess.CompletedProcess([], training.returncode, out, err), "train", server
        )
        epoch_reached = json.loads(pointer.read_text())["epoch"]
        assert epoch_reached < 29  # it stopped part way

        server.start()
        resumed = step("train", paths, server)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resumed from" in resumed.stderr
        assert versions(server) == ["1"]
        for name in ("embed", "index", "evaluate"):
            done = step(name, paths, server)
            assert done.returncode == 0, done.stderr[-2000:]

        server.stop()  # before promote
        refused = step("promote", paths, server)
        assert_one_line_naming(refused, "promote", server)
        assert not (paths.workdir / "production" / "indices" / "CURRENT").exists()

        server.start()
        promoted = step("promote", paths, server)
        assert promoted.returncode == 0, promoted.stderr[-2000:]
        assert versions(server) == ["1"]
        client = mlflow.MlflowClient(tracking_uri=server.uri)
        assert client.get_model_version_by_alias("listing-encoder", "champion").version == "1"
    finally:
        server.stop()
