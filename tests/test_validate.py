"""validate: every bad-input class lands in quarantine with its reason; counts always add up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import contract, validate
from components.cli import main
from components.config import ValidateConfig
from components.errors import StepFailed
from components.io import expectations
from components.io.catalog_reader import CatalogError
from tests.conftest import REPO_ROOT, listing, png_bytes, png_claiming

pytestmark = pytest.mark.integration  # runs the real Great Expectations suite


def run_and_read(root: Path, paths_factory, config: ValidateConfig):
    result = validate.run(config, paths_factory(root))
    out = result.out_dir
    clean = pq.read_table(out / contract.CLEAN.name).to_pylist()
    quarantine = pq.read_table(out / contract.QUARANTINE.name).to_pylist()
    report = json.loads((out / contract.VALIDATION_REPORT.name).read_text())
    assert report["clean"] + report["quarantined"] == report["total"]
    assert len(clean) == report["clean"] and len(quarantine) == report["quarantined"]
    return clean, quarantine, report


def reasons_by_id(quarantine: list[dict]) -> dict[str, list[str]]:
    return {row["listing_id"]: row["reasons"] for row in quarantine}


def test_clean_catalog_passes_untouched(make_catalog, step_paths, lenient):
    rows = [listing("a", extra_col=1), listing("b", extra_col=2)]
    root = make_catalog(rows)

    clean, quarantine, report = run_and_read(root, step_paths, lenient)

    assert quarantine == []
    assert clean == rows  # every original column, extra ones included, unchanged
    assert report["reasons"] == {}


def test_duplicate_ids_are_all_quarantined(make_catalog, step_paths, lenient):
    root = make_catalog([listing("a"), listing("b"), listing("a", title="Another")])

    clean, quarantine, report = run_and_read(root, step_paths, lenient)

    assert [r["listing_id"] for r in clean] == ["b"]
    assert [r["row_number"] for r in quarantine] == [0, 2]
    assert all(r["reasons"] == ["duplicate_listing_id"] for r in quarantine)
    assert report["reasons"] == {"duplicate_listing_id": 2}


@pytest.mark.parametrize(
    ("title", "reason"),
    [("", "title_empty"), ("   \t\n", "title_empty"), (None, "title_missing")],
    ids=["empty", "whitespace", "null"],
)
def test_bad_titles(make_catalog, step_paths, lenient, title, reason):
    root = make_catalog([listing("good"), listing("bad", title=title)])

    clean, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert [r["listing_id"] for r in clean] == ["good"]
    assert reasons_by_id(quarantine) == {"bad": [reason]}


def test_no_images(make_catalog, step_paths, lenient):
    root = make_catalog([listing("good"), listing("bad", image_uris=[])])

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {"bad": ["no_images"]}


def test_missing_image_file(make_catalog, step_paths, lenient):
    root = make_catalog(
        [listing("good"), listing("bad", image_uris=["images/nope.png"])], images=False
    )
    (root / "images" / "good.png").write_bytes(png_bytes())

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {"bad": ["image_missing"]}
    assert "image_uris[0]" in quarantine[0]["reason_details"][0]


def test_truncated_png(make_catalog, step_paths, lenient):
    root = make_catalog([listing("good"), listing("bad")])
    data = png_bytes((64, 64))
    (root / "images" / "bad.png").write_bytes(data[: len(data) // 2])

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {"bad": ["image_undecodable"]}


def test_text_file_named_png(make_catalog, step_paths, lenient):
    root = make_catalog([listing("good"), listing("bad")])
    (root / "images" / "bad.png").write_text("this is not an image\n")

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {"bad": ["image_undecodable"]}


def test_bad_auxiliary_image_quarantines_the_row(make_catalog, step_paths, lenient):
    root = make_catalog([listing("bad", image_uris=["images/bad.png", "images/aux.png"])])
    (root / "images" / "aux.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {"bad": ["image_undecodable"]}
    assert quarantine[0]["reason_details"][0].startswith("image_uris[1]")


def test_hostile_headers_are_quarantined_with_reasons_not_a_traceback(
    make_catalog, step_paths, lenient
):
    rows = [listing("good"), listing("bomb"), listing("huge"), listing("wide")]
    root = make_catalog(rows)
    (root / "images" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (root / "images" / "huge.png").write_bytes(png_claiming(12_000, 12_000))
    (root / "images" / "wide.png").write_bytes(png_claiming(9_000, 100))

    clean, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert [r["listing_id"] for r in clean] == ["good"]
    assert reasons_by_id(quarantine) == {
        "bomb": ["image_bomb"],
        "huge": ["image_bomb"],  # 144M pixels: past Pillow's limit before max_image_side
        "wide": ["image_too_large"],
    }
    assert "9000x100 > max_image_side 8192" in reasons_by_id_details(quarantine)["wide"][0]


def reasons_by_id_details(quarantine: list[dict]) -> dict[str, list[str]]:
    return {row["listing_id"]: row["reason_details"] for row in quarantine}


def test_image_too_small(make_catalog, step_paths, lenient):
    root = make_catalog([listing("good"), listing("bad")])
    (root / "images" / "bad.png").write_bytes(png_bytes((4, 4)))

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {"bad": ["image_too_small"]}


def test_path_escaping_the_root(make_catalog, step_paths, lenient, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes())  # exists and decodes: only its location is wrong
    rows = [
        listing("good"),
        listing("dotdot", image_uris=["../outside.png"]),
        listing("absolute", image_uris=[str(outside)]),
        listing("symlink", image_uris=["images/link.png"]),
    ]
    root = make_catalog(rows, images=False)
    (root / "images" / "good.png").write_bytes(png_bytes())
    os.symlink(outside, root / "images" / "link.png")

    clean, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert [r["listing_id"] for r in clean] == ["good"]
    assert reasons_by_id(quarantine) == {
        "dotdot": ["image_path_escapes_root"],
        "absolute": ["image_path_escapes_root"],
        "symlink": ["image_path_escapes_root"],
    }


def test_disallowed_uri_scheme_and_bucket(make_catalog, step_paths, lenient):
    rows = [
        listing("good"),
        listing("http", image_uris=["http://example.com/a.png"]),
        listing("bucket", image_uris=["s3://other-bucket/a.png"]),
    ]
    root = make_catalog(rows)
    config = lenient.model_copy(update={"allowed_buckets": ["ours"]})

    _, quarantine, _ = run_and_read(root, step_paths, config)

    assert reasons_by_id(quarantine) == {
        "http": ["image_scheme_not_allowed"],
        "bucket": ["image_bucket_not_allowed"],
    }


def test_file_uri_is_allowed(make_catalog, step_paths, lenient, tmp_path):
    elsewhere = tmp_path / "shared" / "pic.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(png_bytes())
    root = make_catalog([listing("a", image_uris=[elsewhere.as_uri()])])

    clean, _, _ = run_and_read(root, step_paths, lenient)

    assert [r["listing_id"] for r in clean] == ["a"]


def test_non_list_tags(make_catalog, step_paths, lenient):
    root = make_catalog([listing("a", tags="red, shiny"), listing("b", tags="blue")])

    _, quarantine, report = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {
        "a": ["tags_not_list_of_strings"],
        "b": ["tags_not_list_of_strings"],
    }
    assert report["reasons"] == {"tags_not_list_of_strings": 2}


def test_wrong_column_types(make_catalog, step_paths, lenient):
    schema = pa.schema(
        [
            ("listing_id", pa.int64()),
            ("title", pa.int64()),
            ("description", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("category", pa.string()),
            ("image_uris", pa.list_(pa.string())),
        ]
    )
    rows = [
        {
            "listing_id": 1,
            "title": 7,
            "description": None,
            "tags": [],
            "category": None,
            "image_uris": ["images/one.png"],
        },
    ]
    root = make_catalog(rows, schema=schema)

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert quarantine[0]["reasons"] == ["listing_id_not_string", "title_not_string"]


def test_one_megabyte_description(make_catalog, step_paths, lenient):
    root = make_catalog([listing("good"), listing("bad", description="x" * 1_000_000)])

    _, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert reasons_by_id(quarantine) == {"bad": ["description_too_long"]}


def test_unusual_valid_text_is_kept(make_catalog, step_paths, lenient):
    rows = [
        listing("emoji", title="🎅 Santa mug ☕", tags=["🎄", "noël"]),
        listing("accents", title="Crème brûlée ramekin, façade Ærø", description="Ça marche"),
        listing("cjk", title="手作りの陶器マグカップ", category="キッチン > マグ"),
        listing("rtl", title="فنجان قهوة", description=None, tags=[], category=None),
    ]
    root = make_catalog(rows)

    clean, quarantine, _ = run_and_read(root, step_paths, lenient)

    assert quarantine == []
    assert [r["title"] for r in clean] == [r["title"] for r in rows]


def test_too_many_bad_rows_fails_with_fraction_and_reasons(make_catalog, step_paths):
    rows = [listing("a"), listing("b", title=""), listing("c", title=" "), listing("d")]
    root = make_catalog(rows)

    with pytest.raises(StepFailed) as failure:
        validate.run(ValidateConfig(max_bad_fraction=0.25), step_paths(root))

    message = str(failure.value)
    assert "50.00%" in message and "25.00%" in message and "title_empty (2)" in message
    report = json.loads((step_paths(root).step_dir("validate") / "report.json").read_text())
    assert report["passed"] is False and report["quarantined"] == 2


def test_queries_pointing_at_quarantined_listings_are_quarantined(
    make_catalog, step_paths, lenient
):
    root = make_catalog([listing("good"), listing("bad", title="")])
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"query_id": "q1", "query": "fine thing", "listing_id": "good"},
                {"query_id": "q2", "query": "other", "listing_id": "bad"},
                {"query_id": "q3", "query": " ", "listing_id": "good"},
            ]
        ),
        root / "queries.parquet",
    )

    result = validate.run(lenient, step_paths(root))

    kept = pq.read_table(result.out_dir / contract.CLEAN_QUERIES.name).to_pylist()
    dropped = pq.read_table(result.out_dir / contract.QUARANTINED_QUERIES.name).to_pylist()
    assert [q["query_id"] for q in kept] == ["q1"]
    assert {q["query_id"]: q["reasons"] for q in dropped} == {
        "q2": ["listing_not_clean"],
        "q3": ["query_empty"],
    }
    assert result.report["queries"]["clean"] + result.report["queries"]["quarantined"] == 3


def test_not_parquet_is_a_clear_error(tmp_path, step_paths, lenient):
    root = tmp_path / "catalog"
    root.mkdir()
    (root / "listings.parquet").write_text("listing_id,title\n1,mug\n")

    with pytest.raises(CatalogError, match="not a readable Parquet file"):
        validate.run(lenient, step_paths(root))


def test_missing_column_is_a_clear_error(make_catalog, step_paths, lenient):
    row = listing("a")
    del row["image_uris"]
    root = make_catalog([row])

    with pytest.raises(CatalogError, match=r"lacks required column\(s\) \['image_uris'\]"):
        validate.run(lenient, step_paths(root))


def test_cli_exit_codes_name_the_problem(make_catalog, tmp_path, capsys):
    bad_root = make_catalog([listing("a", title=""), listing("b")], name="bad")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "listings.parquet").write_bytes(b"PAR1 not really")
    base = ["validate", "--params", str(REPO_ROOT / "params.yaml")]
    work = ["--set", f"paths.workdir={tmp_path / 'work'}"]

    failed = main([*base, *work, "--set", f"paths.catalog={bad_root}"])
    failed_err = capsys.readouterr().err
    unreadable = main([*base, *work, "--set", f"paths.catalog={broken}"])
    unreadable_err = capsys.readouterr().err

    assert failed == 1 and "50.00%" in failed_err and "title_empty" in failed_err
    assert unreadable == 1 and "not a readable Parquet file" in unreadable_err
    assert "Traceback" not in unreadable_err


def _queries(root: Path, listing_ids: list[str]) -> None:
    rows = [{"query_id": f"q-{i}", "query": f"thing {i}", "listing_id": i} for i in listing_ids]
    pq.write_table(pa.Table.from_pylist(rows), root / "queries.parquet")


def test_a_catalog_without_listings_fails_in_one_line_before_featurize(
    make_catalog, tmp_path, capsys
):
    schema = pa.Table.from_pylist([listing("a")]).schema
    root = make_catalog([], schema=schema)
    work = tmp_path / "work"

    code = main(["validate", "--set", f"paths.catalog={root}", "--set", f"paths.workdir={work}"])

    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and "Traceback" not in err
    assert line.endswith(f"{root}/listings.parquet has no listings: nothing to train on")
    assert json.loads((work / "validate" / "report.json").read_text())["total"] == 0


def test_fewer_clean_listings_than_training_needs_fails_naming_the_param(make_catalog, step_paths):
    ids = ["a", "b", "c", "d"]
    root = make_catalog([*(listing(i) for i in ids), listing("e", title="")])
    _queries(root, ids)

    config = ValidateConfig(max_bad_fraction=0.5, min_clean_listings=5)

    with pytest.raises(StepFailed) as failure:
        validate.run(config, step_paths(root))

    assert str(failure.value).startswith("4 clean listings of 5 in ")
    assert "training needs at least validate.min_clean_listings=5" in str(failure.value)
    assert validate.run(config.model_copy(update={"min_clean_listings": 4}), step_paths(root))


def test_no_query_and_no_photo_to_hold_out_fails_naming_both(make_catalog, step_paths):
    ids = ["a", "b", "c"]
    root = make_catalog([listing(i, image_uris=[f"images/{i}.png", "images/x.png"]) for i in ids])
    config = ValidateConfig(workers=2, min_clean_listings=3)

    with pytest.raises(StepFailed) as failure:
        validate.run(config, step_paths(root))

    assert "queries.parquet is absent) and no clean listing with 3+ photos" in str(failure.value)
    _queries(root, ["b"])  # one query is enough for a task to exist
    assert validate.run(config, step_paths(root)).report["queries"]["clean"] == 1


def test_listings_with_three_photos_are_test_queries_enough(make_catalog, step_paths):
    photos = [f"images/p{n}.png" for n in range(3)]
    root = make_catalog([listing(i, image_uris=photos) for i in "abc"])

    result = validate.run(ValidateConfig(workers=2, min_clean_listings=3), step_paths(root))

    assert result.report["clean"] == 3 and result.report["queries"] is None


def _frame_cell_by_cell(table: pa.Table) -> dict[str, list]:
    """What the validation frame holds, derived from each cell's Python value."""
    cells = {name: table.column(name).to_pylist() for name in table.column_names}

    def text(value):
        return value if isinstance(value, str) else None

    def size(value, kind):
        return len(value) if isinstance(value, kind) else 0

    def longest(value):
        if not isinstance(value, list):
            return 0
        return max((len(v) for v in value if isinstance(v, str)), default=0)

    frame = {}
    for name in ("listing_id", "title"):
        frame[name] = [text(v) for v in cells[name]]
        frame[f"{name}_type"] = [expectations.type_name(v) for v in cells[name]]
    for name in ("description", "category"):
        frame[f"{name}_type"] = [expectations.type_name(v) for v in cells[name]]
        frame[f"{name}_chars"] = [size(v, str) for v in cells[name]]
    frame["tags_type"] = [expectations.type_name(v) for v in cells["tags"]]
    frame["tag_count"] = [size(v, list) for v in cells["tags"]]
    frame["longest_tag_chars"] = [longest(v) for v in cells["tags"]]
    frame["image_uris_type"] = [expectations.type_name(v) for v in cells["image_uris"]]
    frame["image_count"] = [size(v, list) for v in cells["image_uris"]]
    return frame


@pytest.mark.parametrize("typed", ["contract", "other types"])
def test_the_validation_frame_is_what_each_cell_says_over_chunks_slices_and_nulls(typed):
    """The frame is built by Arrow over whole columns (1M listings: seconds, not the
    minutes of a Python loop); it must say of every cell what the cell's value says."""
    rows = {
        "listing_id": ["a", None, "", "é" * 3, "d", "e"],
        "title": ["Mug", "", None, "ü" * 5, "x", "y"],
        "description": [None, "long " * 3, "", "ß", None, "z"],
        "tags": [["a", "bcd"], [], None, ["x", None, "ééé"], [None], ["ok"]],
        "category": ["Home", None, "", "Ö", "c", None],
        "image_uris": [["p/1.png"], None, [], ["p/2.png", None], ["p/3.png"] * 3, ["q"]],
    }
    if typed == "other types":
        rows |= {"title": [1, 2, None, 4, 5, 6], "tags": [[1], [], None, [2, 3], [], None]}
    table = pa.Table.from_pydict(rows)
    chunked = pa.concat_tables([table.slice(0, 2), table.slice(2, 3), table.slice(5)])
    for candidate in (table, chunked, chunked.slice(1, 4)):
        expected = pd.DataFrame(_frame_cell_by_cell(candidate))
        pd.testing.assert_frame_equal(expectations.validation_frame(candidate), expected)


def test_image_lists_read_in_arrow_are_those_read_value_by_value():
    from components.io import expectations
    from components.validate import ImageLists

    def lists(column):
        found = ImageLists.of(column)
        assert found.at.tolist() == list(range(len(found.refs)))
        return found.rows, found.refs, found.counts

    values = [["a", "b"], None, [], ["x", None], ["c"], [None], ["d", "e", "f"]]
    typed = pa.chunked_array(
        [pa.array(values[:3], pa.list_(pa.string())), pa.array(values[3:], pa.list_(pa.string()))]
    )
    rows = [
        row
        for row, value in enumerate(values)
        if expectations.type_name(value) == expectations.STRING_LIST and value
    ]
    by_value = (rows, [ref for row in rows for ref in values[row]], [len(values[r]) for r in rows])

    assert lists(typed) == by_value == ([0, 4, 6], list("abcdef"), [2, 1, 3])
    assert lists(typed.slice(2, 4)) == ([2], ["c"], [1])  # rows of the slice
    # any other type (here a large list) is read value by value, to the same answer
    large = pa.chunked_array([pa.array(values, pa.large_list(pa.string()))])
    assert lists(large) == by_value


def test_the_image_lists_of_some_rows_say_where_their_references_were():
    from components.validate import ImageLists

    values = [["a", "b"], None, ["c"], ["d", "e", "f"], ["g"]]
    every = ImageLists.of(pa.chunked_array([pa.array(values, pa.list_(pa.string()))]))

    some = every.of_rows(np.array([0, 1, 3]))  # row 1 has no list

    assert (some.rows, some.refs, some.counts) == ([0, 3], ["a", "b", "d", "e", "f"], [2, 3])
    assert [every.refs[i] for i in some.at] == some.refs
    assert every.of_rows(np.array([], np.int64)).refs == []
