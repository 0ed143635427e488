"""Reading a catalog: listings/queries tables and the images their rows reference.

A catalog root is a local directory or an `s3://bucket/prefix`. Image references in
`image_uris` are relative paths (resolved inside the root, never outside it), or
absolute `file://` / `s3://` URIs whose scheme (and bucket) the caller allows.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.contract import LISTINGS, QUERIES
from components.io.images import ImageRefError, decode_image
from components.io.s3 import is_missing_key_error, s3_client, split_s3_uri

# the data contract's listing columns (DESIGN.md section 3); a catalog may add more
LISTING_SCHEMA = pa.schema(
    [
        ("listing_id", pa.string()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("category", pa.string()),
        ("image_uris", pa.list_(pa.string())),
    ]
)
LISTING_COLUMNS = tuple(LISTING_SCHEMA.names)
QUERY_COLUMNS = ("query_id", "query", "listing_id")
# After validation: every scheme it allows may appear, and sizes were already checked.
TRUSTED_SCHEMES = ("file", "s3")
TRUSTED_MAX_BYTES = 1 << 40


class CatalogError(ValueError):
    """The catalog as a whole is unusable (missing file, not Parquet, missing column)."""


@dataclass(frozen=True)
class ImageLocation:
    """Where one image reference points: a local file or an S3 object."""

    ref: str
    path: Path | None = None
    bucket: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class CatalogRoot:
    """A catalog directory: local path or `s3://bucket/prefix`."""

    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def read_bytes(self, name: str) -> bytes:
        """Read a file at the top of the catalog; missing is a CatalogError naming it."""
        if self.is_s3:
            bucket, prefix = split_s3_uri(self.uri)
            key = posixpath.join(prefix, name) if prefix else name
            try:
                return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception as err:
                if is_missing_key_error(err):
                    raise CatalogError(f"{name} not found in catalog {self.uri}") from None
                raise
        path = Path(self.uri) / name
        if not path.is_file():
            raise CatalogError(f"{name} not found in catalog {self.uri}")
        return path.read_bytes()

    def sha256(self, name: str) -> str | None:
        """sha256 of a file at the top of the catalog; None when it is absent."""
        if not self.exists(name):
            return None
        return hashlib.sha256(self.read_bytes(name)).hexdigest()

    def exists(self, name: str) -> bool:
        if self.is_s3:
            bucket, prefix = split_s3_uri(self.uri)
            key = posixpath.join(prefix, name) if prefix else name
            found = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            return any(obj["Key"] == key for obj in found.get("Contents", []))
        return (Path(self.uri) / name).is_file()

    def resolve_image(
        self, ref: object, allowed_schemes: list[str], allowed_buckets: list[str] | None
    ) -> ImageLocation:
        """Turn one `image_uris` entry into a location, enforcing the catalog's rules.

        Raises:
            ImageRefError: not a string, disallowed scheme or bucket, or a path that
                escapes the catalog root (`..`, an absolute path, a symlink outside).
        """
        if not isinstance(ref, str) or not ref.strip():
            raise ImageRefError("image_uri_invalid", f"{ref!r} is not a non-empty string")
        parts = urlsplit(ref)
        scheme = parts.scheme.lower()
        if len(scheme) > 1:  # a one-letter "scheme" is a Windows drive, i.e. a path
            return _resolve_uri(ref, scheme, allowed_schemes, allowed_buckets)
        if self.is_s3:
            return self._resolve_s3_relative(ref)
        return self._resolve_local_relative(ref)

    def _resolve_local_relative(self, ref: str) -> ImageLocation:
        root = Path(self.uri).resolve()
        resolved = (root / ref).resolve()
        if not resolved.is_relative_to(root):
            raise ImageRefError("image_path_escapes_root", f"{ref!r} resolves outside {root}")
        return ImageLocation(ref=ref, path=resolved)

    def _resolve_s3_relative(self, ref: str) -> ImageLocation:
        bucket, prefix = split_s3_uri(self.uri)
        prefix = prefix.strip("/")
        key = posixpath.normpath(posixpath.join(prefix, ref)) if prefix else posixpath.normpath(ref)
        inside = key.startswith(prefix + "/") if prefix else not key.startswith("..")
        if ref.startswith("/") or not inside:
            raise ImageRefError("image_path_escapes_root", f"{ref!r} resolves outside {self.uri}")
        return ImageLocation(ref=ref, bucket=bucket, key=key)


def _resolve_uri(
    ref: str, scheme: str, allowed_schemes: list[str], allowed_buckets: list[str] | None
) -> ImageLocation:
    if scheme not in {s.lower() for s in allowed_schemes}:
        raise ImageRefError("image_scheme_not_allowed", f"{ref!r}: scheme {scheme!r} not allowed")
    parts = urlsplit(ref)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ImageRefError("image_uri_invalid", f"{ref!r}: file URIs must be local")
        return ImageLocation(ref=ref, path=Path(unquote(parts.path)))
    if scheme == "s3":
        if not parts.netloc:
            raise ImageRefError("image_uri_invalid", f"{ref!r}: no bucket")
        if allowed_buckets is not None and parts.netloc not in allowed_buckets:
            raise ImageRefError(
                "image_bucket_not_allowed", f"{ref!r}: bucket {parts.netloc!r} not allowed"
            )
        return ImageLocation(ref=ref, bucket=parts.netloc, key=unquote(parts.path.lstrip("/")))
    raise ImageRefError("image_scheme_not_allowed", f"{ref!r}: scheme {scheme!r} is not supported")


def read_image_bytes(location: ImageLocation, max_bytes: int) -> bytes:
    """Read an image's bytes, refusing files larger than `max_bytes` before reading them.

    Raises:
        ImageRefError: `image_missing` or `image_too_large`.
    """
    if location.path is not None:
        try:
            size = location.path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise ImageRefError(
                "image_missing", f"{location.ref!r}: no file {location.path}"
            ) from None
        if not location.path.is_file():
            raise ImageRefError("image_missing", f"{location.ref!r}: {location.path} is not a file")
        _check_size(location, size, max_bytes)
        return location.path.read_bytes()
    try:
        response = s3_client().get_object(Bucket=location.bucket, Key=location.key)
    except Exception as err:
        if is_missing_key_error(err):
            raise ImageRefError(
                "image_missing", f"{location.ref!r}: no object {location}"
            ) from None
        raise
    _check_size(location, response["ContentLength"], max_bytes)
    return response["Body"].read()


def _check_size(location: ImageLocation, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageRefError(
            "image_too_large", f"{location.ref!r}: {size} bytes > max_image_bytes {max_bytes}"
        )


def open_trusted_image(root: CatalogRoot, ref: str, fit: int | None = None) -> Image.Image:
    """Read and decode an image reference that validation already accepted (any allowed
    scheme, no size cap; memory still bounded, see components/io/images.py): for steps
    after featurize and for serving. `fit`: as in `decode_image`.

    Raises:
        ImageRefError: the reference no longer resolves, reads or decodes.
    """
    location = root.resolve_image(ref, list(TRUSTED_SCHEMES), None)
    return decode_image(read_image_bytes(location, TRUSTED_MAX_BYTES), ref, fit=fit)


def read_listings(root: CatalogRoot) -> pa.Table:
    """Read `listings.parquet`; raise CatalogError if it is missing, not Parquet, or lacks
    a required column. Column *types* are checked per row by the validate step."""
    table = _read_parquet(root, LISTINGS.name)
    _require_columns(table, LISTING_COLUMNS, root, LISTINGS.name)
    return table


def read_queries(root: CatalogRoot) -> pa.Table | None:
    """Read `queries.parquet` if the catalog has one (it is optional)."""
    if not root.exists(QUERIES.name):
        return None
    table = _read_parquet(root, QUERIES.name)
    _require_columns(table, QUERY_COLUMNS, root, QUERIES.name)
    return table


def _read_parquet(root: CatalogRoot, name: str) -> pa.Table:
    data = root.read_bytes(name)
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise CatalogError(
            f"{name} in catalog {root.uri} is not a readable Parquet file: {err}"
        ) from None


def _require_columns(table: pa.Table, required: tuple[str, ...], root: CatalogRoot, name: str):
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise CatalogError(
            f"{name} in catalog {root.uri} lacks required column(s) {missing}; "
            f"it has {table.column_names}"
        )
