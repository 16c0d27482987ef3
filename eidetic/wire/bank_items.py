"""Bank items as an Arrow IPC stream: the bulk body of a bank write, beside the JSON `{"items": [...]}`.

Columns: `key` (a list of float32, the bank's dim; required), and the optional `label`
(integers), `value` (a list of float32, null for an item without one), `confidence` (floats)
and `meta` (each a JSON object as text). Nulls mean what a missing JSON field means. Parsing
a 10,000-key body is a few buffer copies where JSON is a Python object per number, so the
client sends this whenever it is handed numpy keys.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from eidetic.errors import InvalidInput
from eidetic.wire.formats import arrow_matrix, read_arrow_table
from eidetic.wire.meta import encode_meta, meta_problem

ITEM_COLUMNS: tuple[str, ...] = ("key", "label", "value", "confidence", "meta")
_INT32 = (-(2**31), 2**31 - 1)


@dataclass
class ItemColumns:
    """A parsed batch of items, in the shapes a bank write takes (None: the item has none)."""

    keys: np.ndarray
    labels: list[int | None]
    values: list[np.ndarray | None]
    confidences: list[float | None]
    metas: list[dict[str, Any] | None] | None


def items_to_arrow(
    keys: np.ndarray,
    labels: Any = None,
    values: Any = None,
    confidences: Any = None,
    metas: list[dict[str, Any] | None] | None = None,
) -> bytes:
    """One Arrow IPC stream holding the items; a column given as None is left out."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if keys.ndim != 2:
        raise ValueError(f"keys must be an n x dim matrix, got shape {keys.shape}")
    columns = {"key": pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1)), keys.shape[1])}
    if labels is not None:
        columns["label"] = pa.array(_listed(labels), type=pa.int32())
    if values is not None:
        columns["value"] = _value_column(values)
    if confidences is not None:
        columns["confidence"] = pa.array(_listed(confidences), type=pa.float32())
    if metas is not None:
        columns["meta"] = pa.array([None if m is None else encode_meta(m) for m in metas], type=pa.string())
    table = pa.table(columns)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _listed(column: Any) -> list:
    return column.tolist() if isinstance(column, np.ndarray) else list(column)


def _value_column(values: Any) -> pa.Array:
    if isinstance(values, np.ndarray) and values.ndim == 2:
        matrix = np.ascontiguousarray(values, dtype=np.float32)
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
    return pa.array(
        [None if v is None else np.asarray(v, dtype=np.float32).tolist() for v in values], type=pa.list_(pa.float32())
    )


def items_from_arrow(body: bytes) -> ItemColumns:
    """Parses a bank write's Arrow body; an unknown or mistyped column is refused by name."""
    table = read_arrow_table(body)
    for name in table.column_names:
        if name not in ITEM_COLUMNS:
            raise InvalidInput(
                f"unknown column {name!r}; the known ones are {', '.join(ITEM_COLUMNS)}", field=f"items.{name}"
            )
    if "key" not in table.column_names:
        raise InvalidInput("the Arrow stream needs a 'key' column", field="items.key")
    if table.num_rows == 0:
        raise InvalidInput("a write needs at least one item", field="items")
    keys = arrow_matrix(table.column("key"), "key", "items[{}].key", "items.key")
    n = len(keys)
    present = set(table.column_names)
    return ItemColumns(
        keys=keys,
        labels=_labels(table.column("label")) if "label" in present else [None] * n,
        values=_values(table.column("value")) if "value" in present else [None] * n,
        confidences=_confidences(table.column("confidence")) if "confidence" in present else [None] * n,
        metas=_metas(table.column("meta")) if "meta" in present else None,
    )


def _labels(chunked: pa.ChunkedArray) -> list[int | None]:
    if pa.types.is_null(chunked.type):
        return [None] * len(chunked)
    if not pa.types.is_integer(chunked.type):
        raise InvalidInput(f"'label' must hold integers, not {chunked.type}", field="items.label")
    labels = chunked.to_pylist()
    for i, label in enumerate(labels):
        if label is not None and not _INT32[0] <= label <= _INT32[1]:
            raise InvalidInput(f"label {label} is outside the 32-bit range", field=f"items[{i}].label")
    return labels


def _confidences(chunked: pa.ChunkedArray) -> list[float | None]:
    if pa.types.is_null(chunked.type):
        return [None] * len(chunked)
    if not pa.types.is_floating(chunked.type):
        raise InvalidInput(f"'confidence' must hold floats, not {chunked.type}", field="items.confidence")
    return chunked.to_pylist()


def _values(chunked: pa.ChunkedArray) -> list[np.ndarray | None]:
    """Per item its value vector, or None; the bank's check refuses a wrong width or a non-finite entry."""
    if pa.types.is_null(chunked.type):
        return [None] * len(chunked)
    array = chunked.combine_chunks()
    if not (pa.types.is_fixed_size_list(array.type) or pa.types.is_list(array.type)):
        raise InvalidInput(f"'value' must be a list of float32, not {array.type}", field="items.value")
    present = np.asarray(array.is_valid())
    out: list[np.ndarray | None] = [None] * len(array)
    if present.any():
        given = array.filter(pa.array(present)) if not present.all() else array
        rows = np.flatnonzero(present)
        if pa.types.is_fixed_size_list(given.type) or len(set(np.asarray(given.value_lengths()).tolist())) == 1:
            matrix = arrow_matrix(pa.chunked_array([given]), "value", "items[{}].value", "items.value")
            for row, vector in zip(rows.tolist(), matrix):
                out[row] = vector
        else:  # ragged: each item keeps its own width, which the bank's check names
            flat = given.flatten()
            if not pa.types.is_floating(flat.type) or flat.null_count:
                raise InvalidInput("'value' must hold floats, without nulls", field="items.value")
            for row, vector in zip(rows.tolist(), given.to_pylist()):
                out[row] = np.asarray(vector, dtype=np.float32)
    return out


def _metas(chunked: pa.ChunkedArray) -> list[dict[str, Any] | None] | None:
    if pa.types.is_null(chunked.type):
        return None
    if not (pa.types.is_string(chunked.type) or pa.types.is_large_string(chunked.type)):
        raise InvalidInput(f"'meta' must hold JSON objects as text, not {chunked.type}", field="items.meta")
    metas: list[dict[str, Any] | None] = []
    for i, text in enumerate(chunked.to_pylist()):
        if text is None:
            metas.append(None)
            continue
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise InvalidInput(f"meta is not valid JSON: {error}", field=f"items[{i}].meta") from error
        problem = meta_problem(meta)
        if problem is not None:
            raise InvalidInput(f"meta {problem}", field=f"items[{i}].meta")
        metas.append(meta)
    return metas if any(meta is not None for meta in metas) else None
