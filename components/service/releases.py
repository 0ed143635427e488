"""The release the search service answers from, and how it follows `CURRENT`.

A `ServedRelease` is everything one answer needs: the verified FAISS index and its ids,
the release's model (the registry version its manifest names, checked against the
weights' sha256 it recorded) with its frozen query encoders, and the catalog's titles and
photos. `ReleaseKeeper` polls the store's pointer; when it moves (a promotion, a
rollback) it loads the new release beside the old one and swaps the reference in one
assignment, so a request sees one release or the other, never a mix. A release that fails
to load or verify leaves the old one serving, and is logged and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

from components.config import StepPaths
from components.io.catalog_reader import CatalogRoot, read_listings
from components.release import production, registry
from components.release.serving import QueryEmbedder
from components.release.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listing:
    title: str
    photo: str | None  # the primary photo's reference inside the catalog root


@dataclass
class ServedRelease:
    version: str
    index: faiss.Index
    ids: list[str]
    manifest: dict
    embedder: QueryEmbedder
    listings: dict[str, Listing]
    loaded_at: float = field(default_factory=time.time)
    rows: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.rows = {listing_id: row for row, listing_id in enumerate(self.ids)}

    @property
    def model(self) -> dict:
        return self.manifest.get("model", {})

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k nearest listings of each query vector, best first."""
        scores, rows = self.index.search(np.ascontiguousarray(vectors, np.float32), k)
        return [
            [(self.ids[r], float(s)) for r, s in zip(row, score, strict=True) if r >= 0]
            for row, score in zip(rows, scores, strict=True)
        ]

    def vector_of(self, listing_id: str) -> np.ndarray | None:
        row = self.rows.get(listing_id)
        return None if row is None else self.index.reconstruct(row)[None, :]


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
    ) -> None:
        self.storage, self.paths, self.catalog = storage, paths, catalog
        self.device, self.cache_dir, self.on_load = device, cache_dir, on_load
        self.current: ServedRelease | None = None
        self.last_error: str | None = None
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
        if self.current is not None and self.current.version == pointer.version:
            return False
        started = time.perf_counter()
        try:
            release = self._load()
        except Exception as err:
            return self._failed(pointer.version, f"{type(err).__name__}: {err}")
        previous, self.current = self.current, release  # one assignment: the swap
        self.last_error = None
        log.info(
            "serve: now serving %s (model %s v%s, %d listings; loaded in %.1fs)%s",
            release.version,
            release.model.get("name"),
            release.model.get("version"),
            len(release.ids),
            time.perf_counter() - started,
            f", was {previous.version}" if previous else "",
        )
        self.on_load(release.version, "loaded")
        return True

    def _failed(self, version: str, message: str) -> bool:
        self.last_error = message
        serving = self.current.version if self.current else "nothing"
        log.error("serve: release %s not loaded, still serving %s: %s", version, serving, message)
        self.on_load(version, "failed")
        return False

    def _load(self) -> ServedRelease:
        loaded = production.load_current_index(self.storage, self.cache_dir)
        _allow_reconstruct(loaded.index)
        reference = loaded.manifest["model"]
        return ServedRelease(
            version=loaded.version,
            index=loaded.index,
            ids=loaded.ids,
            manifest=loaded.manifest,
            embedder=self._embedder(reference),
            listings=_listings(self.catalog),
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


def _allow_reconstruct(index: faiss.Index) -> None:
    """IVF indexes reconstruct a stored vector only with a direct map."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()


def _listings(catalog: CatalogRoot) -> dict[str, Listing]:
    table = read_listings(catalog).select(["listing_id", "title", "image_uris"]).to_pylist()
    return {
        str(row["listing_id"]): Listing(
            title=str(row["title"] or ""),
            photo=row["image_uris"][0] if row["image_uris"] else None,
        )
        for row in table
    }
