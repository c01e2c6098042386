"""Parquet written the way readers want it: whole tables as bytes, and streamed files whose
row groups are large however small the pieces they are streamed in (a row group per piece
restarts dictionaries and compression and adds metadata: larger, slower files;
``bench/io_paths.py``)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["ROW_GROUP_BYTES", "RowGroupWriter", "table_to_parquet_bytes"]

ROW_GROUP_BYTES = 64 << 20
"""Arrow bytes buffered before a row group is written (tens of MB on disk once compressed,
within the 64 MB - 1 GB that Parquet readers are tuned for; bounds the writer's memory)."""

COMPRESSION = "zstd"


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as one Parquet file (zstd), in memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION)
    return sink.getvalue().to_pybytes()


class RowGroupWriter:
    """A ``pq.ParquetWriter`` that buffers the tables it is given and writes them as row
    groups of about ``row_group_bytes`` (Arrow size), in the order given.

    ``schema``: every table written must have it (a mismatch is an error naming both). Use
    as a context manager: leaving the block normally writes what is buffered and the footer;
    leaving it by an exception drops the buffer (the file is being discarded anyway).
    """

    def __init__(
        self,
        sink: Any,
        schema: pa.Schema,
        *,
        row_group_bytes: int = ROW_GROUP_BYTES,
        compression: str = COMPRESSION,
    ) -> None:
        if row_group_bytes < 1:
            raise ValueError(f"row_group_bytes must be >= 1, got {row_group_bytes}")
        self.schema, self.row_group_bytes = schema, row_group_bytes
        self._writer = pq.ParquetWriter(sink, schema, compression=compression)
        self._buffer: list[pa.Table] = []
        self._bytes = 0
        self.rows = 0

    def write_table(self, table: pa.Table) -> None:
        if not table.schema.equals(self.schema):
            raise ValueError(
                f"RowGroupWriter: table schema\n{table.schema}\ndiffers from the file's\n{self.schema}"
            )
        if not table.num_rows:
            return
        self._buffer.append(table)
        self._bytes += table.nbytes
        self.rows += table.num_rows
        if self._bytes >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered as one row group."""
        if self._buffer:
            whole = pa.concat_tables(self._buffer)
            self._writer.write_table(whole, row_group_size=whole.num_rows)
            self._buffer, self._bytes = [], 0

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._buffer = []
            self._writer.close()
