"""Validate and featurize read only what changed: an image whose identity (size and mtime;
size and ETag in S3) is the one it had when last read keeps its verdict and content key
without being opened, unless validate.verify_content says to read everything. New
content is always read; content rewritten under the same identity only by verify_content."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import featurize, validate
from components.config import FeaturizeConfig, StepPaths, ValidateConfig
from components.io.manifest import require_run
from components.io.s3 import s3_client
from tests.conftest import listing, png_bytes
from tests.harness.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

TRUSTING = ValidateConfig(
    max_bad_fraction=1.0,
    workers=2,
    min_clean_listings=0,
    require_eval_queries=False,
    verify_content=False,
)
VERIFYING = TRUSTING.model_copy(update={"verify_content": True})
FEATURIZE = FeaturizeConfig(device="cpu", image_size=64, workers=2)


def _reads(paths: StepPaths, step: str) -> dict:
    return require_run(paths.step_dir(step))["reads"]


def _outcome(paths: StepPaths) -> tuple[list, list]:
    out = paths.step_dir("validate")
    clean = pq.read_table(out / "clean.parquet")["listing_id"].to_pylist()
    bad = pq.read_table(out / "quarantine.parquet").select(["listing_id", "reasons"])
    return clean, bad.to_pylist()


@pytest.fixture
def catalog(make_catalog, step_paths):
    """Four listings, one of them with an image that does not decode."""
    rows = [listing(name) for name in ("a", "b", "c")]
    rows.append(listing("broken"))
    root = make_catalog(rows)
    for name, colour in (("a", (250, 0, 0)), ("b", (0, 250, 0)), ("c", (0, 0, 250))):
        (root / "images" / f"{name}.png").write_bytes(png_bytes((40, 40), colour))
    (root / "images" / "broken.png").write_bytes(b"not a picture at all")
    return root, step_paths(root)


def _rewrite(path: Path, data: bytes, keep_identity: bool) -> None:
    """New bytes for an image; with `keep_identity`, of the same size and mtime."""
    before = path.stat()
    if keep_identity:
        assert len(data) == before.st_size
    path.write_bytes(data)
    if keep_identity:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))


def test_a_second_validate_opens_no_image_and_gives_the_same_verdicts(catalog):
    _, paths = catalog
    validate.run(TRUSTING, paths)
    first = _outcome(paths)
    assert _reads(paths, "validate")["images_opened"] == 4

    validate.run(TRUSTING, paths)

    assert _reads(paths, "validate") | {"bytes_read": 0} == {
        "images_opened": 0,
        "bytes_read": 0,
        "images_trusted": 4,
    }
    assert _outcome(paths) == first  # the broken one still quarantined, with its reason
    assert first[1] == [{"listing_id": "broken", "reasons": ["image_undecodable"]}]


def test_an_image_with_new_content_is_read_again(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)

    _rewrite(root / "images" / "a.png", b"now this is broken too", keep_identity=False)
    validate.run(TRUSTING, paths)

    assert _reads(paths, "validate")["images_opened"] == 1
    clean, bad = _outcome(paths)
    assert clean == ["b", "c"] and {row["listing_id"] for row in bad} == {"a", "broken"}


def test_an_image_made_a_link_out_of_the_catalog_is_resolved_again_and_refused(catalog, tmp_path):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    outside = tmp_path / "elsewhere.png"  # the same file, size and mtime, outside
    shutil.copy2(root / "images" / "a.png", outside)
    (root / "images" / "a.png").unlink()
    (root / "images" / "a.png").symlink_to(outside)

    validate.run(TRUSTING, paths)

    clean, bad = _outcome(paths)
    assert "a" not in clean
    assert {"listing_id": "a", "reasons": ["image_path_escapes_root"]} in bad


def test_content_rewritten_under_the_same_identity_is_caught_by_verify_content(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    image = root / "images" / "a.png"
    _rewrite(image, b"x" * image.stat().st_size, keep_identity=True)

    validate.run(TRUSTING, paths)
    assert "a" in _outcome(paths)[0]  # trusted: what the identity rule cannot see

    validate.run(VERIFYING, paths)
    assert "a" not in _outcome(paths)[0]
    assert _reads(paths, "validate")["images_opened"] == 4


def test_other_image_rules_make_every_verdict_be_checked_again(catalog):
    _, paths = catalog
    validate.run(TRUSTING, paths)

    stricter = TRUSTING.model_copy(update={"min_image_side": 41})  # the images are 40 px
    validate.run(stricter, paths)

    assert _reads(paths, "validate")["images_opened"] == 4
    assert _outcome(paths)[0] == []


def _write_listings(root: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), root / "listings.parquet")


def _unchanged(paths: StepPaths) -> int:
    return require_run(paths.step_dir("validate"))["listings_unchanged"]


def test_a_listing_s_verdict_stands_while_its_state_does_and_changes_are_judged_again(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    (root / "images" / "d.png").write_bytes(png_bytes((40, 40), (9, 9, 9)))
    _write_listings(
        root,
        [
            listing("a"),  # unchanged: its verdict stands
            listing("b", title="x" * 600),  # over max_title_chars now
            listing("c"),  # unchanged, but another row takes its id below
            listing("broken"),
            listing("d"),  # new
            listing("c", title="Another c"),
        ],
    )

    validate.run(TRUSTING, paths)
    trusted = _outcome(paths)
    assert _unchanged(paths) == 1  # "a" alone
    validate.run(VERIFYING, paths)  # every row and image checked afresh

    assert trusted == _outcome(paths)
    clean, bad = trusted
    assert clean == ["a", "d"]
    assert [(row["listing_id"], row["reasons"]) for row in bad] == [
        ("b", ["title_too_long"]),
        ("c", ["duplicate_listing_id"]),
        ("broken", ["image_undecodable"]),
        ("c", ["duplicate_listing_id"]),
    ]


def test_other_row_rules_make_every_verdict_be_judged_again(catalog):
    _, paths = catalog
    validate.run(TRUSTING, paths)

    validate.run(TRUSTING.model_copy(update={"max_title_chars": 5}), paths)

    assert _unchanged(paths) == 0
    assert _outcome(paths)[0] == []  # "Title of a" is over 5 characters


def test_the_image_records_of_listings_taken_by_their_state_are_kept(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    validate.run(TRUSTING, paths)  # every clean listing unchanged: none looked up
    assert _unchanged(paths) == 3

    _write_listings(root, [listing("a", title="A new title"), listing("b")])
    validate.run(TRUSTING, paths)

    assert _reads(paths, "validate")["images_opened"] == 0  # a.png's record was kept
    assert _unchanged(paths) == 1
    records = pq.read_table(paths.step_dir("validate") / "image_checks.parquet")
    assert sorted(records["location"].to_pylist()) == ["images/a.png", "images/b.png"]


def test_featurize_reads_only_new_content_and_re_encodes_it(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    featurize.run(FEATURIZE, paths)
    views = paths.step_dir("featurize") / "views.parquet"
    before = pq.read_table(views).to_pylist()
    assert _reads(paths, "featurize")["images_opened"] == 3  # the clean ones

    featurize.run(FEATURIZE, paths)
    assert _reads(paths, "featurize")["images_opened"] == 0
    assert pq.read_table(views).to_pylist() == before  # the same keys, none read

    _rewrite(root / "images" / "b.png", png_bytes((40, 40), (9, 9, 9)), keep_identity=False)
    validate.run(TRUSTING, paths)
    featurize.run(FEATURIZE, paths)

    assert _reads(paths, "featurize")["images_opened"] == 1
    assert require_run(paths.step_dir("featurize"))["images_encoded"] == 1
    after = {(r["listing_id"], r["modality"]): r["key"] for r in pq.read_table(views).to_pylist()}
    was = {(r["listing_id"], r["modality"]): r["key"] for r in before}
    changed = [k for k in was if was[k] != after[k]]
    assert changed == [("b", "image")]


def test_featurize_rehashes_everything_when_validate_verified_content(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    featurize.run(FEATURIZE, paths)
    image = root / "images" / "c.png"
    new = png_bytes((40, 40), (1, 2, 3))
    padded = new + b"\0" * (image.stat().st_size - len(new))  # PNG ignores trailing bytes
    _rewrite(image, padded, keep_identity=True)

    validate.run(VERIFYING, paths)
    featurize.run(FEATURIZE, paths)

    assert _reads(paths, "featurize")["images_opened"] == 3
    assert require_run(paths.step_dir("featurize"))["images_encoded"] == 1  # the new c


def _featurized(paths: StepPaths) -> tuple[int, bytes, list[dict]]:
    """Listings the last featurize took whole, its views file and its rows."""
    out = paths.step_dir("featurize")
    views = out / "views.parquet"
    return require_run(out)["listings_reused"], views.read_bytes(), pq.read_table(views).to_pylist()


def _retitle(root: Path, listing_id: str, title: str) -> None:
    table = pq.read_table(root / "listings.parquet")
    rows = table.to_pylist()
    for row in rows:
        if row["listing_id"] == listing_id:
            row["title"] = title
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "listings.parquet")


def test_featurize_takes_unchanged_listings_whole_and_writes_what_a_full_run_writes(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    featurize.run(FEATURIZE, paths)
    assert _featurized(paths)[0] == 0  # nothing to take yet
    featurize.run(FEATURIZE, paths)
    assert _featurized(paths)[0] == 3  # the clean listings, untouched

    _retitle(root, "a", "A new title")  # a row changed
    _rewrite(root / "images" / "b.png", png_bytes((40, 40), (9, 9, 9)), keep_identity=False)
    validate.run(TRUSTING, paths)
    featurize.run(FEATURIZE, paths)
    reused, data, rows = _featurized(paths)
    assert reused == 1  # c alone
    assert {"listing_id": "a", "view": "title", "ref": "A new title"}.items() <= {
        k: v for r in rows if r["listing_id"] == "a" and r["view"] == "title" for k, v in r.items()
    }.items()

    (paths.step_dir("featurize") / "views_index.parquet").unlink()  # nothing to take from
    featurize.run(FEATURIZE, paths)
    assert _featurized(paths)[:2] == (0, data)  # byte for byte what the full run writes


@pytest.mark.parametrize(
    "change",
    ["views file replaced", "other params", "store file gone"],
)
def test_previous_views_are_not_taken_when_they_cannot_be_trusted(catalog, change):
    _, paths = catalog
    validate.run(TRUSTING, paths)
    featurize.run(FEATURIZE, paths)
    out = paths.step_dir("featurize")
    config = FEATURIZE
    if change == "views file replaced":
        table = pq.read_table(out / "views.parquet")
        pq.write_table(table.slice(1), out / "views.parquet")  # a row lost: not the indexed one
    elif change == "other params":
        config = FEATURIZE.model_copy(update={"text_views": ["title", "tags"]})
    else:
        for vectors in (out / "store").rglob("*.npy"):
            vectors.unlink()

    featurize.run(config, paths)

    reused, _, rows = _featurized(paths)
    assert reused == 0
    assert {r["listing_id"] for r in rows} == {"a", "b", "c"}
    if change == "other params":
        assert {r["view"] for r in rows if r["modality"] == "text"} == {"title", "tags"}


def test_listing_states_written_for_other_clean_rows_are_not_used(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    featurize.run(FEATURIZE, paths)
    states = paths.step_dir("validate") / "listing_state.parquet"
    old = states.read_bytes()
    _retitle(root, "a", "A new title")
    validate.run(TRUSTING, paths)
    states.write_bytes(old)  # left from the run before (say, a write that never finished)

    featurize.run(FEATURIZE, paths)

    reused, _, rows = _featurized(paths)
    assert reused == 0
    assert ("a", "A new title") in {(r["listing_id"], r["ref"]) for r in rows}


def test_a_listing_with_a_skipped_view_is_worked_on_again(catalog):
    root, paths = catalog
    validate.run(TRUSTING, paths)
    (root / "images" / "c.png").unlink()  # gone after validation: featurize skips it
    featurize.run(FEATURIZE, paths)
    (root / "images" / "c.png").write_bytes(png_bytes((40, 40), (0, 0, 250)))

    featurize.run(FEATURIZE, paths)

    reused, _, rows = _featurized(paths)
    assert reused == 2  # a and b; c was tried again and its image found
    assert ("c", "image") in {(r["listing_id"], r["modality"]) for r in rows}


def _upload(root: Path, bucket: str, prefix: str) -> None:
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())


def test_an_s3_catalog_is_listed_and_only_changed_images_are_fetched(
    catalog, s3_endpoint, s3_env, monkeypatch, tmp_path
):
    root, _ = catalog
    _upload(root, "shop", "v1")
    paths = StepPaths(workdir=tmp_path / "s3work", catalog="s3://shop/v1")
    with FaultProxy(s3_endpoint, []) as proxy:  # no faults: it counts what reaches S3
        from components.io.s3 import s3_client as client

        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        client.cache_clear()
        validate.run(TRUSTING, paths)
        featurize.run(FEATURIZE, paths)
        s3_client().put_object(Bucket="shop", Key="v1/images/a.png", Body=png_bytes((40, 40)))
        proxy.log.clear()

        validate.run(TRUSTING, paths)
        featurize.run(FEATURIZE, paths)

        images = [path for method, path, *_ in proxy.log if method == "GET" and "images/" in path]
        heads = [path for method, path, *_ in proxy.log if method == "HEAD"]
        # the catalog's images listed (not the existence checks of queries.parquet)
        lists = [path for method, path, *_ in proxy.log if "list-type=2&prefix=v1%2F&" in path]
    client.cache_clear()
    # a.png changed: validate and featurize each fetch it once; nothing else is fetched
    assert [path.split("?")[0] for path in images] == ["/shop/v1/images/a.png"] * 2
    assert len(lists) == 2 and heads == []  # one LIST of the catalog per step, no HEADs
    assert _reads(paths, "validate")["images_opened"] == 1
    assert _reads(paths, "featurize")["images_opened"] == 1


def test_identities_looked_up_by_threads_or_processes_are_those_of_one_thread(
    tmp_path, monkeypatch
):
    from components.io import image_identity
    from components.io.catalog_reader import CatalogRoot

    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    refs: list[object] = []
    for i in range(40):
        (root / "images" / f"{i}.png").write_bytes(b"x" * (i + 1))
        refs.append(f"images/{i}.png")
    os.symlink(root / "images" / "0.png", root / "images" / "link.png")
    refs += ["images/missing.png", "images/link.png", "/abs.png", "s3://b/k.png", "../up.png", 7]
    identities = image_identity.Identities(CatalogRoot(str(root)))

    def refused(ref):
        raise AssertionError(f"{ref} should not need resolving")

    monkeypatch.setattr(image_identity, "BLOCK", 7)
    monkeypatch.setattr(image_identity, "THREADS", 3)  # parts of 3, 3 and 1
    one_thread = identities.of_refs(refs, refused)
    monkeypatch.setattr(image_identity, "COLD_US", -1.0)  # every block counts as cold
    threads = identities.of_refs(refs, refused)
    monkeypatch.setattr(image_identity, "FORK_AT", 10)
    monkeypatch.setattr(image_identity, "PROCESSES", 3)  # slices of 16, 16 and 14
    processes = identities.of_refs(refs, refused)

    assert threads == one_thread == processes
    assert one_thread[:40] == [
        f"{i + 1}:{(root / 'images' / f'{i}.png').stat().st_mtime_ns}" for i in range(40)
    ]
    assert one_thread[40:] == [None] * 6
