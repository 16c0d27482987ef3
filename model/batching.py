"""Joining many small writes into one ActivationRows batch and cutting batches to a size.

A training loop writes one minibatch at a time; the store is fastest with a few large
batches, so the writer joins writes before it sends and cuts any batch over the limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.rows import METADATA_COLUMNS, ActivationRows, NullableColumn


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
