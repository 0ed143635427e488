"""Searches answered in batches, one worker thread per kind: text queries and photos.

Encoding queries one request at a time, each in its own thread, spends the CPU on thread
switching and lock contention as clients are added (on 2 cores: 354 requests/s with one
client, 147 with sixteen). Here every request puts its query on its kind's queue; that
kind's thread takes whatever is waiting (up to `max_batch`), encodes it in one call (a
photo is decoded, within the service's limits, by its request before it is queued), and
searches the index once for every request without a filter; a filtered request searches
on its own (components/service/filters.py). So a busy service does more per call instead
of more calls, and a text search never waits behind a batch of photos. A batch is
answered by one release: the one being served when the batch starts.

Photos are kept off the text searches' CPU: they are encoded in a process of their own
that takes only a share of a core while other requests are in flight (`photo_encoder.py`;
or, with `photo_encoder=None`, in the photo worker thread at `photo_priority`, Linux
scheduling each thread on its own); and at most `max_photo_queue` photos wait or are
encoded at once: past that a photo search is refused at once (`Overloaded`, the app's 503
with `Retry-After`) instead of waiting longer than a client would.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from components.service.photo_encoder import PhotoEncoder, lower_priority
from components.service.releases import ServedRelease

log = logging.getLogger(__name__)

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


class Overloaded(RuntimeError):
    """A kind's queue is full: the search was not queued; try again in `retry_after_s`."""

    def __init__(self, kind: str, waiting: int, retry_after_s: int) -> None:
        super().__init__(
            f"{waiting} {kind} searches are waiting (serve.max_{kind}_queue): "
            f"try again in {retry_after_s} s"
        )
        self.kind, self.retry_after_s = kind, retry_after_s


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
        max_photo_batch: int = 4,
        overfetch_min_share: float = 0.25,
        on_filter: Callable[[str], None] = lambda strategy: None,
        max_photo_queue: int | None = None,
        photo_priority: str = "normal",
        photo_encoder: PhotoEncoder | None = None,
    ) -> None:
        self.release = release  # the release to answer from (raises when none is loaded)
        # a photo costs ~31 ms of a CPU core to encode (EfficientNet-Lite0, 224 px) and
        # batching does not make it cheaper there: small photo batches bound the wait
        self.max_batch = {TEXT: max_batch, PHOTO: max_photo_batch}
        self.overfetch_min_share = overfetch_min_share
        self.on_filter = on_filter
        self.max_waiting = {TEXT: None, PHOTO: max_photo_queue}  # None: unbounded
        self.photo_encoder = photo_encoder  # None: photos are encoded in the photo worker
        # the photo worker's own priority: with a photo encoder process, that process's
        self.priority = {TEXT: "normal", PHOTO: "normal" if photo_encoder else photo_priority}
        self._waiting = {TEXT: 0, PHOTO: 0}  # submitted, not answered yet
        self._seconds_each = {TEXT: 0.001, PHOTO: 0.03}  # a moving mean of one search's
        self._count = threading.Lock()
        # a queue and a worker per kind: text searches never wait behind photo encoding
        # (an image encoder pass costs ~20x a text one), and the two run side by side
        self._queues: dict[str, queue.Queue[Search | None]] = {}
        self._threads: list[threading.Thread] = []
        for kind in (TEXT, PHOTO):
            self._queues[kind] = queue.Queue()
            thread = threading.Thread(
                target=self._run,
                args=(kind,),
                name=f"search-{kind}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def admits(self, kind: str) -> None:
        """Raise `Overloaded` when `kind`'s queue is full (checked before a request does
        work for a search that would be refused: decoding a photo, say)."""
        bound = self.max_waiting[kind]
        if bound is not None and self._waiting[kind] >= bound:
            raise Overloaded(kind, self._waiting[kind], self.retry_after(kind))

    def retry_after(self, kind: str) -> int:
        """Seconds until the searches now waiting of `kind` are likely answered (>= 1)."""
        return max(1, math.ceil(self._waiting[kind] * self._seconds_each[kind]))

    def submit(self, search: Search) -> Future:
        """A future of the search's `Answer`.

        Raises:
            Overloaded: its kind's queue is full (`max_photo_queue`): it was not queued.
            RuntimeError: the batcher was closed (its app shut down): nothing would answer.
        """
        if not all(thread.is_alive() for thread in self._threads):
            raise RuntimeError("the search batcher is closed: the service is shutting down")
        if self.max_waiting[search.kind] is not None:  # counted only where bounded
            with self._count:
                self.admits(search.kind)
                self._waiting[search.kind] += 1
            search.future.add_done_callback(lambda _: self._answered(search.kind))
        self._queues[search.kind].put(search)
        return search.future

    def _answered(self, kind: str) -> None:
        with self._count:
            self._waiting[kind] -= 1

    def close(self) -> None:
        for pending in self._queues.values():
            pending.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        if self.photo_encoder is not None:
            self.photo_encoder.close()

    def warm_photos(self) -> None:
        """Start the photo encoder process with the served release's model (or without a
        model while no release is served) before any photo search needs it; a failure is
        logged: the first photo search tries again."""
        if self.photo_encoder is None:
            return
        try:
            served = self.release()
        except Exception:  # no release yet: the process alone
            served = None
        try:
            if served is None:
                self.photo_encoder.warm()
            else:
                self.photo_encoder.warm(served.embedder, _model_key(served))
        except Exception as err:
            log.warning("serve: the photo encoder did not start ahead of photos: %s", err)

    def _run(self, kind: str) -> None:
        pending, max_batch = self._queues[kind], self.max_batch[kind]
        lower_priority(self.priority[kind], threading.get_native_id())
        while (first := pending.get()) is not None:
            batch = [first]
            while len(batch) < max_batch:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    pending.put(None)  # stop after this batch
                    break
                batch.append(item)
            started = time.perf_counter()
            self._answer(batch)
            each = (time.perf_counter() - started) / len(batch)
            self._seconds_each[kind] += 0.2 * (each - self._seconds_each[kind])

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

    def _encode(self, served: ServedRelease, batch: list[Search]) -> np.ndarray:
        """The query vectors of a batch of one kind, in its order, in one encoder call."""
        queries = [search.query for search in batch]
        if batch[0].kind == TEXT:
            vectors = served.embedder.texts(queries)
        elif self.photo_encoder is not None:
            vectors = self.photo_encoder.encode(served.embedder, _model_key(served), queries)
        else:
            vectors = served.embedder.images(queries)
        return np.asarray(vectors, dtype=np.float32)


def _model_key(served: ServedRelease) -> tuple:
    """What names a release's model to the photo encoder process (sent again on a change)."""
    model = served.model
    return (model.get("name"), str(model.get("version")), model.get("sha256"))
