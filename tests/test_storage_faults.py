"""Promote through storage faults injected between the pipeline and the S3 protocol
server: throttling, 5xx, connection resets and timeouts on uploads, reads and the
`CURRENT` write. Promote succeeds through retries or fails with a clear message, and
`CURRENT` always names a whole release: the previous one or the new one."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from components import promote
from components.config import PromoteConfig, StorageConfig
from components.release import production
from components.release.storage import open_storage
from tests.harness.fault_proxy import Fault, FaultProxy
from tests.test_promote import NAME, evaluated, evaluated_once  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

CURRENT = "indices/CURRENT"
INF = float("inf")

# a request unanswered this long is retried: long enough that a loaded 2-core machine
# never times out a healthy request, and half the proxy's stall, so a stall always does
TIMEOUT_S = 3.0


RECOVERED = {
    "503 SlowDown on 3 uploads": [Fault("503", method="PUT", times=3)],
    "500 on 2 reads back": [Fault("500", method="GET", times=2)],
    "reset on 2 uploads": [Fault("reset", method="PUT", times=2)],
    "upload answer lost after it landed": [Fault("reset", method="PUT", after_forward=True)],
    "timeout on the CURRENT write": [
        Fault("stall", method="PUT", key_contains=CURRENT, stall_s=2 * TIMEOUT_S)
    ],
    "CURRENT landed, its answer lost": [
        Fault("reset", method="PUT", key_contains=CURRENT, after_forward=True)
    ],
}
FAILED = {
    "500 on every file upload": [  # files are content-addressed objects
        Fault("500", method="PUT", key_contains="/objects/sha256/", times=INF)
    ],
    "503 on every CURRENT write": [Fault("503", method="PUT", key_contains=CURRENT, times=INF)],
    "reset on every try of the new manifest": [
        Fault("reset", method="PUT", key_contains="manifest.json", times=INF)
    ],
}


def _store_behind(proxy_url: str, bucket: str) -> StorageConfig:
    return StorageConfig(
        uri=f"s3://{bucket}/prod", endpoint_url=proxy_url, max_attempts=4, timeout_s=TIMEOUT_S
    )


def _previous_release(s3_endpoint: str, bucket: str, tmp_path) -> str:
    """A release already current in the store (written without faults)."""
    from components.io.s3 import s3_client

    s3_client().create_bucket(Bucket=bucket)
    store = open_storage(StorageConfig(uri=f"s3://{bucket}/prod", endpoint_url=s3_endpoint))
    older = tmp_path / "older.bin"
    older.write_bytes(b"the release before")
    model = {"name": NAME, "version": "0", "sha256": "0" * 64}
    return production.publish(store, {"older.bin": older}, {}, model).version


def _outcome(s3_endpoint, bucket, faults, evaluated, tmp_path):  # noqa: F811
    previous = _previous_release(s3_endpoint, bucket, tmp_path)
    with FaultProxy(s3_endpoint, faults) as proxy:
        paths = dataclasses.replace(evaluated, storage=_store_behind(proxy.url, bucket))
        try:
            result, error = promote.run(PromoteConfig(), paths), None
        except Exception as err:  # what the CLI would print
            result, error = None, err
    direct = open_storage(StorageConfig(uri=f"s3://{bucket}/prod", endpoint_url=s3_endpoint))
    return previous, result, error, direct, proxy


@pytest.mark.parametrize("name", list(RECOVERED))
def test_transient_storage_faults_are_retried_through(s3_env, evaluated, tmp_path, name):  # noqa: F811
    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    previous, result, error, direct, proxy = _outcome(
        s3_env, bucket, RECOVERED[name], evaluated, tmp_path
    )

    assert error is None, f"{name}: {error}; requests: {proxy.log}"
    assert sum(proxy.injected.values()) >= 1
    loaded = production.load_current_index(direct, tmp_path / "cache")  # verifies every byte
    assert loaded.version == result.version != previous
    assert loaded.index.ntotal == 60
    assert all(v.complete for v in production.list_versions(direct))


@pytest.mark.parametrize("name", list(FAILED))
def test_persistent_storage_faults_fail_clearly_and_leave_current_whole(
    s3_env,
    evaluated,  # noqa: F811
    tmp_path,
    name,
):
    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    previous, result, error, direct, proxy = _outcome(
        s3_env, bucket, FAILED[name], evaluated, tmp_path
    )

    assert result is None and error is not None and sum(proxy.injected.values()) >= 2
    message = str(error)
    assert any(word in message for word in ("InternalError", "SlowDown", "Connection", "reset"))
    current = production.read_pointer(direct)
    assert current.version == previous  # CURRENT unchanged, and still whole:
    production.verify(direct, previous, production.read_manifest(direct, previous))
    others = [v for v in production.list_versions(direct) if v.version != previous]
    assert all(not v.complete for v in others)  # removed, or left incomplete: never served
