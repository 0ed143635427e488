"""Photo queries encoded in a process of their own, paced by a share of one core.

A photo costs ~30 ms of a core to encode (EfficientNet-Lite0, 224 px), a text query well
under 1 ms. Encoded in the service's process, photos share its interpreter lock with the
text searches, and a burst of them held every text search up (text p99 119 ms in a mixed
load against 44 ms text-only); a lower-priority thread or a child process at nice +10 did
not help much (about 100 ms: on 2 busy cores a nice +10 process still gets its share of
each core, in slices text searches wait behind). A child under Linux's SCHED_IDLE policy
(`serve.photo_priority: idle`) did better (1.5x) but still slowed the text searches beside
it (the cores' caches and memory are shared, and a core is taken back only after a
moment), and starved photos whenever the cores were busy.

So the child paces itself (`serve.photo_share`): while the service answers other requests
(`foreground`, a count in shared memory the service keeps), it encodes at most that share
of one core's time, pausing between the model's layers (`Yielding`); with nothing else in
flight it runs at full speed. Text p99 in the mixed load 0.99-1.36x text-only at a share
of 0.15, with ~5 photos/s answered on 2 busy cores (docs/benchmarks.md).

The child is started with the service (`serve.photo_warm`; else on the first photo
search), spawned (no state of the service's threads is copied), gets the served release's
model once per model (a refresh that only changes the index reuses it; a new model is
sent with the first photo search after it), and is started again on the next photo
search if it dies; the searches in flight then fail with `PhotoEncoderStopped` (the app's
503).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np

log = logging.getLogger(__name__)


class PhotoEncoderStopped(RuntimeError):
    """The photo encoder process stopped while encoding; the next photo search restarts it."""


class PhotoEncoder:
    """Encodes batches of decoded photos for a release's model in a child process.

    `foreground` counts the requests other than photo searches the service is answering
    (the service increments it as one starts and decrements it as it ends, from one thread:
    its event loop); while it is above 0 the child encodes at most `share` of one core's
    time (1: no limit)."""

    def __init__(self, priority: str, device: str = "cpu", share: float = 1.0) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"serve.photo_share must be in (0, 1], got {share}")
        self.priority, self.device, self.share = priority, device, share
        # shared memory the children read: it outlives a child that died
        self.foreground = multiprocessing.get_context("spawn").RawValue("i", 0)
        self._lock = threading.Lock()  # one batch at a time through the pipe
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._model_key: tuple | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def encode(self, embedder, key: tuple, images: list) -> np.ndarray:
        """The query vectors of `images` by `embedder`'s model (`key` names the model:
        it is sent to the child only when it changes).

        Raises:
            PhotoEncoderStopped: the child died (it is started again next time).
            RuntimeError: the child could not encode them (the message says why).
        """
        with self._lock, self._stopping():
            self._ready(embedder, key)
            return self._call(("encode", images))

    def warm(self, embedder=None, key: tuple | None = None) -> None:
        """Start the child and give it `embedder`'s model (none: no release served yet)
        ahead of the first photo search (`serve.photo_warm`), so that its start does not
        run beside text searches then.

        Raises:
            PhotoEncoderStopped: the child died meanwhile (the next photo search starts it).
            RuntimeError: the child could not load the model (the message says why).
        """
        with self._lock, self._stopping():
            if not self._closed:  # the service may have stopped before this began
                self._ready(embedder, key)

    def _ready(self, embedder, key: tuple | None) -> None:
        if self._process is None or not self._process.is_alive():
            self._start()
        if embedder is not None and key != self._model_key:
            self._call(("model", embedder.model, embedder.spec))
            self._model_key = key

    @contextlib.contextmanager
    def _stopping(self):
        """`PhotoEncoderStopped` for a pipe that broke because the child died."""
        try:
            yield
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = self._process.exitcode if self._process is not None else None
            self._stopped()
            raise PhotoEncoderStopped(
                f"the photo encoder process stopped (exit code {code}); it is started "
                "again on the next photo search"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                with contextlib.suppress(OSError):  # it died already
                    self._conn.send(None)
            if self._process is not None:
                self._process.join(timeout=10)
                if self._process.is_alive():
                    self._process.kill()
            self._stopped()

    def _start(self) -> None:
        self._stopped()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(theirs, self.priority, self.device, self.foreground, self.share),
            name="photo-encoder",
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        log.info(
            "serve: photo encoder process %d started (%s priority)", process.pid, self.priority
        )

    def _stopped(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn, self._model_key = None, None, None

    def _call(self, message: tuple):
        self._conn.send(message)
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"photo encoder: {value}")
        return value


def lower_priority(priority: str, thread_id: int = 0) -> None:
    """Give the calling process (or the thread `thread_id`) a lower scheduling priority:
    `idle` (SCHED_IDLE), `low` (nice +10), `normal` (unchanged). Linux schedules threads,
    each with a policy and nice value of its own; elsewhere this would apply to the whole
    process, so nothing is done there."""
    if priority == "normal" or sys.platform != "linux":
        return
    if priority == "idle":
        os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
    else:
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + 10))


class Yielding:
    """A forward pre-hook for every module run in the photo encoder's process: while
    `foreground` (requests other than photo searches in flight) is above 0, the process's
    encoding takes at most `share` of one core's time. A token bucket: credit accrues at
    `share` seconds a second of wall time, up to `burst_s`, and the CPU time spent between
    two modules is taken from it; below zero, it sleeps (in steps of at most `poll_s`)
    until the credit is back or the foreground is idle. With the foreground idle it runs
    freely and its credit is full. Pauses fall between modules, so one module's work (a
    convolution: a millisecond or two) is the longest stretch it runs past its share."""

    def __init__(
        self,
        foreground,
        share: float,
        burst_s: float = 0.002,
        poll_s: float = 0.01,
        clock: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.thread_time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.foreground, self.share, self.burst_s, self.poll_s = foreground, share, burst_s, poll_s
        self.clock, self.cpu, self.sleep = clock, cpu, sleep
        self.credit, self._wall, self._cpu = burst_s, clock(), cpu()

    def __call__(self, module=None, args=None) -> None:
        wall, cpu = self.clock(), self.cpu()
        if not self.foreground.value:
            self.credit, self._wall, self._cpu = self.burst_s, wall, cpu
            return
        earned = self.share * (wall - self._wall)
        self.credit = min(self.burst_s, self.credit + earned - (cpu - self._cpu))
        self._wall = wall
        if self.credit < 0:
            until = wall - self.credit / self.share  # when the credit is back at 0
            while until - wall > 1e-6 and self.foreground.value:
                self.sleep(min(self.poll_s, until - wall))
                wall = self.clock()
            self.credit = min(self.burst_s, self.credit + self.share * (wall - self._wall))
            self._wall = wall
        self._cpu = self.cpu()  # what it spends from here on is taken at the next module


def _serve(conn: Connection, priority: str, device: str, foreground, share: float) -> None:
    """The child: set its priority (and, below a share of 1, yield to the foreground
    between modules), then answer messages until the pipe closes."""
    import torch

    from components.core.query_embedder import QueryEmbedder

    lower_priority(priority)
    torch.set_num_threads(1)  # as the service: one core per search in flight
    if share < 1.0:  # every module this process runs is a photo's
        torch.nn.modules.module.register_module_forward_pre_hook(Yielding(foreground, share))
    embedder = None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        try:
            if message[0] == "model":
                _, model, spec = message
                embedder = QueryEmbedder(model, spec, torch.device(device))
                conn.send(("ok", None))
            else:
                conn.send(("ok", embedder.images(message[1])))
        except Exception as err:  # the parent raises it for the batch
            conn.send(("error", f"{type(err).__name__}: {err}"))
