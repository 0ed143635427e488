"""A local MLflow tracking store comes into being whole or not at all.

MLflow creates a sqlite tracking store by running its schema migrations one after another
in the file itself. A process killed between two (a `kill -9` of train a few seconds into
a first run) leaves tables that the next run tries to create again (`table datasets
already exists`), and every later run fails until someone deletes the file. So a sqlite
store that does not exist yet is created and migrated in a temporary file beside it,
under a lock, and renamed into place only when whole; a reader sees no store or a whole
one. A store that is there but not whole (left by an older version of this project) is
named in a one-line error that says how to recover.

A workdir's own store (`<workdir>/mlflow.db`, its artifacts in `<workdir>/mlartifacts`)
moves with the workdir. MLflow records absolute artifact locations (each experiment's, run's,
logged model's and model version's), so a workdir copied, restored or mounted at another
path would write its new runs into the old place and resolve its registered models there.
When the store is opened at a path other than the one its locations name, they are
rewritten to the new place first (`follow_workdir`), under the creation lock, in one
transaction, and said in one log line. One workdir mounted at two paths at once should be
mounted at the same path everywhere: each opening would move the locations to its own.

Tracking servers and other databases are used as given: they are created by their
operators (`mlflow server`, `mlflow db upgrade`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote

from components.config import StepPaths

SQLITE = "sqlite:///"
ARTIFACTS = "mlartifacts"  # beside the store: its artifact root
# the columns that hold an absolute artifact location (MLflow's schema)
LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)

log = logging.getLogger(__name__)


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
        db = Path(uri.removeprefix(SQLITE).split("?", 1)[0])
        ensure_whole(db)
        if db.resolve() == (paths.workdir / "mlflow.db").resolve():  # the workdir's own
            follow_workdir(db.resolve())
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
            _create(tmp, db.parent / ARTIFACTS)
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


@cache
def follow_workdir(db: Path) -> int:
    """Point the artifact locations of the store `db` at `<its folder>/mlartifacts` when
    they name another folder's (the workdir moved since they were written); the number of
    locations rewritten. Once per process."""
    new = (db.parent / ARTIFACTS).resolve()
    with _locked(db), contextlib.closing(sqlite3.connect(db)) as conn:
        old = _artifact_root(conn)
        if old is None or old == new:
            return 0
        moved = 0
        with conn:  # one transaction: every location moves, or none
            for old_form, new_form in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                for table, column in LOCATIONS:
                    moved += _replace_prefix(conn, table, column, old_form, new_form)
    log.info(
        "MLflow store %s: the workdir moved; %d artifact locations now point under %s "
        "(they named %s)",
        db,
        moved,
        new,
        old,
    )
    return moved


def _artifact_root(conn: sqlite3.Connection) -> Path | None:
    """The artifact root the store was created with: its Default experiment's location
    (`<root>/0`); None when it is not a local folder (an operator's store)."""
    found = conn.execute(
        "select artifact_location from experiments where experiment_id = 0"
    ).fetchone()
    location = found[0] if found else None
    if not location or not location.startswith("file://") or not location.endswith("/0"):
        return None
    return Path(unquote(location.removeprefix("file://").removesuffix("/0")))


def _replace_prefix(conn: sqlite3.Connection, table: str, column: str, old: str, new: str) -> int:
    """Rewrite `old` to `new` at the start of `table.column` where `old` is a whole path
    prefix (followed by `/` or the end)."""
    size = len(old)
    done = conn.execute(
        f"update {table} set {column} = ? || substr({column}, ?) "  # names from LOCATIONS
        f"where substr({column}, 1, ?) = ? "
        f"and (length({column}) = ? or substr({column}, ?, 1) = '/')",
        (new, size + 1, size, old, size, size + 1),
    )
    return done.rowcount
