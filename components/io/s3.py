"""The one place that builds boto3 S3 clients.

Credentials and the endpoint come from boto3's standard chain (environment, config
files, instance roles; `AWS_ENDPOINT_URL_S3` for S3-compatible servers); params never
carry them. Checksums are sent only when an operation requires them, because boto3
>= 1.36's default checksum headers are rejected by some S3-compatible servers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); the key may be empty."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return parts.netloc, parts.path.lstrip("/")


@lru_cache(maxsize=8)
def s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    max_attempts: int = 8,
    timeout_s: float = 60.0,
) -> Any:
    """A shared, thread-safe S3 client with retries and S3-compatible checksum settings.

    `endpoint_url` / `region` None: boto3's chain decides (AWS_ENDPOINT_URL_S3,
    AWS_DEFAULT_REGION, config files). Throttling, 5xx answers, connection resets and
    requests without an answer in `timeout_s` are retried with exponential backoff up
    to `max_attempts` (botocore's adaptive mode)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "adaptive"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=32,
        connect_timeout=min(10.0, timeout_s),
        read_timeout=timeout_s,
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def error_code(err: Exception) -> str | None:
    """The S3 error code of a botocore ClientError ("NoSuchKey", "412", ...); else None."""
    return getattr(err, "response", {}).get("Error", {}).get("Code")


def is_missing_key_error(err: Exception) -> bool:
    return error_code(err) in {"NoSuchKey", "404", "NotFound"}
