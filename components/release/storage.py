"""Object storage behind one small interface: local directories and S3-compatible stores.

`open_storage(config)` takes `storage.uri`:

- a path or `file:///abs/path`: a local directory (the default, `artifacts/production`);
- `s3://bucket/prefix`: any S3-compatible store through boto3 (`storage.endpoint_url`,
  `storage.region`). Credentials come only from boto3's standard chain (environment,
  config files, instance or pod roles); params never hold them and nothing here logs them.

Keys are `/`-separated and relative to the root. Besides plain objects, a store has
*pointers*: small objects replaced only by a conditional write (`write_pointer`), so two
writers that read the same state cannot both replace it. On S3 that is `If-Match` on the
ETag read (or `If-None-Match: *` for a first write); locally an exclusive lock around
compare-and-rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.config import StorageConfig
from components.io.s3 import error_code, is_missing_key_error, s3_client, split_s3_uri

_CHUNK = 1 << 20


class MissingObject(FileNotFoundError):
    """A key that is not in the store; the message names its full URI."""


class PointerConflict(RuntimeError):
    """A pointer changed since it was read: another writer won."""


class Storage(ABC):
    """A bucket-like store rooted at `uri`."""

    uri: str

    def locate(self, key: str) -> str:
        """The full URI of `key`, for messages."""
        return f"{self.uri.rstrip('/')}/{key}"

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download `key` to `dest`. Raises MissingObject."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raises MissingObject."""

    @abstractmethod
    def stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks. Raises MissingObject."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, None when the key does not exist."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (a folder, ending in `/`), sorted."""

    @abstractmethod
    def list_folders(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of `prefix` (ending in `/`), sorted."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...

    @abstractmethod
    def read_pointer(self, key: str) -> tuple[bytes | None, str | None]:
        """(content, token) of a pointer; (None, None) when it does not exist yet."""

    @abstractmethod
    def write_pointer(self, key: str, data: bytes, token: str | None) -> None:
        """Replace the pointer only if it is still in the state `token` was read in
        (`None`: only if it does not exist). Raises PointerConflict otherwise."""

    def sha256(self, key: str) -> str:
        """sha256 of the stored bytes, read back from the store."""
        digest = hashlib.sha256()
        for chunk in self.stream(key):
            digest.update(chunk)
        return digest.hexdigest()

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        self.delete(keys)
        return len(keys)


def open_storage(config: StorageConfig, default_uri: str | None = None) -> Storage:
    """The store of `storage.uri` (or `default_uri` when it is null): local for a path or
    file:// URI, S3 for s3://."""
    uri = config.uri or default_uri
    if uri is None:
        raise ValueError("storage.uri is not set")
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return S3Storage(config.model_copy(update={"uri": uri}))
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"storage.uri {uri!r}: file:// URIs must be file:///abs/path")
        return LocalStorage(Path(parts.path))
    if parts.scheme == "":
        return LocalStorage(Path(uri))
    raise ValueError(
        f"storage.uri {uri!r}: unsupported scheme {parts.scheme!r} "
        "(use a path, file:///abs/path or s3://bucket/prefix)"
    )


class LocalStorage(Storage):
    """A directory. Every write is a temp file renamed into place, so a reader sees a
    whole object or none."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = root.as_posix()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"storage key {key!r} leaves the store")
        return self.root / key

    def _replace_with(self, key: str, fill) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: Path) -> None:
        with path.open("rb") as source:
            self._replace_with(key, lambda out: shutil.copyfileobj(source, out, _CHUNK))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._replace_with(key, lambda out: out.write(data))

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise MissingObject(f"{self.locate(key)} does not exist")
        return path

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._existing(key), dest)

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def stream(self, key: str) -> Iterator[bytes]:
        with self._existing(key).open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def list_folders(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, keys: list[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            folders.update(path.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_relative_to(self.root) and folder != self.root:
                with contextlib.suppress(OSError):  # only empty folders go
                    folder.rmdir()

    def read_pointer(self, key: str) -> tuple[bytes | None, str | None]:
        path = self._path(key)
        if not path.is_file():
            return None, None
        data = path.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def write_pointer(self, key: str, data: bytes, token: str | None) -> None:
        lock = self._path(key).with_name(f".{Path(key).name}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # one compare-and-rename at a time
            try:
                _, now = self.read_pointer(key)
                if now != token:
                    raise PointerConflict(f"{self.locate(key)} changed since it was read")
                self.put_bytes(key, data)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class S3Storage(Storage):
    """An S3 bucket prefix through boto3, for AWS S3 or any S3-compatible endpoint.

    Large files go up in parallel multipart uploads (`storage.multipart_threshold_mb`);
    throttling and 5xx answers are retried with backoff (`storage.max_attempts`)."""

    def __init__(self, config: StorageConfig) -> None:
        from boto3.s3.transfer import TransferConfig

        self.uri = config.uri.rstrip("/")
        self.bucket, prefix = split_s3_uri(self.uri)
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = s3_client(
            config.endpoint_url, config.region, config.max_attempts, config.timeout_s
        )
        threshold = config.multipart_threshold_mb * 1024 * 1024
        self.transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)
        self._conditional_ok = False

    def _key(self, key: str) -> str:
        return self.prefix + key

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _get(self, key: str) -> dict[str, Any]:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as err:
            if is_missing_key_error(err):
                raise MissingObject(f"{self.locate(key)} does not exist") from err
            raise

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("wb") as out:
            for chunk in self.stream(key):
                out.write(chunk)

    def get_bytes(self, key: str) -> bytes:
        return self._get(key)["Body"].read()

    def stream(self, key: str) -> Iterator[bytes]:
        body = self._get(key)["Body"]
        try:
            yield from body.iter_chunks(_CHUNK)
        finally:
            body.close()

    def size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except Exception as err:
            if is_missing_key_error(err):
                return None
            raise

    def _pages(self, prefix: str, **kwargs) -> Iterator[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix), **kwargs)

    def list_keys(self, prefix: str) -> list[str]:
        keys = [
            item["Key"][len(self.prefix) :]
            for page in self._pages(prefix)
            for item in page.get("Contents", [])
        ]
        return sorted(keys)

    def list_folders(self, prefix: str) -> list[str]:
        start = len(self._key(prefix))
        names = [
            item["Prefix"][start:].rstrip("/")
            for page in self._pages(prefix, Delimiter="/")
            for item in page.get("CommonPrefixes", [])
        ]
        return sorted(names)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys at most
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            answer = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise RuntimeError(
                    f"could not delete {len(answer['Errors'])} objects under {self.uri}, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def read_pointer(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            answer = self._get(key)
        except MissingObject:
            return None, None
        return answer["Body"].read(), answer["ETag"]

    def write_pointer(self, key: str, data: bytes, token: str | None) -> None:
        self._check_conditional_writes(key)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except Exception as err:
            code = error_code(err)
            # 412 PreconditionFailed: the ETag moved; 409 ConditionalRequestConflict: a
            # concurrent conditional write is in flight; a missing key for If-Match: deleted.
            if code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"} or (
                token is not None and is_missing_key_error(err)
            ):
                raise PointerConflict(f"{self.locate(key)} changed since it was read") from err
            raise

    def _check_conditional_writes(self, key: str) -> None:
        """Fail before the first pointer write when the server ignores conditional writes
        (some S3-compatible servers do): last-writer-wins would lose promotions silently.
        Probes a key of its own beside the pointer, never the pointer itself."""
        if self._conditional_ok:
            return
        probe = f"{key}.conditional-write-probe"
        self.put_bytes(probe, b"probe")
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(probe), Body=b"again", IfNoneMatch="*"
            )
        except Exception as err:
            code = error_code(err)
            if code not in {"PreconditionFailed", "412"}:
                raise
            self._conditional_ok = True
            return
        raise ValueError(
            f"{self.uri}: the S3 endpoint ignored If-None-Match on PutObject, so it cannot "
            "guard the CURRENT pointer against concurrent promotions; use a server that "
            "supports conditional writes (If-Match / If-None-Match on PutObject)"
        )
