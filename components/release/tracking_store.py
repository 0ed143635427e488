"""A local MLflow tracking store comes into being whole or not at all.

MLflow creates a sqlite tracking store by running its schema migrations one after another
in the file itself. A process killed between two (a `kill -9` of train a few seconds into
a first run) leaves tables that the next run tries to create again (`table datasets
already exists`), and every later run fails until someone deletes the file. So a sqlite
store that does not exist yet is created and migrated in a temporary file beside it,
under a lock, and renamed into place only when whole; a reader sees no store or a whole
one. A store that is there but not whole (left by an older version of this project) is
named in a one-line error that says how to recover.

Tracking servers and other databases are used as given: they are created by their
operators (`mlflow server`, `mlflow db upgrade`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from components.config import StepPaths

SQLITE = "sqlite:///"


class BrokenTrackingStore(ValueError):
    """A local tracking store whose schema is not whole; the message says what to do."""


def tracking_uri(paths: StepPaths) -> str:
    """`paths.mlflow_uri`, with the sqlite store it names created whole first when missing,
    and checked to be whole when present.

    Raises:
        BrokenTrackingStore: the sqlite file is half-created or from another MLflow schema.
    """
    uri = paths.mlflow_uri
    if uri.startswith(SQLITE):
        ensure_whole(Path(uri.removeprefix(SQLITE).split("?", 1)[0]))
    return uri


def ensure_whole(db: Path) -> None:
    """Create the sqlite store `db` if it is missing (whole, or not at all), else check it."""
    if db.exists():
        _check(db.resolve())
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with _locked(db):
        if db.exists():  # another process created it while this one waited
            _check(db.resolve())
            return
        for stale in db.parent.glob(f".{db.name}.creating-*"):  # a creator that was killed
            stale.unlink()
        tmp = db.parent / f".{db.name}.creating-{os.getpid()}"
        try:
            _create(tmp, db.parent / "mlartifacts")
            _fsync(tmp)
            os.replace(tmp, db)
            _fsync(db.parent)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(db: Path) -> Iterator[None]:
    """One creator at a time (shards, a DAG's parallel tasks); the lock dies with its
    process, so a killed creator never blocks the next."""
    with (db.parent / f".{db.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _create(path: Path, artifacts: Path) -> None:
    """An MLflow tracking and registry store at `path`: every migration run, at MLflow's
    head revision."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"{SQLITE}{path.resolve()}", artifacts.resolve().as_uri())
    store.engine.dispose()


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@cache
def _check(db: Path) -> None:
    """A store found whole once stays whole for the life of the process."""
    head = head_revision()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("select name from sqlite_master")}
            revision = None
            if "alembic_version" in tables:
                found = conn.execute("select version_num from alembic_version").fetchone()
                revision = found[0] if found else None
            held = _rows(conn, tables, ("runs", "registered_models"))
    except sqlite3.DatabaseError as err:
        raise BrokenTrackingStore(
            f"{db} is not an MLflow tracking store ({err}); move it aside and run again"
        ) from err
    if revision == head:
        return
    if not held:
        raise BrokenTrackingStore(
            f"{db} is a half-created MLflow tracking store (schema revision {revision}, not "
            f"{head}: its creation was interrupted); it holds no runs or models, so remove "
            f"it (rm {db}) and run again"
        )
    raise BrokenTrackingStore(
        f"{db} holds {held} runs and models at MLflow schema revision {revision}, not this "
        f"MLflow's {head}: back it up, then upgrade it with: mlflow db upgrade {SQLITE}{db}"
    )


def _rows(conn: sqlite3.Connection, tables: set[str], names: tuple[str, ...]) -> int:
    return sum(
        conn.execute(f"select count(*) from {name}").fetchone()[0]
        for name in names
        if name in tables
    )


@cache
def head_revision() -> str:
    """The schema revision this MLflow creates and expects."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()
