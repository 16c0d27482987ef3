"""PostgreSQL binary COPY for activation rows, encoded with numpy instead of a Python loop per row.

Binary COPY is the fast path (text COPY is many times slower). Rows with the same
layout (which columns are null, how long the task name is) have a fixed width, so
each such group is one structured numpy array written in a single pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import psycopg
from psycopg import sql

from eidetic.wire.rows import METADATA_COLUMNS, ActivationRows

HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_Parsed = TypeVar("_Parsed")
TRAILER = (-1).to_bytes(2, "big", signed=True)

# The activations table's columns in COPY order, with their binary widths.
COPY_COLUMNS = ("run_id", "layer_id", "batch_seq", "row_no", *METADATA_COLUMNS, "task", "values")
_INT_WIDTHS = {"sample_id": ">i8", "step": ">i8", "epoch": ">i4", "label": ">i4"}


def encode_activations(rows: ActivationRows, run_id: int, layer_id: int, batch_seq: int) -> bytes:
    """The whole COPY stream (header, tuples, trailer) for one batch, as one bytes object."""
    return b"".join(iter_copy_chunks(rows, run_id, layer_id, batch_seq))


def iter_copy_chunks(
    rows: ActivationRows, run_id: int, layer_id: int, batch_seq: int, chunk_rows: int = 32768
) -> Iterator[bytes | memoryview]:
    """The COPY stream in pieces, written to the server without joining them (no extra copy).

    Chunks of `chunk_rows` rows keep the encoded copy of a large batch small.
    """
    yield HEADER
    for start in range(0, rows.n_rows, chunk_rows):
        for index in _layout_groups(rows, start, min(start + chunk_rows, rows.n_rows)):
            yield memoryview(_encode_group(rows, index, run_id, layer_id, batch_seq).data).cast("B")
    yield TRAILER


def _layout_groups(rows: ActivationRows, start: int, stop: int) -> list[np.ndarray]:
    """Row indices of [start, stop) grouped by layout: same null columns, same task length."""
    task_bytes = [name.encode() for name in rows.task_names]
    name_lengths = np.array([len(name) for name in task_bytes] + [-1], dtype=np.int64)
    layout = name_lengths[rows.task_codes[start:stop]] + 1  # code -1 picks the trailing -1: no task
    for bit, name in enumerate(METADATA_COLUMNS):
        layout = layout | (rows.column(name).null_mask()[start:stop].astype(np.int64) << (40 + bit))
    if (layout == layout[0]).all():
        return [np.arange(start, stop)]
    _, inverse = np.unique(layout, return_inverse=True)
    return [start + np.flatnonzero(inverse == group) for group in range(int(inverse.max()) + 1)]


def _encode_group(
    rows: ActivationRows,
    index: np.ndarray,
    run_id: int,
    layer_id: int,
    batch_seq: int,
) -> np.ndarray:
    first = int(index[0])
    fields: list[tuple] = [("n_fields", ">i2")]
    fields += [("run_id_len", ">i4"), ("run_id", ">i8"), ("layer_id_len", ">i4"), ("layer_id", ">i8")]
    fields += [("batch_seq_len", ">i4"), ("batch_seq", ">i8"), ("row_no_len", ">i4"), ("row_no", ">i4")]
    present = {}
    for name in METADATA_COLUMNS:
        column = rows.column(name)
        present[name] = not bool(column.nulls is not None and column.nulls[first])
        fields.append((f"{name}_len", ">i4"))
        if present[name]:
            fields.append((name, _INT_WIDTHS[name]))
    task_bytes = [name.encode() for name in rows.task_names]
    task_code = int(rows.task_codes[first])
    task = None if task_code < 0 else task_bytes[task_code]
    fields.append(("task_len", ">i4"))
    if task is not None:
        fields.append(("task", f"S{len(task)}") if task else ("task", "V0"))
    dim = rows.dim
    fields += [("values_len", ">i4"), ("values_dim", ">i2"), ("values_unused", ">i2"), ("values", ">f4", (dim,))]

    records = np.empty(len(index), dtype=np.dtype(fields))
    records["n_fields"] = len(COPY_COLUMNS)
    for name, width in (("run_id", 8), ("layer_id", 8), ("batch_seq", 8), ("row_no", 4)):
        records[f"{name}_len"] = width
    records["run_id"] = run_id
    records["layer_id"] = layer_id
    records["batch_seq"] = batch_seq
    records["row_no"] = index
    for name in METADATA_COLUMNS:
        if present[name]:
            records[f"{name}_len"] = np.dtype(_INT_WIDTHS[name]).itemsize
            records[name] = rows.column(name).data[index]
        else:
            records[f"{name}_len"] = -1
    if task is None:
        records["task_len"] = -1
    else:
        records["task_len"] = len(task)
        if task:
            names = np.array(task_bytes, dtype=f"S{max(len(t) for t in task_bytes)}")
            records["task"] = names[rows.task_codes[index]]
    records["values_len"] = 4 + 4 * dim
    records["values_dim"] = dim
    records["values_unused"] = 0
    records["values"] = rows.values[index[0] : index[-1] + 1] if _is_range(index) else rows.values[index]
    return records


def _is_range(index: np.ndarray) -> bool:
    return int(index[-1]) - int(index[0]) + 1 == len(index)


def iter_vectors(
    conn: psycopg.Connection, select: sql.Composable, params: list, dim: int, chunk_rows: int = 65536
) -> Iterator[np.ndarray]:
    """The vectors a one-column SELECT returns, as float32 matrices of at most `chunk_rows` rows.

    Binary COPY out, parsed with one structured dtype (every tuple has the same width), so
    a scan of millions of rows never builds a Python object per row or per value.
    """
    record = np.dtype(
        [("n_fields", ">i2"), ("length", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("values", ">f4", (dim,))]
    )
    yield from _iter_records(conn, select, params, record, chunk_rows, _parse_vectors)


def iter_bigint_vectors(
    conn: psycopg.Connection, select: sql.Composable, params: list, n_ints: int, dim: int, chunk_rows: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ints, vectors) of a SELECT of `n_ints` bigint columns (never NULL) then a vector: an int64 matrix
    (rows x n_ints) and a float32 one, in chunks of at most `chunk_rows` rows; the `iter_vectors` parse."""
    fields: list[tuple] = [("n_fields", ">i2")]
    for i in range(n_ints):
        fields += [(f"length{i}", ">i4"), (f"int{i}", ">i8")]
    fields += [("length", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("values", ">f4", (dim,))]

    def parse(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if any((records[f"length{i}"] != 8).any() for i in range(n_ints)):
            raise ValueError("a NULL bigint where every row should have one")
        ints = np.stack([records[f"int{i}"].astype(np.int64) for i in range(n_ints)], axis=1)
        return ints.reshape(len(records), n_ints), _parse_vectors(records)

    yield from _iter_records(conn, select, params, np.dtype(fields), chunk_rows, parse)


def _iter_records(
    conn: psycopg.Connection,
    select: sql.Composable,
    params: list,
    record: np.dtype,
    chunk_rows: int,
    parse: Callable[[np.ndarray], _Parsed],
) -> Iterator[_Parsed]:
    """`parse` of the tuples of a binary COPY out of `select`, every one `record` wide.

    `parse` gets a structured view of the buffer and must copy what it keeps: the buffer
    is cut right after it returns.
    """
    statement = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(select)
    buffer = bytearray()
    header_left = len(HEADER)
    cursor = conn.cursor()
    with cursor.copy(statement, params) as copy:
        for data in copy:
            buffer += data
            if header_left:
                if len(buffer) < header_left:
                    continue
                del buffer[:header_left]
                header_left = 0
            whole = len(buffer) // record.itemsize
            if whole >= chunk_rows:
                yield parse(np.frombuffer(buffer, dtype=record, count=whole))
                del buffer[: whole * record.itemsize]
    whole = len(buffer) // record.itemsize  # what is left: whole tuples and the 2-byte trailer
    if whole:
        yield parse(np.frombuffer(buffer, dtype=record, count=whole))


def _parse_vectors(records: np.ndarray) -> np.ndarray:
    if (records["length"] < 0).any():
        raise ValueError("a NULL vector in a column that should have none")
    return records["values"].astype(np.float32)
