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
def holding(workdir: Path, step: str) -> Iterator[None]:
    """Hold `workdir`'s lock while the body runs.

    Raises:
        WorkdirBusy: another process holds it; the message says which.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_NAME
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkdirBusy(
                f"{workdir} is in use ({holder}); wait for that run to finish, or give this "
                "one its own paths.workdir"
            ) from None
        handle.seek(0)
        handle.truncate()
        since = datetime.now(UTC).isoformat(timespec="seconds")
        handle.write(f"step {step}, pid {os.getpid()} on {socket.gethostname()}, since {since}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
