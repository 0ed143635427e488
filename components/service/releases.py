"""The release the search service answers from, and how it follows `CURRENT`.

A `ServedRelease` is everything one answer needs: the verified FAISS index and its ids,
the release's model (the registry version its manifest names, checked against the
weights' sha256 it recorded) with its frozen query encoders, and the catalog's titles and
photos. `ReleaseKeeper` polls the store's pointer; when it moves (a promotion, a
rollback) it loads the new release beside the old one and swaps the reference in one
assignment, so a request sees one release or the other, never a mix. A release that fails
to load or verify leaves the old one serving, and is logged and counted. A release whose
index was embedded by another model than the one it names is refused: queries and index
always come from one model version.

With `CURRENT` it reads the store's tombstones (components/release/tombstones.py): a
removed listing is kept out of every answer from the next poll on; searches fetch as many
more neighbours as there are removed listings still in the index, so they still answer k.

Each release also carries its listings' taxonomy (components/service/filters.py), for
category filters and facets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from components.config import StepPaths
from components.core.query_embedder import QueryEmbedder
from components.io.catalog_reader import CatalogRoot, read_listings
from components.io.faiss_index import IndexIds, allow_reconstruct
from components.release import production, registry, tombstones
from components.release.storage import Storage
from components.service.filters import OVERFETCH, RESTRICTED, Filter, Taxonomy, search_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listing:
    title: str
    photos: tuple[str, ...]  # references inside the catalog root, the primary first
    category: str | None = None  # its taxonomy path

    @property
    def photo(self) -> str | None:
        return self.photos[0] if self.photos else None


@dataclass(frozen=True)
class Labels:
    """Which listing each label of a release's index is, and back (built once per
    release)."""

    listing_of: dict[int, str]
    label_of: dict[str, int]

    @classmethod
    def of(cls, ids: IndexIds) -> Labels:
        return cls(ids.listing_of(), ids.label_of())


@dataclass(frozen=True)
class ServedRelease:
    version: str
    index: faiss.Index
    labels: Labels
    manifest: dict
    embedder: QueryEmbedder
    listings: dict[str, Listing]
    taxonomy: Taxonomy
    removed: frozenset[str] = frozenset()  # tombstoned listings this release still holds
    removed_photos: frozenset[str] = frozenset()  # their photos' references
    loaded_at: float = field(default_factory=time.time)

    @property
    def model(self) -> dict:
        return self.manifest.get("model", {})

    @property
    def size(self) -> int:
        return len(self.labels.label_of)

    def with_removed(self, removed: frozenset[str]) -> ServedRelease:
        """This release with the tombstones `removed` applied (those it holds)."""
        here = frozenset(i for i in removed if i in self.labels.label_of)
        if here == self.removed:
            return self
        photos = frozenset(p for i in here if i in self.listings for p in self.listings[i].photos)
        return dataclasses.replace(self, removed=here, removed_photos=photos)

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k nearest listings of each query vector, best first, none removed."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        scores, labels = self.index.search(vectors, k + len(self.removed))
        return [self._hits(row, score, k) for row, score in zip(labels, scores, strict=True)]

    def search_where(
        self, vectors: np.ndarray, k: int, where: Filter, overfetch_min_share: float
    ) -> tuple[list[list[tuple[str, float]]], str]:
        """The k nearest listings of each query vector among those `where` keeps, and the
        strategy used (filters.py): over-fetch when it keeps at least
        `overfetch_min_share` of the listings, else (or when over-fetching came back
        short) a search restricted to its labels."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        extra = len(self.removed)
        wanted = min(k, len(where.labels))  # fewer only when fewer listings match
        if where.selectivity >= overfetch_min_share:
            depth = min(self.size, math.ceil((k + extra) / where.selectivity * 2))
            params = search_params(self.index, where.selectivity, depth)
            scores, labels = self.index.search(vectors, depth, params=params)
            labels = np.where(where.keeps(labels), labels, -1)
            hits = [self._hits(row, score, k) for row, score in zip(labels, scores, strict=True)]
            if all(len(found) >= wanted for found in hits):
                return hits, OVERFETCH
        params = search_params(self.index, where.selectivity, k + extra, where)
        scores, labels = self.index.search(vectors, k + extra, params=params)
        hits = [self._hits(row, score, k) for row, score in zip(labels, scores, strict=True)]
        return hits, RESTRICTED

    def _hits(self, labels: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[str, float]]:
        """Up to k (listing, score) of one result row, skipping empty and removed ones."""
        hits = []
        for label, value in zip(labels.tolist(), scores.tolist(), strict=True):
            listing_id = self.labels.listing_of.get(label) if label >= 0 else None
            if listing_id is not None and listing_id not in self.removed:
                hits.append((listing_id, float(value)))
            if len(hits) == k:
                break
        return hits

    def searchable(self, where: Filter | None = None) -> int:
        """How many listings a search ranks: the release's, or those `where` keeps, but
        the removed ones (what "24 of N" counts)."""
        if where is None:
            return self.size - len(self.removed)
        label_of = self.labels.label_of
        gone = np.array([label_of[i] for i in self.removed], dtype=np.int64)
        return len(where.labels) - int(np.isin(gone, where.labels).sum())

    def facets(self, hits: list[tuple[str, float]]) -> dict[str, int]:
        """Counts per top-level category over `hits`."""
        label_of = self.labels.label_of
        return self.taxonomy.facets([label_of[i] for i, _ in hits if i in label_of])

    def vector_of(self, listing_id: str) -> np.ndarray | None:
        label = self.labels.label_of.get(listing_id)
        if label is None or listing_id in self.removed:
            return None
        return self.index.reconstruct(label)[None, :]


def _log_removals(before: ServedRelease, after: ServedRelease) -> None:
    """One line when the tombstones applied to the served release change."""
    out, back = after.removed - before.removed, before.removed - after.removed
    named = ", ".join(sorted(out)[:5]) + (" ..." if len(out) > 5 else "")
    log.info(
        "serve: %d listing(s) taken out of search by removals%s, %d restored; %d of %s held "
        "out in all",
        len(out),
        f" ({named})" if out else "",
        len(back),
        len(after.removed),
        after.version,
    )


class ReleaseKeeper:
    """Holds the served release and replaces it when the store's `CURRENT` moves."""

    def __init__(
        self,
        storage: Storage,
        paths: StepPaths,
        catalog: CatalogRoot,
        device: torch.device,
        cache_dir: Path,
        on_load: Callable[[str, str], None] = lambda version, outcome: None,
        max_filter_values: int = 20,
    ) -> None:
        self.storage, self.paths, self.catalog = storage, paths, catalog
        self.device, self.cache_dir, self.on_load = device, cache_dir, on_load
        self.max_filter_values = max_filter_values
        self.current: ServedRelease | None = None
        self.last_error: str | None = None
        self.removed: frozenset[str] = frozenset()  # every tombstoned listing
        self._embedders: dict[tuple, QueryEmbedder] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load and swap in the release `CURRENT` names if it is not the one served;
        True when a new one was swapped in. Errors are logged and kept, never raised."""
        try:
            pointer = production.read_pointer(self.storage)
        except Exception as err:
            return self._failed("(pointer)", f"cannot read {self.storage.uri}: {err}")
        if pointer is None:
            self.last_error = f"nothing promoted yet in {self.storage.uri}"
            return False
        self._read_tombstones()
        if self.current is not None and self.current.version == pointer.version:
            served, self.current = self.current, self.current.with_removed(self.removed)
            if self.current is not served:
                _log_removals(served, self.current)
                self.on_load(self.current.version, "removals")
            return False
        started = time.perf_counter()
        try:
            release = self._load().with_removed(self.removed)
        except Exception as err:
            return self._failed(pointer.version, f"{type(err).__name__}: {err}")
        previous, self.current = self.current, release  # one assignment: the swap
        self.last_error = None
        log.info(
            "serve: now serving %s (model %s v%s, %d listings; loaded in %.1fs)%s",
            release.version,
            release.model.get("name"),
            release.model.get("version"),
            release.size,
            time.perf_counter() - started,
            f", was {previous.version}" if previous else "",
        )
        if release.removed:
            log.info(
                "serve: %d listing(s) of %s held out of search by removals",
                len(release.removed),
                release.version,
            )
        self.on_load(release.version, "loaded")
        return True

    def _failed(self, version: str, message: str) -> bool:
        self.last_error = message
        serving = self.current.version if self.current else "nothing"
        log.error("serve: release %s not loaded, still serving %s: %s", version, serving, message)
        self.on_load(version, "failed")
        return False

    def _read_tombstones(self) -> None:
        """The store's removed listings now; on a read error the last ones known stay."""
        try:
            self.removed = tombstones.removed_ids(tombstones.read_all(self.storage))
        except Exception as err:
            log.error("serve: cannot read the tombstones of %s: %s", self.storage.uri, err)

    def _load(self) -> ServedRelease:
        loaded = production.load_current_index(self.storage, self.cache_dir)
        allow_reconstruct(loaded.index)
        reference = loaded.manifest["model"]
        embedded_with = loaded.manifest.get("embedding_model_sha256", reference.get("sha256"))
        if embedded_with != reference.get("sha256"):
            raise ValueError(
                f"release {loaded.version}: its index was embedded by weights "
                f"{str(embedded_with)[:16]}..., not by the model it names "
                f"({reference['name']} v{reference['version']}): queries and index would "
                "come from two models"
            )
        labels = Labels.of(loaded.ids)
        listings = _listings(self.catalog)
        return ServedRelease(
            version=loaded.version,
            index=loaded.index,
            labels=labels,
            manifest=loaded.manifest,
            embedder=self._embedder(reference),
            listings=listings,
            taxonomy=Taxonomy(
                {label: _category(listings, i) for label, i in labels.listing_of.items()},
                self.max_filter_values,
            ),
        )

    def _embedder(self, reference: dict) -> QueryEmbedder:
        """The release's registered model and its encoders (kept per model version: a
        release that only changes the index reuses them)."""
        key = (reference["name"], str(reference["version"]), reference.get("sha256"))
        if key not in self._embedders:
            uri = f"models:/{reference['name']}/{reference['version']}"
            model = registry.load_model(uri, self.paths, self.device)
            if reference.get("sha256") and model.reference["sha256"] != reference["sha256"]:
                raise ValueError(
                    f"{uri}: weights sha256 {model.reference['sha256'][:16]}... are not the "
                    f"{reference['sha256'][:16]}... the release recorded"
                )
            self._embedders = {key: QueryEmbedder(model.model, model.spec, self.device)}
        return self._embedders[key]

    def start(self, poll_s: float) -> None:
        """Poll `CURRENT` every `poll_s` seconds in a daemon thread."""

        def loop() -> None:
            while not self._stop.wait(poll_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="release-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def _listings(catalog: CatalogRoot) -> dict[str, Listing]:
    table = read_listings(catalog)
    columns = ["listing_id", "title", "image_uris"]
    rows = table.select([*columns, "category"] if "category" in table.column_names else columns)
    return {
        str(row["listing_id"]): Listing(
            title=str(row["title"] or ""),
            photos=tuple(row["image_uris"] or ()),
            category=row.get("category"),
        )
        for row in rows.to_pylist()
    }


def _category(listings: dict[str, Listing], listing_id: str) -> str | None:
    listing = listings.get(listing_id)
    return listing.category if listing else None
