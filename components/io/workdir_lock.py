"""One step at a time in a work directory.

Two runs on one workdir (two `python -m components` processes, a DAG run beside a `dvc
repro`) would interleave their writes. Every step holds an exclusive `flock` on
`<workdir>/.lock` while it runs; a second one is refused at once with a message naming
the holder. The kernel drops the lock when its process dies, even by `kill -9`, so a
crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from components.errors import StepFailed

LOCK_NAME = ".lock"


class WorkdirBusy(StepFailed):
    """Another process holds the work directory."""


@contextmanager
def holding(workdir: Path, step: str, shard: str | None = None) -> Iterator[None]:
    """Hold `workdir`'s lock while the body runs. The shards of a sharded step
    (`shard`: its name) run side by side: each holds the workdir's lock shared (no
    unsharded step starts meanwhile) and its own shard's lock alone.

    Raises:
        WorkdirBusy: another process holds it; the message says which.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if shard is None:
        with _locked(workdir / LOCK_NAME, workdir, step, fcntl.LOCK_EX):
            yield
        return
    with (
        _locked(workdir / LOCK_NAME, workdir, step, fcntl.LOCK_SH),
        _locked(workdir / f"{LOCK_NAME}-{step}-{shard}", workdir, f"{step} shard {shard}"),
    ):
        yield


@contextmanager
def _locked(path: Path, workdir: Path, step: str, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
    """flock `path` (exclusive: the holder's description is written into it)."""
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "the shards of a sharded step"
            raise WorkdirBusy(
                f"{workdir} is in use ({holder}); wait for that run to finish, or give this "
                "one its own paths.workdir"
            ) from None
        exclusive = mode == fcntl.LOCK_EX
        if exclusive:
            handle.seek(0)
            handle.truncate()
            since = datetime.now(UTC).isoformat(timespec="seconds")
            handle.write(f"step {step}, pid {os.getpid()} on {socket.gethostname()}, since {since}")
            handle.flush()
        try:
            yield
        finally:
            if exclusive:
                handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
