import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmbseg.storage.parquet import RowGroupWriter, table_to_parquet_bytes

SCHEMA = pa.schema([pa.field("i", pa.int64(), nullable=False), ("name", pa.string())])


def _part(start: int, n: int) -> pa.Table:
    return pa.table(
        {"i": range(start, start + n), "name": [f"r{k}" for k in range(n)]}, schema=SCHEMA
    )


def _parts() -> list[pa.Table]:
    sizes = [3, 0, 5, 1, 4, 0, 2]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [_part(s, n) for s, n in zip(starts, sizes, strict=True)]


def test_small_pieces_become_one_row_group_in_order():
    buf = io.BytesIO()
    with RowGroupWriter(buf, SCHEMA) as writer:
        for part in _parts():
            writer.write_table(part)
    meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
    assert (meta.num_row_groups, meta.num_rows, writer.rows) == (1, 15, 15)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    assert table.equals(pa.concat_tables(_parts())) and table.column("i").to_pylist() == [
        *range(15)
    ]


def test_a_row_group_is_written_each_time_the_buffer_reaches_its_size():
    parts = _parts()
    size = parts[0].nbytes + parts[2].nbytes  # reached by the first two non-empty pieces
    buf = io.BytesIO()
    with RowGroupWriter(buf, SCHEMA, row_group_bytes=size) as writer:
        for part in parts:
            writer.write_table(part)
    f = pq.ParquetFile(io.BytesIO(buf.getvalue()))
    groups = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
    assert groups == [8, 7]  # 3+5 reach it; the rest (1+4+2) is written at close
    assert f.read().equals(pa.concat_tables(parts))


def test_no_rows_still_makes_a_valid_empty_file():
    buf = io.BytesIO()
    with RowGroupWriter(buf, SCHEMA) as writer:
        writer.write_table(SCHEMA.empty_table())
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


def test_a_table_of_another_schema_is_refused_by_name():
    other = pa.table({"i": [1], "label": ["x"]})
    with (
        RowGroupWriter(io.BytesIO(), SCHEMA) as writer,
        pytest.raises(ValueError, match=r"table schema\n(.|\n)*label(.|\n)*differs"),
    ):
        writer.write_table(other)
    with pytest.raises(ValueError, match="row_group_bytes must be >= 1, got 0"):
        RowGroupWriter(io.BytesIO(), SCHEMA, row_group_bytes=0)


def test_an_exception_in_the_block_drops_the_buffer_and_propagates():
    buf = io.BytesIO()
    with pytest.raises(RuntimeError, match="boom"), RowGroupWriter(buf, SCHEMA) as writer:
        writer.write_table(_part(0, 3))
        raise RuntimeError("boom")
    assert writer._buffer == []


def test_table_to_parquet_bytes_round_trips():
    table = _part(0, 4)
    assert pq.read_table(io.BytesIO(table_to_parquet_bytes(table))).equals(table)
