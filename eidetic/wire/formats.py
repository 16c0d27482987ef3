"""The wire formats of activations: Arrow IPC (bulk), .npy and JSON in; JSON and Arrow out."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from eidetic.errors import InvalidInput, MalformedBody, NonFiniteValue, UnsupportedMediaType
from eidetic.wire.rows import INT_DTYPES, METADATA_COLUMNS, ActivationRows, InvalidRows, NullableColumn, int_column
from eidetic.wire.vectors import as_float32

ARROW_STREAM = "application/vnd.apache.arrow.stream"
NPY = "application/x-npy"
JSON = "application/json"
BATCH_ID_METADATA_KEY = b"batch_id"
INGEST_COLUMNS: frozenset[str] = frozenset({"values", "task", *METADATA_COLUMNS})
_JSON_BATCH_FIELDS = frozenset({"batch_id", "rows"})
_NUMBER_TYPES = (int, float)
END_OF_ROWS = b"eidetic.end"  # custom metadata of a stream's last (empty) record batch: the rows it sent

_ARROW_INT_TYPES = {"sample_id": pa.int64(), "step": pa.int64(), "epoch": pa.int32(), "label": pa.int32()}


def load_lazy_imports() -> None:
    """Makes pyarrow import what it imports on first use (pandas, when installed), now.

    A writer left open delivers its rows from an atexit handler, while the interpreter shuts
    down; a module imported then can fail ("can't register atexit after shutdown": pandas
    pulls in concurrent.futures), which would lose the rows. Writers call this when made.
    """
    pa.array(np.empty(0, dtype=np.float32))


def media_type(content_type: str | None) -> str:
    return (content_type or JSON).split(";")[0].strip().lower()


# ---------------------------------------------------------------- Arrow


def arrow_schema(dim: int) -> pa.Schema:
    fields = [pa.field(name, _ARROW_INT_TYPES[name]) for name in METADATA_COLUMNS]
    fields += [pa.field("task", pa.string()), pa.field("values", pa.list_(pa.float32(), dim), nullable=False)]
    return pa.schema(fields)


def rows_to_arrow_table(rows: ActivationRows) -> pa.Table:
    columns = []
    for name in METADATA_COLUMNS:
        column = rows.column(name)
        columns.append(pa.array(column.data, type=_ARROW_INT_TYPES[name], mask=column.nulls))
    task = pa.DictionaryArray.from_arrays(
        pa.array(rows.task_codes, mask=rows.task_codes < 0), pa.array(list(rows.task_names), type=pa.string())
    ).cast(pa.string())
    values = pa.FixedSizeListArray.from_arrays(pa.array(rows.values.reshape(-1)), rows.dim)
    return pa.Table.from_arrays([*columns, task, values], schema=arrow_schema(rows.dim))


def rows_to_arrow(rows: ActivationRows, batch_id: str | None = None) -> bytes:
    """One Arrow IPC stream holding the batch (the ingest route's bulk format)."""
    table = rows_to_arrow_table(rows)
    if batch_id is not None:
        table = table.replace_schema_metadata({BATCH_ID_METADATA_KEY: batch_id.encode()})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def ipc_stream(schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> Iterator[bytes]:
    """An Arrow IPC stream, yielded a record batch at a time, so a large answer never sits whole in memory.

    It ends with an empty record batch whose custom metadata END_OF_ROWS holds the number of
    rows sent, then the end-of-stream marker, both written only after the last batch was read:
    a stream cut short by a failure lacks them, and a reader can tell it from a complete one.
    """
    sink = io.BytesIO()
    stream = pa.ipc.new_stream(sink, schema)  # not closed on failure: the end marker is for complete streams
    rows = 0
    for batch in batches:
        stream.write_batch(batch)
        rows += batch.num_rows
        yield _drain(sink)
    empty = pa.record_batch([pa.array([], type=field.type) for field in schema], schema=schema)
    stream.write_batch(empty, custom_metadata={END_OF_ROWS: str(rows).encode()})
    stream.close()
    yield _drain(sink)


def _drain(sink: io.BytesIO) -> bytes:
    written = sink.getvalue()
    sink.seek(0)
    sink.truncate()
    return written


def read_arrow_table(body: bytes) -> pa.Table:
    """The table an Arrow IPC stream body holds, fully validated: a stream is untrusted input."""
    try:
        reader = pa.ipc.open_stream(body)
        table = reader.read_all()
        table.validate(full=True)  # offsets, lengths and UTF-8 of every string
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as error:
        raise MalformedBody(f"not a readable Arrow IPC stream: {error}", field="body") from error
    return table


def rows_from_arrow(body: bytes) -> tuple[ActivationRows, str | None]:
    """Parses an Arrow IPC stream; returns the rows and the batch id from its metadata, if any."""
    table = read_arrow_table(body)
    _refuse_unknown(table.column_names, "column")
    if "values" not in table.column_names:
        raise InvalidInput("the Arrow stream needs a 'values' column", field="values")
    values = arrow_matrix(table.column("values"))
    n_rows = values.shape[0]
    columns = {}
    for name in METADATA_COLUMNS:
        if name not in table.column_names:
            columns[name] = NullableColumn.missing(n_rows, INT_DTYPES[name])
            continue
        chunked = table.column(name)
        if pa.types.is_null(chunked.type):  # a column of nulls only, as writers infer it
            columns[name] = NullableColumn.missing(n_rows, INT_DTYPES[name])
            continue
        if not pa.types.is_integer(chunked.type):
            raise InvalidInput(f"'{name}' must hold integers, not {chunked.type}", field=name)
        columns[name] = _int_column(chunked.combine_chunks(), name)
    task_codes, task_names = _arrow_tasks(table, n_rows)
    rows = ActivationRows(values=values, task_codes=task_codes, task_names=task_names, **columns)
    return rows, _arrow_batch_id(table.schema.metadata or {})


def _arrow_batch_id(metadata: dict[bytes, bytes]) -> str | None:
    if BATCH_ID_METADATA_KEY not in metadata:
        return None
    try:
        return metadata[BATCH_ID_METADATA_KEY].decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput("the batch id in the schema metadata is not UTF-8", field="batch_id") from error


def _refuse_unknown(names: Iterable[str], kind: str) -> None:
    """A misspelt column ("lable") would otherwise store nulls where the caller meant values."""
    for name in names:
        if name not in INGEST_COLUMNS:
            known = ", ".join(sorted(INGEST_COLUMNS))
            raise InvalidInput(f"unknown {kind} {name!r}; the known ones are {known}", field=name)


def arrow_matrix(
    chunked: pa.ChunkedArray, name: str = "values", row_field: str = "rows[{}].values", field: str | None = None
) -> np.ndarray:
    """A float32 matrix from a list column of equal-length float rows; errors name `field` (else the column),
    or `row_field` for a bad row."""
    field = field or name
    array = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
    if array.null_count:
        raise InvalidInput(f"'{name}' may not hold nulls", field=field)
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
    elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = np.asarray(array.value_lengths())
        if len(lengths) and (lengths != lengths[0]).any():
            bad = int(np.argmax(lengths != lengths[0]))
            raise InvalidInput(f"every row of '{name}' needs the same length", field=row_field.format(bad))
        dim = int(lengths[0]) if len(lengths) else 0
    else:
        raise InvalidInput(f"'{name}' must be a list of float32, not {array.type}", field=field)
    flat = array.flatten()
    if not pa.types.is_floating(flat.type):
        raise InvalidInput(f"'{name}' must hold floats, not {flat.type}", field=field)
    if flat.null_count:
        raise InvalidInput(f"'{name}' may not hold nulls", field=field)
    matrix = as_float32(flat.to_numpy(zero_copy_only=False))
    if dim == 0:
        raise InvalidInput(f"'{name}' rows are empty", field=field)
    return matrix.reshape(len(array), dim)


def _int_column(array: pa.Array, name: str) -> NullableColumn:
    filled = array.fill_null(0) if array.null_count else array
    nulls = np.asarray(array.is_null()) if array.null_count else None
    return int_column(filled.to_numpy(zero_copy_only=False), name, nulls=nulls)


def _arrow_tasks(table: pa.Table, n_rows: int) -> tuple[np.ndarray, tuple[str, ...]]:
    if "task" not in table.column_names:
        return np.full(n_rows, -1, dtype=np.int32), ()
    column = table.column("task").combine_chunks()
    if pa.types.is_null(column.type):
        return np.full(n_rows, -1, dtype=np.int32), ()
    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise InvalidInput(f"column 'task' must hold strings, not {column.type}", field="task")
    encoded = column.dictionary_encode()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    return codes, tuple(encoded.dictionary.to_pylist())


# ---------------------------------------------------------------- .npy


def rows_from_npy(body: bytes, params: dict[str, Any]) -> ActivationRows:
    """A float matrix with metadata from query parameters, or a structured array with columns."""
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise MalformedBody(f"not a readable .npy array: {error}", field="body") from error
    if array.dtype.names:
        _refuse_unknown(array.dtype.names, "field")
        if "values" not in array.dtype.names:
            raise InvalidInput("a structured .npy array needs a 'values' field", field="values")
        values = array["values"]
        given = {name: array[name] for name in (*METADATA_COLUMNS, "task") if name in array.dtype.names}
        if "task" in given:
            given["task"] = _npy_tasks(given["task"])
    else:
        values = array
        given = {name: params[name] for name in (*METADATA_COLUMNS, "task") if params.get(name) is not None}
        if params.get("sample_id_start") is not None:
            given["sample_id"] = _sample_ids(int(params["sample_id_start"]), len(values) if values.ndim else 0)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
        raise InvalidInput(
            f"the .npy values must be a 2-D float matrix, got {values.dtype} of shape {values.shape}",
            field="values",
        )
    return ActivationRows.build(values, **given)


def _sample_ids(start: int, n_rows: int) -> np.ndarray:
    """Consecutive ids from `start`; refused when the last would not fit in 64 bits (never wrapped)."""
    last = start + max(n_rows, 1) - 1
    if last > np.iinfo(np.int64).max:
        raise InvalidInput(f"sample ids {start}..{last} run past the 64-bit range", field="sample_id_start")
    return np.arange(start, start + n_rows, dtype=np.int64)


def _npy_tasks(column: np.ndarray) -> list[str]:
    if column.dtype.kind not in "SU":
        raise InvalidInput(f"'task' must hold strings, not {column.dtype}", field="task")
    tasks = []
    for i, task in enumerate(column.tolist()):
        try:
            tasks.append(task.decode("utf-8") if isinstance(task, bytes) else task)
        except UnicodeDecodeError as error:
            raise InvalidInput("a task name is not UTF-8", field=f"rows[{i}].task") from error
    return tasks


# ---------------------------------------------------------------- JSON


def rows_from_json(body: bytes) -> tuple[ActivationRows, str | None]:
    """The small-batch format: {"batch_id": ..., "rows": [{"values": [...], ...}, ...]}.

    Strict: numbers are JSON numbers (not strings or booleans), integers are integers,
    and an unknown field is an error, not something to ignore.
    """
    try:
        document = json.loads(body)
    except RecursionError as error:
        raise MalformedBody("the JSON body nests too deeply", field="body") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedBody(f"not valid JSON: {error}", field="body") from error
    if not isinstance(document, dict) or not isinstance(document.get("rows"), list):
        raise InvalidInput("the body needs a 'rows' list", field="rows")
    for name in document:
        if name not in _JSON_BATCH_FIELDS:
            raise InvalidInput(f"unknown field {name!r}; a batch has 'batch_id' and 'rows'", field=name)
    batch_id = document.get("batch_id")
    if batch_id is not None and not isinstance(batch_id, str):
        raise InvalidInput("'batch_id' must be a string", field="batch_id")
    records = document["rows"]
    if not records:
        raise InvalidInput("a batch needs at least one row", field="rows")
    dim = None
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInput("each row is an object", field=f"rows[{i}]")
        for name in record:
            if name not in INGEST_COLUMNS:
                known = ", ".join(sorted(INGEST_COLUMNS))
                raise InvalidInput(f"unknown field {name!r}; a row has {known}", field=f"rows[{i}].{name}")
        values = record.get("values")
        if not isinstance(values, list) or not values:
            raise InvalidInput("each row needs a non-empty 'values' list", field=f"rows[{i}].values")
        if not all(type(value) in _NUMBER_TYPES for value in values):
            raise InvalidInput("'values' must hold JSON numbers only", field=f"rows[{i}].values")
        if dim is None:
            dim = len(values)
        elif len(values) != dim:
            raise InvalidInput(f"row {i} has {len(values)} values, row 0 has {dim}", field=f"rows[{i}].values")
    try:
        matrix = as_float32([record["values"] for record in records])
    except OverflowError as error:  # an integer literal beyond any float
        raise NonFiniteValue(f"a value is beyond float32's range: {error}", field="rows[].values") from error
    columns = {name: _json_ints(records, name) for name in METADATA_COLUMNS}
    tasks = []
    for i, record in enumerate(records):
        task = record.get("task")
        if task is not None and not isinstance(task, str):
            raise InvalidInput("'task' must be a string", field=f"rows[{i}].task")
        tasks.append(task)
    return ActivationRows.build(matrix, task=tasks, **columns), batch_id


def _json_ints(records: list[dict], name: str) -> NullableColumn:
    column = np.empty(len(records), dtype=object)  # filled one by one: a nested list stays one item
    for i, record in enumerate(records):
        column[i] = record.get(name)
    return int_column(column, name)


def parse_rows(content_type: str | None, body: bytes, params: dict[str, Any]) -> tuple[ActivationRows, str | None]:
    """Dispatches on the media type; returns rows and the batch id the body carried (if any)."""
    kind = media_type(content_type)
    try:
        if kind == ARROW_STREAM:
            return rows_from_arrow(body)
        if kind == NPY:
            return rows_from_npy(body, params), None
        if kind == JSON:
            return rows_from_json(body)
    except InvalidRows as error:
        raise InvalidInput(error.message, field=error.field) from error
    raise UnsupportedMediaType(f"send {ARROW_STREAM}, {NPY} or {JSON}, not {kind!r}", field="Content-Type")


def json_safe(value: float) -> float | None:
    return value if math.isfinite(value) else None
