"""Writing a file so that no reader ever sees it half-written.

The bytes go to a hidden temporary file beside the target (`.<name>.tmp`, same folder,
same file system) and are renamed onto it only when writing finished; a process killed
midway leaves the old file or none, plus a temporary file the next run overwrites.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """The temporary path to write instead of `path`; renamed onto `path` when the body
    ends without an error, removed when it raises."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with writing(path) as tmp:
        tmp.write_text(text)


def write_table(table, path: Path, **options) -> None:
    """`pyarrow.parquet.write_table` (with `options`), atomically."""
    import pyarrow.parquet as pq

    with writing(path) as tmp:
        pq.write_table(table, tmp, **options)


def copy_file(source: Path, path: Path) -> None:
    """A copy of `source` at `path`, atomically."""
    import shutil

    with writing(path) as tmp:
        shutil.copyfile(source, tmp)
