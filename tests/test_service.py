"""The search service over a small promoted release: the API, hostile requests, and
releases that swap (a promotion, a rollback, a broken release) while it serves."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from components import evaluate, index, promote
from components.config import IndexConfig, PromoteConfig, load_params
from components.release import production
from components.release.storage import open_storage
from components.service.app import Metrics, create_app
from components.service.filters import parts
from components.service.server import build
from tests.conftest import REPO_ROOT, png_claiming
from tests.harness.browser import browser_or_skip, chrome, require_browser
from tests.test_promote import EVALUATE, copy_of, evaluated_once  # noqa: F401  (a fixture)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(evaluated_once, tmp_path_factory):  # noqa: F811
    evaluated = copy_of(evaluated_once, tmp_path_factory.mktemp("service") / "work")
    promote.run(PromoteConfig(), evaluated)
    params = _serve_params(evaluated)
    app, keeper = build(params, evaluated.mlflow_uri, tmp_path_factory.mktemp("releases"))
    with TestClient(app) as client:
        yield client, keeper, evaluated


def _serve_params(paths):
    return load_params(
        REPO_ROOT / "params.yaml",
        [
            f"paths.workdir={paths.workdir}",
            f"paths.catalog={paths.catalog}",
            "serve.device=cpu",
            "serve.max_upload_mb=1",
            "serve.photo_warm=false",  # the tests of photos see their encoder start
        ],
    )


def _catalog_rows(paths) -> list[dict]:
    return pq.read_table(f"{paths.catalog}/listings.parquet").to_pylist()


def test_text_search_finds_a_listing_by_its_title(service):
    client, keeper, paths = service
    row = _catalog_rows(paths)[7]

    answer = client.get("/search", params={"q": row["title"], "k": 10})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["release"] == keeper.current.version and len(body["results"]) == 10
    assert row["listing_id"] in [hit["listing_id"] for hit in body["results"]]
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)
    first = body["results"][0]
    assert first["title"] and first["photo_url"].startswith("/photos/")
    assert "facets" not in body  # only when asked: they cost a deeper search
    asked = client.get("/search", params={"q": row["title"], "k": 10, "facets": True}).json()
    assert 0 < sum(asked["facets"].values()) <= 100 and asked["results"] == body["results"]
    assert client.get(first["photo_url"]).status_code == 200


def test_photo_search_finds_the_listing_of_the_photo(service):
    client, _, paths = service
    row = _catalog_rows(paths)[3]
    data = (REPO_ROOT / paths.catalog / row["image_uris"][0]).read_bytes()

    answer = client.post("/search/image", files={"photo": ("mine.png", data, "image/png")})

    assert answer.status_code == 200, answer.text
    assert row["listing_id"] in [hit["listing_id"] for hit in answer.json()["results"][:5]]


def test_similar_listings_leave_out_the_listing_itself(service):
    client, _, paths = service
    listing_id = _catalog_rows(paths)[0]["listing_id"]

    answer = client.get(f"/listings/{listing_id}/similar", params={"k": 5})

    hits = [hit["listing_id"] for hit in answer.json()["results"]]
    assert answer.status_code == 200 and len(hits) == 5 and listing_id not in hits
    # it names the listing it is like, as a shared address does not
    assert answer.json()["title"] == _catalog_rows(paths)[0]["title"]
    missing = client.get("/listings/no-such-listing/similar")
    assert missing.status_code == 404 and "no-such-listing" in missing.json()["detail"]


def _exact_filtered(keeper, query_vector, category: str, k: int) -> list[str]:
    """The k best listings under `category` by brute force over the index's vectors."""
    served = keeper.current
    key = parts(category)
    ids = [
        i
        for i, listing in served.listings.items()
        if i in served.labels.label_of and parts(listing.category or "")[: len(key)] == key
    ]
    vectors = np.stack([served.vector_of(i)[0] for i in ids])
    order = np.argsort(-(vectors @ query_vector[0]), kind="stable")[:k]
    return [ids[j] for j in order]


@pytest.mark.parametrize("endpoint", ["text", "photo", "similar"])
def test_a_category_filter_keeps_k_results_all_under_it(service, endpoint):
    """Each search endpoint with a top-level category (broad: over-fetch) and a
    subcategory (selective: restricted): k results, every one under the category, the
    same listings as exact search among that category's listings; facets count the top
    hits without the filter; /metrics says which strategy ran."""
    client, keeper, paths = service
    rows = _catalog_rows(paths)
    row = rows[11]
    top, sub = row["category"].split(" > ")[0], row["category"]
    category_of = {r["listing_id"]: r["category"] for r in rows}
    for category in (top, sub):
        matching = sum(1 for c in category_of.values() if c.startswith(category))
        k = min(10, matching)
        if endpoint == "text":
            answer = client.get(
                "/search",
                params={"q": "smiling red", "k": k, "category": category, "facets": True},
            )
            query = keeper.current.embedder.texts(["smiling red"])
        elif endpoint == "photo":
            data = (REPO_ROOT / paths.catalog / row["image_uris"][0]).read_bytes()
            answer = client.post(
                "/search/image",
                params={"k": k, "category": category, "facets": True},
                files={"photo": ("p.png", data, "image/png")},
            )
            query = None
        else:
            answer = client.get(
                f"/listings/{row['listing_id']}/similar",
                params={"k": k, "category": category, "facets": True},
            )
            query = keeper.current.vector_of(row["listing_id"])
        assert answer.status_code == 200, answer.text
        body = answer.json()
        found = [hit["listing_id"] for hit in body["results"]]
        assert body["category"] == [category]
        assert body["searched"] == matching  # the listings ranked: the category's
        assert all(category_of[i].startswith(category) for i in found), found
        expected = k - 1 if endpoint == "similar" and matching == k else k
        assert len(found) == expected
        if query is not None:
            exact = [i for i in _exact_filtered(keeper, query, category, k + 1)]
            exact = [i for i in exact if i != row["listing_id"] or endpoint != "similar"][:expected]
            assert found == exact
        assert sum(body["facets"].values()) == min(
            100, keeper.current.size - (endpoint == "similar")
        )
        assert set(body["facets"]) <= {c.split(" > ")[0] for c in category_of.values()}
    shares = {c: sum(v.startswith(c) for v in category_of.values()) / len(rows) for c in (top, sub)}
    metrics = client.get("/metrics").text
    for share in shares.values():
        strategy = "overfetch" if share >= 0.25 else "restricted"
        assert f'search_filter_strategy_total{{strategy="{strategy}"}}' in metrics


def test_several_categories_match_any_and_case_and_spaces_do_not_matter(service):
    client, _, paths = service
    rows = _catalog_rows(paths)
    tops = sorted({r["category"].split(" > ")[0] for r in rows})[:2]
    written = [tops[0].upper(), tops[1].replace(" ", "  ")]
    matching = sum(r["category"].split(" > ")[0] in tops for r in rows)

    answer = client.get("/search", params={"q": "flag", "k": 100, "category": written})

    assert answer.status_code == 200, answer.text
    assert answer.json()["category"] == tops
    found = {r["listing_id"]: r["category"] for r in rows}
    hits = [found[h["listing_id"]].split(" > ")[0] for h in answer.json()["results"]]
    assert len(hits) == matching and set(hits) == set(tops)  # all of them, from both


def test_errors_name_no_server_path_object_or_echoed_input(service):
    client, _, paths = service

    upload = client.post("/search/image", files={"photo": ("a.png", b"not an image")})
    bomb = client.post("/search/image", files={"photo": ("b.png", png_claiming(10**5, 10**5))})
    missing = client.get("/photos/images/none.png")
    long_query = client.get("/search", params={"q": "a" * 600})

    assert "object at 0x" not in upload.json()["detail"]
    assert "not an image format" in upload.json()["detail"]
    assert "89,478,485" in bomb.json()["detail"]  # the limit docs/data.md names (89.5 M)
    assert str(paths.catalog) not in missing.json()["detail"]
    assert missing.json()["detail"] == "image_missing: 'images/none.png' is not served"
    assert long_query.status_code == 422 and "aaaa" not in long_query.json()["detail"]


def test_photos_are_served_from_the_catalog_root_only(service):
    client, _, paths = service
    ref = _catalog_rows(paths)[0]["image_uris"][0]

    photo = client.get(f"/photos/{ref}")

    assert photo.status_code == 200 and photo.headers["content-type"] == "image/png"
    assert "max-age" in photo.headers["cache-control"]
    escapes = ("..%2F..%2F..%2F..%2Fetc%2Fhosts.png", "%2Fetc%2Fx.png")  # reach the route
    for bad in escapes:
        refused = client.get(f"/photos/{bad}")
        # outside the root is, to a client, not there (the detail says why)
        assert refused.status_code == 404 and "image_path_escapes_root" in refused.text, bad
    for bad in ("../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        refused = client.get(f"/photos/{bad}")
        assert refused.status_code == 404, bad
        assert "root:" not in refused.text  # never the file's content
    assert client.get("/photos/images/none.png").status_code == 404
    outside = Path(paths.catalog) / "images" / "outside.png"
    outside.symlink_to("/etc/hostname")
    try:
        escaped = client.get("/photos/images/outside.png")
        assert escaped.status_code == 404 and "image_path_escapes_root" in escaped.text
    finally:
        outside.unlink()


def test_health_version_and_metrics(service):
    client, keeper, _ = service
    client.get("/search", params={"q": "heart"})

    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "release": keeper.current.version}
    version = client.get("/version").json()
    assert version["release"] == keeper.current.version and version["model"]["version"] == "1"
    assert "query_to_listing/recall@10" in version["metrics"]
    metrics = client.get("/metrics").text
    assert 'search_requests_total{endpoint="/search",status="200"}' in metrics
    assert f'search_release_info{{model_version="1",version="{keeper.current.version}"}} 1.0' in (
        metrics
    )
    assert "search_request_seconds_bucket" in metrics


def test_a_request_that_fails_before_answering_is_measured_as_a_500():
    """The measuring middleware counts every request by route and status, one whose
    handler raised (answered 500 further out) and one no route matched included."""
    from fastapi import FastAPI
    from prometheus_client import generate_latest

    from components.service.app import Measured

    metrics = Metrics()
    app = FastAPI()
    app.add_middleware(Measured, metrics=metrics)

    @app.get("/broken/{part}")
    def broken(part: str) -> dict:
        raise RuntimeError(f"{part} not answered")

    @app.get("/fine")
    def fine() -> dict:
        return {}

    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/broken/x").status_code == 500
    assert client.get("/fine").status_code == 200
    assert client.get("/nowhere").status_code == 404
    counted = generate_latest(metrics.registry).decode()
    assert 'search_requests_total{endpoint="/broken/{part}",status="500"} 1.0' in counted
    assert 'search_errors_total{endpoint="/broken/{part}"} 1.0' in counted
    assert 'search_request_seconds_count{endpoint="/broken/{part}"} 1.0' in counted
    assert 'search_requests_total{endpoint="/fine",status="200"} 1.0' in counted
    assert 'search_requests_total{endpoint="unmatched",status="404"} 1.0' in counted


def test_a_removal_applied_by_the_service_is_logged_and_counted(service, caplog):
    from components.release import tombstones

    client, keeper, _ = service
    gone = keeper.current.labels.listing_of[0]
    tombstones.write(keeper.storage, [gone], "sold")
    try:
        with caplog.at_level("INFO", logger="components.service.releases"):
            keeper.refresh()  # the next poll

        assert f"1 listing(s) taken out of search by removals ({gone})" in caplog.text
        metrics = client.get("/metrics").text
        assert "search_removed_listings 1.0" in metrics
        assert 'search_release_loads_total{outcome="removals"} 1.0' in metrics
    finally:
        tombstones.restore(keeper.storage, [gone], "test over")
        keeper.refresh()
    assert "search_removed_listings 0.0" in client.get("/metrics").text


@pytest.mark.parametrize(
    ("request_", "status", "says"),
    [
        (("get", "/search", {"params": {"q": "x" * 60_000}}), 422, "500 characters"),
        (("get", "/search", {"params": {"q": "heart", "k": 0}}), 422, "greater than or equal"),
        (("get", "/search", {"params": {"q": "heart", "k": -1}}), 422, "greater than or equal"),
        (("get", "/search", {"params": {"q": "heart", "k": 10**9}}), 422, "less than or equal"),
        (("get", "/search", {"params": {"q": "   "}}), 422, "blank"),
        (("get", "/search", {}), 422, "Field required"),
        (
            (
                "post",
                "/search/image",
                {"files": {"photo": ("a.png", b"not an image", "image/png")}},
            ),
            422,
            "image_undecodable",
        ),
        (
            ("post", "/search/image", {"files": {"photo": ("b.png", png_claiming(10**5, 10**5))}}),
            413,
            "image_bomb",
        ),
        (
            ("post", "/search/image", {"files": {"photo": ("c.png", b"\0" * (2 << 20))}}),
            413,
            "larger than 1.0 MB",
        ),
        (("post", "/search/image", {}), 422, "Field required"),
        (("get", "/search", {"params": {"q": "heart", "category": ""}}), 422, "category.0: String"),
        (
            ("get", "/search", {"params": {"q": "heart", "category": "x" * 5000}}),
            422,
            "5000 characters",
        ),
        (
            (
                "get",
                "/search",
                {"params": {"q": "heart", "category": [f"c{i}" for i in range(3000)]}},
            ),
            422,
            "3000 values, at most 20",
        ),
        (
            ("get", "/search", {"params": {"q": "heart", "category": "Smileys & Emotions"}}),
            422,
            "nearest: 'Smileys & Emotion'",
        ),
        (
            ("get", "/listings/emoji-1f600/similar", {"params": {"category": "Nope"}}),
            422,
            "'Nope' is not a category",
        ),
        (
            (
                "post",
                "/search/image",
                {"params": {"category": "Flagz"}, "files": {"photo": ("a.png", b"x", "image/png")}},
            ),
            422,
            "nearest: 'Flags'",
        ),
    ],
    ids=[
        "1MB-query",
        "k0",
        "k-1",
        "k1e9",
        "blank",
        "no-q",
        "not-image",
        "bomb",
        "oversize",
        "none",
        "category-empty",
        "category-long",
        "category-3000",
        "category-unknown",
        "similar-unknown",
        "photo-unknown",
    ],
)
def test_hostile_requests_are_a_4xx_with_a_message(service, request_, status, says):
    client, _, _ = service
    method, url, kwargs = request_

    answer = getattr(client, method)(url, **kwargs)

    assert answer.status_code == status, answer.text[:300]
    assert says in answer.text


def test_releases_swap_on_promotion_and_rollback_and_a_broken_one_is_not_served(service):
    client, keeper, paths = service
    first = keeper.current.version
    store = open_storage(paths.storage, paths.storage_uri)
    try:
        index.run(IndexConfig(factory="HNSW16"), paths)  # other content: a new release
        evaluate.run(EVALUATE, paths)
        second = promote.run(PromoteConfig(), paths).version

        assert keeper.refresh() is True
        assert client.get("/version").json()["release"] == second != first
        assert client.get("/search", params={"q": "heart"}).json()["release"] == second

        promote.rollback(paths, None)
        assert keeper.refresh() is True and keeper.current.version == first

        promote.rollback(paths, second)  # forward again, but its index is damaged in the store
        stored = production.read_manifest(store, second)["files"]["index.faiss"]
        key = production.file_key(second, "index.faiss", stored)
        store.put_bytes(key, store.get_bytes(key)[:-4] + b"XXXX")
        for leftover in (keeper.cache_dir / second).glob("*"):
            leftover.unlink()  # no clean local copy either

        assert keeper.refresh() is False
        assert keeper.current.version == first  # still serving the previous release
        assert "corrupted" in keeper.last_error
        assert client.get("/readyz").status_code == 200
        assert 'search_release_loads_total{outcome="failed"}' in client.get("/metrics").text
    finally:
        index.run(IndexConfig(), paths)
        evaluate.run(EVALUATE, paths)


@pytest.fixture
def live_url(service):
    """An app of the service's release keeper behind a real uvicorn server on 127.0.0.1, in
    a thread: an app of its own, since a server's shutdown ends its app's lifespan."""
    import uvicorn

    _, keeper, paths = service
    app = create_app(_serve_params(paths).serve, keeper, Metrics())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


SCREENSHOTS = REPO_ROOT / "build" / "screenshots"


SCHEMATHESIS_CONFIG = REPO_ROOT / "tests" / "harness" / "schemathesis.toml"


def test_the_api_is_what_its_openapi_document_says(live_url, tmp_path):
    """schemathesis (pinned in the lock) against the running service's own /openapi.json:
    every check, a fixed seed, 100 examples an operation. No undocumented status, content
    type or body, every error in the one `Problem` body, no schema-valid request refused
    (but the two kinds tests/harness/schemathesis.toml names), no server error. A client
    generated from the document handles every answer."""
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--no-color",
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "run",
        f"{live_url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "100",
        "--seed",
        "1",
    ]
    # its example database goes to a folder of the test's own, not the repository
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


@pytest.fixture(scope="session")
def browser():
    """Before the service is built: a skip costs nothing."""
    require_browser()


@pytest.mark.parametrize("required", [False, True])
def test_a_missing_browser_skips_unless_required_then_fails_naming_it(required):
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match="needs chromedriver"):
        browser_or_skip("/usr/bin/chromium", None, required)


def test_the_page_in_a_real_browser_searches_by_text_and_by_photo(browser, service, live_url):
    """Text search with how many were found and the next pages, a category chip, "more like
    this", the back button, an address opened directly, photo search and its reload, a
    shared "more like this" address and its back button, in Chromium; the box, the photo
    and the count say what is on screen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, keeper, paths = service
    rows = _catalog_rows(paths)
    category_of = {r["listing_id"]: r["category"] for r in rows}
    driver = chrome("--window-size=1200,900")
    wait = WebDriverWait(driver, 60)
    loaded_photos = (
        "return Array.from(document.querySelectorAll('#results img'))"
        ".filter(img => img.complete && img.naturalWidth > 0).length"
    )

    def shown() -> list[str]:  # read at once: the list is replaced as answers arrive
        return driver.execute_script(
            "return Array.from(document.querySelectorAll('.result'), e => e.dataset.listingId)"
        )

    def status() -> str:
        return driver.find_element(By.ID, "status").text

    def box() -> str:
        return driver.find_element(By.ID, "q").get_attribute("value")

    def more_shown() -> bool:
        return driver.find_element(By.ID, "more").is_displayed()

    listings = keeper.current.searchable()
    title_of = {r["listing_id"]: r["title"] for r in rows}

    try:
        driver.get(live_url)
        wait.until(lambda d: keeper.current.version in d.find_element(By.ID, "release").text)

        title = rows[7]["title"]
        driver.find_element(By.ID, "q").send_keys(title)
        wait.until(lambda d: d.execute_script(loaded_photos) >= 5)
        assert rows[7]["listing_id"] in shown()
        assert "q=" in driver.current_url  # the address holds the query
        # how many of how many, and the next pages until every listing is shown
        assert status().startswith(f"best 24 of {listings} listings for ")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # git-ignored; `make screenshot` copies
        driver.save_screenshot(str(SCREENSHOTS / "search-page.png"))
        first_page = shown()
        driver.find_element(By.ID, "more").click()
        wait.until(lambda d: len(shown()) == 48)
        assert shown()[:24] == first_page and status().startswith(f"best 48 of {listings} ")
        driver.find_element(By.ID, "more").click()
        wait.until(lambda d: len(shown()) == listings)
        assert not more_shown()  # nothing more to show

        # a facet chip filters the results to its category
        chip = driver.find_elements(By.CSS_SELECTOR, ".chip[data-category]")[0]
        category = chip.get_attribute("data-category")
        chip.click()
        wait.until(lambda d: "in " + category in status())
        assert shown() and all(category_of[i].startswith(category) for i in shown())
        assert "category=" in driver.current_url
        in_category = sum(c.startswith(category) for c in category_of.values())
        assert f" of {in_category} listings in {category} " in status()  # the category's size
        filtered = shown()

        # "more like this" on the first result, in place, with a way back
        first = filtered[0]
        driver.find_element(By.CSS_SELECTOR, ".result .more").click()
        wait.until(lambda d: f"more like {title_of[first]}" in status())
        wait.until(lambda d: first not in shown() and len(shown()) > 0)
        assert f"similar={first}" in driver.current_url
        assert box() == ""  # not the query of the search before
        assert all(category_of[i].startswith(category) for i in shown())
        driver.find_element(By.ID, "back").click()
        wait.until(lambda d: "more like" not in status() and "in " + category in status())
        assert shown() == filtered
        assert box() == title
        driver.back()  # the browser's own button: the unfiltered search again
        wait.until(lambda d: "in " + category not in status() and "listings for" in status())
        assert rows[7]["listing_id"] in shown()

        # an address opened directly runs its search
        other = rows[20]
        top = other["category"].split(" > ")[0]
        driver.get(
            f"{live_url}/?q={urllib.parse.quote(other['title'])}&category={urllib.parse.quote(top)}"
        )
        wait.until(lambda d: "in " + top in status())
        assert driver.find_element(By.ID, "q").get_attribute("value") == other["title"]
        assert other["listing_id"] in shown()
        assert all(category_of[i].startswith(top) for i in shown())

        upload = driver.find_element(By.ID, "photo")
        driver.execute_script("arguments[0].hidden = false", upload)
        upload.send_keys(str(Path(paths.catalog) / rows[3]["image_uris"][0]))
        wait.until(lambda d: "for your photo" in status())
        wait.until(lambda d: d.execute_script(loaded_photos) >= 1)
        assert all(category_of[i].startswith(top) for i in shown())  # the filter stays
        assert box() == ""  # a photo search: no text query in the box
        photo_shown = (
            "const p = document.getElementById('query-photo');"
            "return !p.hidden && p.complete && p.naturalWidth > 0"
        )
        wait.until(lambda d: d.execute_script(photo_shown))
        by_photo = shown()
        assert "photo=" in driver.current_url
        driver.refresh()  # the photo search again, from this tab's session
        wait.until(lambda d: "for your photo" in status() and shown() == by_photo)
        assert driver.execute_script(photo_shown)

        # a shared "more like this" address names the listing, and its Back stays here
        driver.get(f"{live_url}/?similar={urllib.parse.quote(rows[5]['listing_id'])}")
        wait.until(lambda d: f"more like {rows[5]['title']}" in status())
        driver.find_element(By.ID, "back").click()
        wait.until(lambda d: not shown())
        assert driver.current_url == f"{live_url}/"  # the page's start, not the page before it
    finally:
        driver.quit()


def test_a_one_megabyte_query_to_the_real_server_is_a_4xx(live_url):
    import http.client
    import urllib.parse

    host, port = urllib.parse.urlsplit(live_url).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/search?q=" + "x" * 1_000_000)
    answer = connection.getresponse()

    assert 400 <= answer.status < 500, answer.status  # from the app or the HTTP parser
    connection.close()


def test_a_closed_batcher_refuses_at_once_instead_of_leaving_a_request_waiting():
    from components.service.batching import TEXT, Search, SearchBatcher

    batcher = SearchBatcher(lambda: None)
    batcher.close()

    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(Search(TEXT, "red heart", 3))


class _GatedPhotos:
    """A release's query embedder whose photo encoding waits for `gate` (a photo search
    held in the encoder for as long as a test needs it there)."""

    def __init__(self, embedder, gate: threading.Event) -> None:
        self.embedder, self.gate, self.entered = embedder, gate, threading.Event()

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    def images(self, images):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.embedder.images(images)


def _gated(keeper, gating: type, gate: threading.Event):
    """A copy of `keeper` serving its release through a `gating` embedder of `gate`, and
    that embedder."""
    import copy
    import dataclasses

    held, gated = copy.copy(keeper), gating(keeper.current.embedder, gate)
    held.current = dataclasses.replace(keeper.current, embedder=gated)
    return held, gated


def test_a_full_photo_queue_is_refused_with_503_before_its_upload_is_read(service):
    _, keeper, paths = service
    gate = threading.Event()
    held, gated = _gated(keeper, _GatedPhotos, gate)
    # in the worker thread, where the gate can hold a photo in the encoder
    update = {"max_photo_queue": 1, "photo_encoder": "thread"}
    config = _serve_params(paths).serve.model_copy(update=update)
    row = _catalog_rows(paths)[3]
    data = (REPO_ROOT / paths.catalog / row["image_uris"][0]).read_bytes()
    answers = {}

    def post(name: str) -> None:
        files = {"photo": ("mine.png", data, "image/png")}
        answers[name] = own.post("/search/image", files=files)

    with TestClient(create_app(config, held, Metrics())) as own:
        first = threading.Thread(target=post, args=("first",))
        second = threading.Thread(target=post, args=("second",))
        first.start()
        try:
            assert gated.entered.wait(60), "the first photo never reached the encoder"
            second.start()
            second.join(10)
            waited = second.is_alive()
            text = own.get("/search", params={"q": row["title"], "k": 5})  # not held by photos
            # refused before its body is read: a body that is no multipart form is not parsed
            unread = own.post(
                "/search/image",
                content=b"not a form",
                headers={"content-type": "multipart/form-data; boundary=none"},
            )
        finally:  # no request left in flight when the client closes
            gate.set()
            for thread in (first, second):
                if thread.ident is not None:
                    thread.join(60)
        counted = own.get("/metrics").text
    shed = [line for line in counted.splitlines() if "search_shed" in line]
    measured = [line for line in counted.splitlines() if "search_requests_total" in line]

    assert not waited, "the second photo waited in the queue instead of being refused"
    refused = answers["second"]
    assert refused.status_code == 503, refused.text
    assert "serve.max_photo_queue" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert text.status_code == 200 and answers["first"].status_code == 200
    assert unread.status_code == 503, unread.text
    assert "serve.max_photo_queue" in unread.json()["detail"] and unread.headers["Retry-After"]
    assert 'search_shed_total{kind="photo"} 2.0' in shed
    assert 'search_requests_total{endpoint="/search/image",status="503"} 2.0' in measured


def _photo_search(client, paths, row: int = 3):
    photo = _catalog_rows(paths)[row]
    data = (REPO_ROOT / paths.catalog / photo["image_uris"][0]).read_bytes()
    answer = client.post("/search/image", files={"photo": ("mine.png", data, "image/png")})
    assert answer.status_code == 200, answer.text
    return photo["listing_id"], [hit["listing_id"] for hit in answer.json()["results"]]


def _photo_encoders() -> list:
    import multiprocessing

    return [child for child in multiprocessing.active_children() if child.name == "photo-encoder"]


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_photos_are_encoded_at_the_priority_the_params_give(service):
    import os

    _, keeper, paths = service
    config = _serve_params(paths).serve
    policy, process_nice = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    # the defaults: a process of its own at the service's priority, bounded by its share
    assert (config.photo_encoder, config.photo_priority) == ("process", "normal")
    assert config.photo_share < 1
    idle = config.model_copy(update={"photo_priority": "idle"})
    with TestClient(create_app(idle, keeper, Metrics())) as client:
        before = {child.pid for child in _photo_encoders()}
        listing_id, hits = _photo_search(client, paths)
        started = [child for child in _photo_encoders() if child.pid not in before]
        assert len(started) == 1, "no photo encoder process of its own"
        assert os.sched_getscheduler(started[0].pid) == os.SCHED_IDLE
        assert listing_id in hits[:5]
    thread_mode = config.model_copy(update={"photo_encoder": "thread", "photo_priority": "low"})
    with TestClient(create_app(thread_mode, keeper, Metrics())) as client:
        _photo_search(client, paths)
        workers = {
            t.name: t.native_id for t in threading.enumerate() if t.name.startswith("search-")
        }
        nice = {name: os.getpriority(os.PRIO_PROCESS, tid) for name, tid in workers.items()}
        policies = {name: os.sched_getscheduler(tid) for name, tid in workers.items()}
    assert nice == {"search-photo": min(19, process_nice + 10), "search-text": process_nice}
    assert policies == {"search-photo": policy, "search-text": policy}  # low: nice alone


class _GatedTexts(_GatedPhotos):
    """A query embedder whose text encoding waits for `gate` (a text search held in flight)."""

    def texts(self, texts):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.embedder.texts(texts)

    def images(self, images):  # photos are encoded in the encoder process, never here
        return self.embedder.images(images)


def test_a_photo_waits_for_its_share_of_a_core_while_a_text_search_is_in_flight(service):
    _, keeper, paths = service
    gate = threading.Event()
    held, gated = _gated(keeper, _GatedTexts, gate)
    # a photo costs ~30 ms of a core: at a share of 1/1000 it needs ~30 s beside a text
    config = _serve_params(paths).serve.model_copy(update={"photo_share": 0.001})
    row = _catalog_rows(paths)[3]
    answers = {}
    with TestClient(create_app(config, held, Metrics())) as client:
        _photo_search(client, paths)  # starts the encoder process, loads the model
        started = time.perf_counter()
        alone = _photo_search(client, paths)  # nothing else in flight: at full speed
        free_s = time.perf_counter() - started

        def text() -> None:
            answers["text"] = client.get("/search", params={"q": row["title"], "k": 5})

        def photo() -> None:
            answers["photo"] = _photo_search(client, paths)

        texting, photographing = threading.Thread(target=text), threading.Thread(target=photo)
        texting.start()
        try:
            assert gated.entered.wait(60), "the text search never reached its encoder"
            photographing.start()
            photographing.join(max(2.0, 10 * free_s))
            paced = photographing.is_alive()
        finally:
            gate.set()  # the text search ends: the photo goes on at full speed
            texting.join(60)
            if photographing.ident is not None:
                photographing.join(60)
        done = not photographing.is_alive()

    assert paced, f"the photo was answered beside a text search in flight ({free_s:.2f} s alone)"
    assert done, "the photo was still paced after the text search ended"
    assert answers["text"].status_code == 200
    assert answers["photo"] == alone


def test_the_photo_encoder_starts_with_the_service_when_warm(service):
    _, keeper, paths = service
    config = _serve_params(paths).serve.model_copy(update={"photo_warm": True})
    before = {child.pid for child in _photo_encoders()}
    with TestClient(create_app(config, keeper, Metrics())) as client:
        deadline = time.monotonic() + 60
        while not (started := [c for c in _photo_encoders() if c.pid not in before]):
            assert time.monotonic() < deadline, "no photo encoder started with the service"
            time.sleep(0.05)
        listing_id, hits = _photo_search(client, paths)
        after = [child.pid for child in _photo_encoders() if child.pid not in before]
    assert after == [started[0].pid], "the first photo search started another encoder"
    assert listing_id in hits[:5]


def test_a_photo_encoder_that_died_is_started_again_by_the_next_photo_search(service):
    import os
    import signal

    _, keeper, paths = service
    config = _serve_params(paths).serve
    with TestClient(create_app(config, keeper, Metrics())) as client:
        before = {child.pid for child in _photo_encoders()}
        _photo_search(client, paths)
        (first,) = [child for child in _photo_encoders() if child.pid not in before]
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)

        listing_id, hits = _photo_search(client, paths, row=5)

        (second,) = [child for child in _photo_encoders() if child.pid not in before]
        assert second.pid != first.pid and listing_id in hits[:5]
