"""Activation rows in columnar form: what every ingest format is parsed into and every transport sends."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from eidetic.wire.text import text_problem

METADATA_COLUMNS: tuple[str, ...] = ("sample_id", "step", "epoch", "label")
INT_DTYPES: dict[str, np.dtype] = {
    "sample_id": np.dtype(np.int64),
    "step": np.dtype(np.int64),
    "epoch": np.dtype(np.int32),
    "label": np.dtype(np.int32),
}


class InvalidRows(ValueError):
    """A batch no store may hold; `field` names the first offending place (e.g. "rows[3].label").

    Raised by the one set of checks every format and transport goes through, so the same
    value is refused with the same message whether it came as JSON, Arrow or .npy.
    """

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class NullableColumn:
    """One metadata column: its values and, where some are missing, a mask (True = null)."""

    data: np.ndarray
    nulls: np.ndarray | None = None

    @classmethod
    def missing(cls, n_rows: int, dtype: np.dtype) -> NullableColumn:
        return cls(np.zeros(n_rows, dtype=dtype), np.ones(n_rows, dtype=bool))

    def null_mask(self) -> np.ndarray:
        return self.nulls if self.nulls is not None else np.zeros(len(self.data), dtype=bool)

    def to_list(self) -> list:
        values = self.data.tolist()
        if self.nulls is None:
            return values
        return [None if null else value for value, null in zip(values, self.nulls.tolist())]


@dataclass(frozen=True)
class ActivationRows:
    """A batch of activations: a float32 matrix (rows x dim) and per-row metadata.

    Tasks are categorical: `task_codes` index into `task_names` (-1 = no task), so a
    batch of one task costs one string, not one per row. The integer metadata columns
    may hold nulls.
    """

    values: np.ndarray
    sample_id: NullableColumn
    step: NullableColumn
    epoch: NullableColumn
    label: NullableColumn
    task_codes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int32))
    task_names: tuple[str, ...] = ()

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def column(self, name: str) -> NullableColumn:
        return getattr(self, name)

    def tasks(self) -> list[str | None]:
        names = list(self.task_names)
        return [None if code < 0 else names[code] for code in self.task_codes.tolist()]

    @classmethod
    def build(
        cls,
        values: np.ndarray,
        *,
        sample_id=None,
        step=None,
        epoch=None,
        label=None,
        task=None,
    ) -> ActivationRows:
        """Builds rows from arrays, scalars (one value for every row) or None (missing)."""
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, which ingest refuses by row
            values = np.ascontiguousarray(values, dtype=np.float32)
        if values.ndim != 2:
            raise InvalidRows(f"values must be a 2-D matrix (rows x dim), got shape {values.shape}", field="values")
        n_rows = values.shape[0]
        given = {"sample_id": sample_id, "step": step, "epoch": epoch, "label": label}
        columns = {name: _nullable(given[name], n_rows, INT_DTYPES[name], name) for name in METADATA_COLUMNS}
        task_codes, task_names = _tasks(task, n_rows)
        return cls(values=values, task_codes=task_codes, task_names=task_names, **columns)


def _nullable(given, n_rows: int, dtype: np.dtype, name: str) -> NullableColumn:
    if given is None:
        return NullableColumn.missing(n_rows, dtype)
    if isinstance(given, NullableColumn):
        return int_column(given.data, name, nulls=given.nulls)
    if np.isscalar(given):
        return NullableColumn(np.full(n_rows, _int_scalar(given, name), dtype=dtype))
    array = np.asarray(given)
    if array.shape != (n_rows,):
        raise InvalidRows(f"{name} must have one value per row ({n_rows}), got shape {array.shape}", field=name)
    return int_column(array, name)


def _range_message(name: str) -> str:
    info = np.iinfo(INT_DTYPES[name])
    return f"'{name}' must be an integer in [{info.min}, {info.max}]"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_scalar(value, name: str) -> int:
    info = np.iinfo(INT_DTYPES[name])
    if not _is_int(value) or not info.min <= int(value) <= info.max:
        raise InvalidRows(_range_message(name), field=name)
    return int(value)


def int_column(array: np.ndarray, name: str, *, nulls: np.ndarray | None = None) -> NullableColumn:
    """The one check of an integer metadata column: integer types only, every value in range.

    Never casts a value it cannot hold: 2**40 + 3 is refused as a label, not stored as 3.
    Objects (from JSON) may be ints or None; booleans, floats and strings are not integers.
    """
    dtype = INT_DTYPES[name]
    info = np.iinfo(dtype)
    if array.dtype == object:
        items = array.tolist()
        for i, item in enumerate(items):
            if item is not None and not (_is_int(item) and info.min <= int(item) <= info.max):
                raise InvalidRows(_range_message(name), field=f"rows[{i}].{name}")
        missing = np.array([item is None for item in items], dtype=bool)
        data = np.array([0 if item is None else item for item in items], dtype=dtype)
        return NullableColumn(data, missing if missing.any() else None)
    if array.dtype.kind not in "iu":
        raise InvalidRows(f"'{name}' must hold integers, not {array.dtype}", field=name)
    out_of_range = array > info.max if array.dtype.kind == "u" else (array < info.min) | (array > info.max)
    if nulls is not None:
        out_of_range &= ~nulls
    if out_of_range.any():
        raise InvalidRows(_range_message(name), field=f"rows[{int(np.argmax(out_of_range))}].{name}")
    return NullableColumn(array.astype(dtype, copy=False), nulls if nulls is not None and nulls.any() else None)


def _tasks(given, n_rows: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Categorical codes for the task column (scalar, sequence, or None)."""
    if given is None:
        return np.full(n_rows, -1, dtype=np.int32), ()
    if isinstance(given, str):
        return np.zeros(n_rows, dtype=np.int32), (given,)
    tasks = list(given)
    if len(tasks) != n_rows:
        raise InvalidRows(f"task must have one value per row ({n_rows}), got {len(tasks)}", field="task")
    names: dict[str, int] = {}
    codes = np.fromiter(
        (-1 if task is None else names.setdefault(str(task), len(names)) for task in tasks),
        dtype=np.int32,
        count=n_rows,
    )
    return codes, tuple(names)


def concat_rows(parts: Sequence[ActivationRows]) -> ActivationRows:
    """One batch holding the parts' rows in order (task names merged into one dictionary)."""
    if not parts:
        raise ValueError("nothing to join")
    if len(parts) == 1:
        return parts[0]
    if len({part.dim for part in parts}) != 1:
        raise ValueError(f"parts of different dimensions: {sorted({part.dim for part in parts})}")
    columns = {name: _concat_column([part.column(name) for part in parts]) for name in METADATA_COLUMNS}
    task_codes, task_names = _concat_tasks(parts)
    values = np.concatenate([part.values for part in parts])
    return ActivationRows(values=values, task_codes=task_codes, task_names=task_names, **columns)


def slice_rows(rows: ActivationRows, start: int, stop: int) -> ActivationRows:
    """Rows [start, stop) of a batch (views, no copy)."""
    columns = {}
    for name in METADATA_COLUMNS:
        column = rows.column(name)
        nulls = None if column.nulls is None else column.nulls[start:stop]
        columns[name] = NullableColumn(column.data[start:stop], nulls)
    return ActivationRows(
        values=rows.values[start:stop],
        task_codes=rows.task_codes[start:stop],
        task_names=rows.task_names,
        **columns,
    )


def _concat_column(columns: list[NullableColumn]) -> NullableColumn:
    data = np.concatenate([column.data for column in columns])
    if all(column.nulls is None for column in columns):
        return NullableColumn(data)
    return NullableColumn(data, np.concatenate([column.null_mask() for column in columns]))


def _concat_tasks(parts: Sequence[ActivationRows]) -> tuple[np.ndarray, tuple[str, ...]]:
    names: dict[str, int] = {}
    codes = []
    for part in parts:
        # Each part's local code -> the joined dictionary's code; the trailing -1 keeps "no task".
        mapping = np.array([names.setdefault(name, len(names)) for name in part.task_names] + [-1], dtype=np.int32)
        codes.append(mapping[part.task_codes])
    return np.concatenate(codes), tuple(names)


def check_task_names(rows: ActivationRows) -> None:
    """Every task name can be stored as it is; the error names the first row that uses a bad one."""
    for code, name in enumerate(rows.task_names):
        problem = text_problem(name) if isinstance(name, str) else "must be a string"
        if problem is not None:
            first = int(np.argmax(rows.task_codes == code)) if (rows.task_codes == code).any() else 0
            raise InvalidRows(f"a task name {problem}", field=f"rows[{first}].task")


def rows_digest(rows: ActivationRows) -> bytes:
    """A digest of the batch's content, the same for the same rows in any format or transport.

    The ingest ledger keeps it beside the batch id, so a resend is told from another batch
    that reuses the id. Null metadata hashes apart from zero; tasks hash by name in row order
    (their dictionary order differs between formats).
    """
    digest = hashlib.sha256()
    digest.update(np.array([rows.n_rows, rows.dim], dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(rows.values, dtype="<f4").data)
    for name in METADATA_COLUMNS:
        column = rows.column(name)
        nulls = column.null_mask()
        digest.update(np.where(nulls, 0, column.data).astype("<i8").data)
        digest.update(np.packbits(nulls).data)
    codes = rows.task_codes
    used, first_row = np.unique(codes[codes >= 0], return_index=True)
    order = used[np.argsort(first_row)]  # names in order of first appearance
    canonical = np.full(len(rows.task_names) + 1, -1, dtype="<i4")
    canonical[order] = np.arange(len(order), dtype="<i4")
    digest.update(canonical[codes].astype("<i4").data)  # code -1 indexes the trailing -1
    for code in order.tolist():
        name = rows.task_names[code].encode("utf-8")
        digest.update(len(name).to_bytes(4, "little") + name)
    return digest.digest()
