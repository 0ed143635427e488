"""The search service's HTTP API and page (FastAPI).

    GET  /search?q=...&k=...      text search
    POST /search/image            photo upload (multipart field `photo`)
    GET  /listings/{id}/similar   listings near one listing ("more like this")

The three searches take `category=` (repeatable): a taxonomy prefix the results must fall
under (components/service/filters.py), and, with `facets=true` (the page's chips), answer
with `facets`, the counts per top-level category over the query's top `serve.facet_hits`
hits without the filter (off by default: a search without them is about 8% cheaper).
    GET  /photos/{ref}            a photo of the catalog, only from inside its root
    GET  /healthz, /readyz        alive; ready once a release is loaded
    GET  /version                 release, model version, its test metrics
    GET  /metrics                 Prometheus: requests, latency, errors, release served,
                                  searches refused by a full queue (search_shed_total)
    GET  /                        the search page (static/)

Bad requests are a 4xx with a message that names the problem, never a 500. Every error
has one body, `{"detail": "<what is wrong>"}` (`Problem`), request validation's included,
and the OpenAPI document (/openapi.json) lists each status an endpoint answers with
(tests/test_openapi.py holds the service to it with schemathesis).
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import threading
import time
import urllib.parse
from collections.abc import Callable
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, StringConstraints
from starlette.concurrency import run_in_threadpool

from components.config import ServeConfig
from components.io.catalog_reader import TRUSTED_MAX_BYTES, read_image_bytes
from components.io.images import DecodeBudget, ImageBounds, ImageRefError, decode_image
from components.service.batching import PHOTO, TEXT, Answer, Overloaded, Search, SearchBatcher
from components.service.filters import FilterError
from components.service.photo_encoder import PhotoEncoder, PhotoEncoderStopped
from components.service.releases import ReleaseKeeper, ServedRelease

STATIC = resources.files("components.service") / "static"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


Category = Annotated[str, StringConstraints(min_length=1)]  # a taxonomy prefix, not blank


class Problem(BaseModel):
    """The body of every error the service answers with."""

    detail: str


class Readiness(BaseModel):
    ready: bool
    release: str | None = None
    reason: str | None = None


def _errors(**described: str) -> dict:
    """OpenAPI `responses` for error statuses, each with the `Problem` body."""
    return {
        int(code[1:]): {"model": Problem, "description": why} for code, why in described.items()
    }


NO_RELEASE = "no release loaded yet"
BAD_REQUEST = "a parameter out of range, a blank query or an unknown category"


class Metrics:
    """The service's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "search_requests_total",
            "Requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "search_request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "search_errors_total",
            "Responses with a 5xx status",
            ["endpoint"],
            registry=self.registry,
        )
        self.release = Gauge(
            "search_release_info",
            "1 for the release being served",
            ["version", "model_version"],
            registry=self.registry,
        )
        self.filters = Counter(
            "search_filter_strategy_total",
            "Filtered searches by how the filter was applied (overfetch, restricted)",
            ["strategy"],
            registry=self.registry,
        )
        self.shed = Counter(
            "search_shed_total",
            "Searches refused with 503 because their kind's queue was full (serve.max_photo_queue)",
            ["kind"],
            registry=self.registry,
        )
        self.loads = Counter(
            "search_release_loads_total",
            "Release loads by outcome (loaded, failed; removals: tombstones newly applied "
            "to the served release)",
            ["outcome"],
            registry=self.registry,
        )
        self.removed = Gauge(
            "search_removed_listings",
            "Listings of the served release held out of search by removals (tombstones)",
            registry=self.registry,
        )

    def served(self, release: ServedRelease) -> None:
        self.release.clear()
        self.release.labels(release.version, str(release.model.get("version"))).set(1)
        self.removed.set(len(release.removed))


class Measured:
    """ASGI middleware: each HTTP request's latency, status and 5xx in `metrics`, by
    route. Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which passes every
    response through a task group and a memory stream."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # 500: failed before it answered

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 500:
                self.metrics.errors.labels(endpoint).inc()


class RefusedBeforeBody:
    """ASGI middleware: a POST to `path` is answered 503 with Retry-After before its
    body is read while `refusal()` names a reason (its kind's queue is full), so a refused
    photo costs the event loop no multipart parsing; `on_refused` counts it. The endpoint
    checks again once it runs (the queue may fill meanwhile)."""

    def __init__(
        self,
        app,
        path: str,
        refusal: Callable[[], Overloaded | None],
        on_refused: Callable[[], None],
    ) -> None:
        self.app, self.path, self.refusal, self.on_refused = app, path, refusal, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _posts_to(scope, self.path):
            refused = self.refusal()
            if refused is not None:
                self.on_refused()
                # the route, as routing would have set it: the refusal is measured as its
                scope["route"] = next((r for r in scope["app"].routes if _is(r, self.path)), None)
                answer = JSONResponse(
                    {"detail": str(refused)},
                    status_code=503,
                    headers={"Retry-After": str(refused.retry_after_s)},
                )
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InFlight:
    """ASGI middleware: the HTTP requests in flight other than POSTs to `path` (photo
    searches), counted in `count`, a shared int the photo encoder process reads to yield
    to them (`serve.photo_share`). Only the event loop's thread writes it."""

    def __init__(self, app, path: str, count) -> None:
        self.app, self.path, self.count = app, path, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or _posts_to(scope, self.path):
            await self.app(scope, receive, send)
            return
        self.count.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count.value -= 1


def _posts_to(scope, path: str) -> bool:
    """Whether an HTTP request is a POST to the app's `path` (behind a proxy that mounts
    the app under a prefix, `root_path`, the request's path may carry the prefix)."""
    return scope["method"] == "POST" and scope["path"] in (
        path,
        scope.get("root_path", "") + path,
    )


def _is(route, path: str) -> bool:
    return getattr(route, "path", None) == path


def create_app(config: ServeConfig, keeper: ReleaseKeeper, metrics: Metrics) -> FastAPI:
    def release() -> ServedRelease:
        served = keeper.current
        if served is None:
            raise HTTPException(503, f"no release loaded yet: {keeper.last_error or 'loading'}")
        return served

    photo_encoder = (
        PhotoEncoder(config.photo_priority, str(keeper.device), config.photo_share)
        if config.photo_encoder == "process"
        else None
    )
    batcher = SearchBatcher(
        release,
        overfetch_min_share=config.overfetch_min_share,
        on_filter=lambda strategy: metrics.filters.labels(strategy).inc(),
        max_photo_queue=config.max_photo_queue,
        photo_priority=config.photo_priority,
        photo_encoder=photo_encoder,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.photo_warm:  # beside the first requests, not in their way
            threading.Thread(target=batcher.warm_photos, name="photo-warm", daemon=True).start()
        yield
        batcher.close()

    app = FastAPI(title="Listing search", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        """Request validation's errors in the one error body: each problem as
        "<where>: <what>", joined."""
        problems = [f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in err.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    catalog = keeper.catalog
    bounds = ImageBounds()  # validate's defaults
    budget = DecodeBudget(config.decode_memory_mb << 20)
    max_upload = int(config.max_upload_mb * 2**20)

    def photo_refusal() -> Overloaded | None:
        try:
            batcher.admits(PHOTO)
        except Overloaded as err:
            return err
        return None

    app.add_middleware(
        RefusedBeforeBody,
        path="/search/image",
        refusal=photo_refusal,
        on_refused=lambda: metrics.shed.labels(PHOTO).inc(),
    )
    app.add_middleware(Measured, metrics=metrics)  # outside those: it measures refusals too
    if photo_encoder is not None and photo_encoder.share < 1.0:
        app.add_middleware(InFlight, path="/search/image", count=photo_encoder.foreground)

    def results(served: ServedRelease, hits: list[tuple[str, float]]) -> list[dict]:
        out = []
        for listing_id, score in hits:
            listing = served.listings.get(listing_id)
            photo = listing.photo if listing else None
            out.append(
                {
                    "listing_id": listing_id,
                    "score": round(score, 6),
                    "title": listing.title if listing else None,
                    "photo_url": _photo_url(photo),
                }
            )
        return out

    def answer(served: ServedRelease, hits, facets=None, category=(), **extra) -> dict:
        """The one answer shape: the release, what was asked, `searched` (the listings
        the search ranked: the release's or its category's, the removed ones aside; the
        results are the best of those), facets and results."""
        out = {"release": served.version, **extra}
        where = served.taxonomy.resolve(tuple(category)) if category else None
        out["searched"] = served.searchable(where)
        if category:
            out["category"] = list(category)
        if facets is not None:
            out["facets"] = facets
        return out | {"results": results(served, hits)}

    k_param = Query(10, ge=1, le=config.max_k, description=f"results, 1..{config.max_k}")
    photo_param = File(
        ...,
        description="the photo to search by: an image file (an empty or undecodable one is "
        "answered 422)",
        json_schema_extra={"minLength": 1},
    )
    facets_param = Query(
        False,
        description=f"also count the top-level categories of the query's top "
        f"{config.facet_hits} hits without the filter (`facets`)",
    )
    category_param = Query(
        None,
        description="taxonomy prefix the results must fall under (repeatable: any of them); "
        "a category the served release does not have is answered 422, naming it",
    )

    def checked(category: list[str] | None) -> tuple[str, ...]:
        """The category values, canonical, checked against the served release (a 422
        naming the value otherwise)."""
        if category is None:
            return ()
        try:
            return release().taxonomy.resolve(tuple(category)).values
        except FilterError as err:
            raise HTTPException(422, str(err)) from None

    def admitted(kind: str) -> None:
        """A 503 with Retry-After, counted, when `kind`'s queue is full."""
        try:
            batcher.admits(kind)
        except Overloaded as err:
            metrics.shed.labels(kind).inc()
            raise HTTPException(
                503, str(err), headers={"Retry-After": str(err.retry_after_s)}
            ) from None

    async def batched(search: Search) -> Answer:
        try:
            pending = batcher.submit(search)
        except Overloaded:
            admitted(search.kind)  # raises, counted (or it emptied since: try once more)
            return await batched(search)
        except RuntimeError as err:  # shutting down: answer now rather than never
            raise HTTPException(503, str(err)) from err
        try:
            return await asyncio.wrap_future(pending)
        except FilterError as err:  # the release changed under the request
            raise HTTPException(422, str(err)) from None
        except PhotoEncoderStopped as err:  # restarted on the next photo search
            raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from None

    @app.get("/search", responses=_errors(e422=BAD_REQUEST, e503=NO_RELEASE))
    async def search(
        q: str = Query(..., min_length=1, max_length=config.max_query_chars),
        k: int = k_param,
        category: list[Category] | None = category_param,
        facets: bool = facets_param,
    ) -> dict:
        if not q.strip():
            raise HTTPException(422, "q is blank")
        values = checked(category)
        found = await batched(Search(TEXT, q, k, values, config.facet_hits if facets else 0))
        return answer(found.release, found.hits, found.facets, found.category, query=q)

    @app.post(
        "/search/image",
        responses=_errors(
            e400="a body that is not multipart form data",
            e413=f"a photo larger than serve.max_upload_mb ({config.max_upload_mb} MB) or than "
            "the decode budget",
            e422="a photo that does not decode (an empty or broken upload), or a bad parameter",
            e503=f"{NO_RELEASE}, or serve.max_photo_queue photo searches already waiting "
            "(with Retry-After)",
        ),
    )
    async def search_image(
        photo: UploadFile = photo_param,
        k: int = k_param,
        category: list[Category] | None = category_param,
        facets: bool = facets_param,
    ) -> dict:
        values = checked(category)
        admitted(PHOTO)  # before reading and decoding a photo that would wait too long
        data = await photo.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"photo larger than {config.max_upload_mb} MB")
        name = photo.filename or "upload"
        try:
            image = await run_in_threadpool(
                decode_image, data, name, bounds, budget, fit=_fit(keeper)
            )
        except ImageRefError as err:
            status = 413 if err.code in ("image_too_large", "image_bomb") else 422
            raise HTTPException(status, f"{err.code}: {err.detail}") from None
        found = await batched(Search(PHOTO, image, k, values, config.facet_hits if facets else 0))
        return answer(found.release, found.hits, found.facets, found.category, photo=name)

    @app.get(
        "/listings/{listing_id}/similar",
        responses=_errors(
            e404="no such listing in the served release (or it was removed)",
            e422=BAD_REQUEST,
            e503=NO_RELEASE,
        ),
    )
    def similar(
        listing_id: str,
        k: int = k_param,
        category: list[Category] | None = category_param,
        facets: bool = facets_param,
    ) -> dict:
        values = checked(category)
        served = release()
        vector = served.vector_of(listing_id)
        if vector is None:
            why = "was removed" if listing_id in served.removed else "is not"
            raise HTTPException(404, f"listing {listing_id!r} {why} in release {served.version}")
        counted = config.facet_hits if facets else 0
        nearest = [
            hit for hit in served.search(vector, max(k, counted) + 1)[0] if hit[0] != listing_id
        ]
        facets = served.facets(nearest[:counted]) if counted else None
        source = served.listings.get(listing_id)
        about = {"listing_id": listing_id, "title": source.title if source else None}
        if not values:
            return answer(served, nearest[:k], facets, **about)
        try:
            where = served.taxonomy.resolve(values)
        except FilterError as err:
            raise HTTPException(422, str(err)) from None
        hits, strategy = served.search_where(vector, k + 1, where, config.overfetch_min_share)
        metrics.filters.labels(strategy).inc()
        hits = [hit for hit in hits[0] if hit[0] != listing_id][:k]
        return answer(served, hits, facets, values, **about)

    @app.get(
        "/photos/{ref:path}",
        response_class=Response,
        responses={
            200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
            **_errors(
                e404="no photo of the catalog there: none by that name, not an image, outside "
                "the catalog's root, or a photo of a removed listing"
            ),
        },
    )
    def photo(ref: str = Path(description="the photo's path inside the catalog")) -> Response:
        # whatever is not a photo the catalog serves is, to a client, not there
        media = mimetypes.guess_type(ref)[0] or "application/octet-stream"
        if not media.startswith("image/"):
            raise HTTPException(404, f"{ref!r} is not an image")
        served = keeper.current
        if served is not None and ref in served.removed_photos:
            raise HTTPException(404, f"{ref!r} is a photo of a removed listing")
        try:
            location = catalog.resolve_image(ref, [], None)  # relative refs inside the root
            data = read_image_bytes(location, TRUSTED_MAX_BYTES)  # validated already
        except ImageRefError as err:  # the code says why; the detail would name server paths
            raise HTTPException(404, f"{err.code}: {ref!r} is not served") from None
        except OSError:
            raise HTTPException(404, f"image_unreadable: {ref!r} is not served") from None
        return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": NO_RELEASE}},
    )
    def readyz() -> JSONResponse:
        served = keeper.current
        if served is None:
            return JSONResponse({"ready": False, "reason": keeper.last_error}, status_code=503)
        return JSONResponse({"ready": True, "release": served.version})

    @app.get("/version", responses=_errors(e503=NO_RELEASE))
    def version() -> dict:
        served = release()
        metrics_ = served.manifest.get("metrics", {})
        return {
            "release": served.version,
            "model": {k: served.model.get(k) for k in ("name", "version", "run_id")},
            "listings": served.size,
            "removed": len(served.removed),
            "metrics": {k: v for k, v in metrics_.items() if "recall@10" in k},
            "loaded_at": served.loaded_at,
            "last_error": keeper.last_error,
            "max_k": config.max_k,
        }

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def prometheus() -> Response:
        """Prometheus's text exposition format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (STATIC / "index.html").read_text()

    app.mount("/static", StaticFiles(packages=[("components.service", "static")]), name="static")
    return app


def _photo_url(ref: str | None) -> str | None:
    """The service's URL of a catalog photo (relative references only: an absolute URI
    is not under the catalog root the service serves)."""
    if not ref or "://" in ref:
        return None
    return "/photos/" + urllib.parse.quote(ref, safe="/")


def _fit(keeper: ReleaseKeeper) -> int:
    served = keeper.current
    return served.embedder.image_encoder.image_size if served else 224
