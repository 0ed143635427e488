"""Killing a process while it creates its MLflow tracking store, at points found by
polling the store as it grows (never by fixed sleeps): used by tests/test_tracking_store.py
and benchmarks/faults.py."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
from pathlib import Path


def table_count(db: Path) -> int | None:
    """Tables in the sqlite file `db` now; None when it cannot be read this instant (not
    a database yet, or locked by its writer)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0)) as c:
            return c.execute("select count(*) from sqlite_master where type='table'").fetchone()[0]
    except sqlite3.Error:
        return None


def kill_when(argv: list[str], cwd: Path, reached, timeout: float = 300.0, every: float = 0.002):
    """Run `argv` and SIGKILL it as soon as `reached()` (polled every `every` seconds)
    returns something other than None; return that, or None when the process ended (or the
    timeout passed) first."""
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            found = reached()
            if found is not None:
                process.kill()
                process.wait()
                return found
            time.sleep(every)
        return None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def kill_during_creation(
    argv: list[str], cwd: Path, db: Path, at_tables: int, timeout: float = 300.0
) -> int | None:
    """Run `argv` and SIGKILL it once the store it is creating for `db` (the temporary
    `.<name>.creating-*` file beside it) holds `at_tables` tables (0: as soon as that file
    exists). Returns the tables it held when killed, or None when the process ended (or
    the store was renamed into place) before that point."""

    def reached() -> int | None:
        for creating in db.parent.glob(f".{db.name}.creating-*"):
            tables = 0 if at_tables == 0 else table_count(creating)
            if tables is not None and tables >= at_tables:
                return tables
        return None

    return kill_when(argv, cwd, reached, timeout)
