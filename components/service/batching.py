"""Searches answered in batches by one worker thread: text queries and photos alike.

Encoding queries one request at a time, each in its own thread, spends the CPU on thread
switching and lock contention as clients are added (on 2 cores: 354 requests/s with one
client, 147 with sixteen). Here every request puts its query on a queue; one thread takes
whatever is waiting (up to `max_batch`), encodes the texts in one call and the photos in
another (a photo is decoded, within the service's limits, by its request before it is
queued), and searches the index once for every request without a filter; a filtered
request searches on its own (components/service/filters.py). So a busy service does more
per call instead of more calls. A batch is answered by one release: the one being served
when the batch starts.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from components.service.releases import ServedRelease

Hits = list[tuple[str, float]]
TEXT, PHOTO = "text", "photo"


@dataclass
class Search:
    """One request's search: a text or a decoded photo, k, a filter's values, how many
    hits its facets count (0: none)."""

    kind: str  # TEXT | PHOTO
    query: str | Image.Image
    k: int
    category: tuple[str, ...] = ()
    facet_hits: int = 0
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Answer:
    release: ServedRelease
    hits: Hits
    facets: dict[str, int] | None
    strategy: str | None  # how a filter was applied (None: no filter)
    category: tuple[str, ...] = ()  # the filter's values, as the release writes them


class SearchBatcher:
    def __init__(
        self,
        release: Callable[[], ServedRelease],
        max_batch: int = 64,
        overfetch_min_share: float = 0.25,
        on_filter: Callable[[str], None] = lambda strategy: None,
    ) -> None:
        self.release = release  # the release to answer from (raises when none is loaded)
        self.max_batch = max_batch
        self.overfetch_min_share = overfetch_min_share
        self.on_filter = on_filter
        self._queue: queue.Queue[Search | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="search-batcher", daemon=True)
        self._thread.start()

    def submit(self, search: Search) -> Future:
        """A future of the search's `Answer`.

        Raises:
            RuntimeError: the batcher was closed (its app shut down): nothing would answer.
        """
        if not self._thread.is_alive():
            raise RuntimeError("the search batcher is closed: the service is shutting down")
        self._queue.put(search)
        return search.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._answer(batch)

    def _answer(self, batch: list[Search]) -> None:
        try:
            served = self.release()
            vectors = self._encode(served, batch)
            # one search for every request that needs the unfiltered neighbours: those
            # without a filter, and those whose facets count the query's top hits
            plain = [i for i, s in enumerate(batch) if not s.category or s.facet_hits]
            depth = max((max(batch[i].k, batch[i].facet_hits) for i in plain), default=0)
            nearest = served.search(vectors[plain], depth) if plain else []
        except Exception as err:  # every waiting request gets the error
            for search in batch:
                search.future.set_exception(err)
            return
        unfiltered = dict(zip(plain, nearest, strict=True))
        for i, search in enumerate(batch):
            try:
                answer = self._one(served, search, vectors[i : i + 1], unfiltered.get(i, []))
            except Exception as err:  # this request's alone (its category is gone, say)
                search.future.set_exception(err)
            else:
                search.future.set_result(answer)

    def _one(self, served: ServedRelease, search: Search, vector, unfiltered: Hits) -> Answer:
        """A request's answer: facets over the query's top hits without its filter (where
        else its results fall), hits with it."""
        facets = served.facets(unfiltered[: search.facet_hits]) if search.facet_hits else None
        if not search.category:
            return Answer(served, unfiltered[: search.k], facets, None)
        where = served.taxonomy.resolve(search.category)
        hits, strategy = served.search_where(vector, search.k, where, self.overfetch_min_share)
        self.on_filter(strategy)
        return Answer(served, hits[0], facets, strategy, where.values)

    @staticmethod
    def _encode(served: ServedRelease, batch: list[Search]) -> np.ndarray:
        """The query vectors of the batch, in its order: texts in one call, photos in one."""
        vectors: list[np.ndarray | None] = [None] * len(batch)
        for kind, encode in ((TEXT, served.embedder.texts), (PHOTO, served.embedder.images)):
            mine = [i for i, s in enumerate(batch) if s.kind == kind]
            if mine:
                for i, vector in zip(mine, encode([batch[i].query for i in mine]), strict=True):
                    vectors[i] = vector
        return np.stack(vectors).astype(np.float32, copy=False)
