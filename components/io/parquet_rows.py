"""Reading a parquet file front to back, a given number of rows at a time: how the
gathers of sharded steps walk each shard's files in step with the others, holding one
chunk of rows, never a whole file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class RowReader:
    def __init__(self, path: Path, columns: list[str] | None = None) -> None:
        self.path = path
        self._batches = pq.ParquetFile(path).iter_batches(columns=columns)
        schema = pq.read_schema(path)
        if columns is not None:
            schema = pa.schema([schema.field(name) for name in columns])
        self._buffer = pa.Table.from_batches([], schema=schema)

    def take(self, rows: int) -> pa.Table:
        """The next `rows` rows.

        Raises:
            ValueError: the file has fewer rows left, naming it.
        """
        while self._buffer.num_rows < rows:
            batch = next(self._batches, None)
            if batch is None:
                raise ValueError(
                    f"{self.path}: {self._buffer.num_rows} rows left, {rows} expected; the "
                    "shard's files disagree with each other: run that shard again"
                )
            self._buffer = pa.concat_tables([self._buffer, pa.Table.from_batches([batch])])
        taken, self._buffer = self._buffer.slice(0, rows), self._buffer.slice(rows)
        return taken
