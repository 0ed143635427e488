"""Catalog I/O: local and s3:// roots, image references resolved inside the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from components import validate
from components.io.catalog_reader import (
    CatalogError,
    CatalogRoot,
    read_image_bytes,
    read_listings,
    read_queries,
)
from components.io.images import ImageRefError, decode_image
from components.io.s3 import s3_client
from tests.conftest import listing, png_bytes

ALLOWED = ["file", "s3"]


def test_relative_paths_resolve_inside_a_local_root(tmp_path):
    root = CatalogRoot(str(tmp_path))

    location = root.resolve_image("images/a/b.png", ALLOWED, None)

    assert location.path == (tmp_path / "images/a/b.png").resolve()


@pytest.mark.parametrize("ref", ["../x.png", "images/../../x.png", "/etc/passwd"])
def test_escaping_paths_are_refused_locally(tmp_path, ref):
    with pytest.raises(ImageRefError) as error:
        CatalogRoot(str(tmp_path)).resolve_image(ref, ALLOWED, None)

    assert error.value.code == "image_path_escapes_root"


@pytest.mark.parametrize("ref", ["../x.png", "a/../../x.png", "/abs/x.png"])
def test_escaping_paths_are_refused_under_s3(ref):
    with pytest.raises(ImageRefError) as error:
        CatalogRoot("s3://bucket/catalog").resolve_image(ref, ALLOWED, None)

    assert error.value.code == "image_path_escapes_root"


def test_s3_relative_and_absolute_references():
    root = CatalogRoot("s3://bucket/catalog")

    relative = root.resolve_image("images/../images/a.png", ALLOWED, None)
    absolute = root.resolve_image("s3://other/x%20y.png", ALLOWED, ["other"])

    assert (relative.bucket, relative.key) == ("bucket", "catalog/images/a.png")
    assert (absolute.bucket, absolute.key) == ("other", "x y.png")


@pytest.mark.parametrize(
    ("ref", "code"),
    [
        ("ftp://host/a.png", "image_scheme_not_allowed"),
        ("s3://elsewhere/a.png", "image_bucket_not_allowed"),
        ("file://remote-host/a.png", "image_uri_invalid"),
        ("", "image_uri_invalid"),
        (3, "image_uri_invalid"),
    ],
)
def test_bad_references_have_a_reason(tmp_path, ref, code):
    with pytest.raises(ImageRefError) as error:
        CatalogRoot(str(tmp_path)).resolve_image(ref, ALLOWED, ["mine"])

    assert error.value.code == code


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes((64, 64)))
    location = CatalogRoot(str(tmp_path)).resolve_image("big.png", ALLOWED, None)

    with pytest.raises(ImageRefError) as error:
        read_image_bytes(location, max_bytes=10)

    assert error.value.code == "image_too_large"


def test_decode_flattens_transparency_to_rgb():
    image = decode_image(png_bytes((20, 10)), "x.png")

    assert image.mode == "RGB" and image.size == (20, 10)


def test_missing_listings_file_names_it(tmp_path):
    with pytest.raises(CatalogError, match="listings.parquet not found"):
        read_listings(CatalogRoot(str(tmp_path)))
    assert read_queries(CatalogRoot(str(tmp_path))) is None


def _upload_catalog(root: Path, bucket: str, prefix: str) -> None:
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(
            Bucket=bucket,
            Key=f"{prefix}/{path.relative_to(root).as_posix()}",
            Body=path.read_bytes(),
        )


@pytest.mark.integration
def test_validate_reads_a_catalog_from_s3(s3_env, make_catalog, step_paths, lenient):
    rows = [
        listing("a"),
        listing("b", image_uris=["images/b.png", "s3://shared-images/c.png"]),
        listing("missing", image_uris=["images/gone.png"]),
        listing("escape", image_uris=["../../other/x.png"]),
    ]
    local = make_catalog(rows, images=False)
    for name in ("a", "b"):
        (local / "images" / f"{name}.png").write_bytes(png_bytes())
    _upload_catalog(local, "catalogs", "shop/v1")
    s3_client().create_bucket(Bucket="shared-images")
    s3_client().put_object(Bucket="shared-images", Key="c.png", Body=png_bytes())

    result = validate.run(lenient, step_paths("s3://catalogs/shop/v1"))

    assert result.report["clean"] == 2
    assert result.report["reasons"] == {"image_missing": 1, "image_path_escapes_root": 1}


@pytest.mark.integration
def test_missing_s3_catalog_file_is_named(s3_env):
    s3_client().create_bucket(Bucket="empty")

    with pytest.raises(CatalogError, match="listings.parquet not found in catalog s3://empty/x"):
        read_listings(CatalogRoot("s3://empty/x"))
