"""The binary COPY of new bank items, encoded with numpy a group of rows at a time.

Writing each row through psycopg (a pgvector `Vector` and a dumper call per field) was the
largest cost of a bank write once its body is Arrow; here the rows that share which fields
are null are one structured numpy array, so only an item's `meta` (rare in bulk) is encoded
row by row. The columns are those of `COPY_ITEM_COLUMNS`, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.copy_binary import HEADER, TRAILER
from eidetic.wire.meta import encode_meta

COPY_ITEM_COLUMNS = (
    "bank_id",
    "id",
    "key",
    "label",
    "value",
    "confidence",
    "version",
    "inserted_version",
    "inserted_rank",
    "meta",
)
_NULL = -1


def encode_items(
    *,
    bank_id: int,
    ids: Sequence[int],
    positions: Sequence[int],
    keys: np.ndarray,
    labels: Sequence[int | None],
    values: Sequence[np.ndarray | None],
    confidences: Sequence[float | None],
    metas: Sequence[dict[str, Any] | None] | None,
    version: int,
) -> bytes:
    """The whole COPY (header, rows, trailer) of the items at `positions`, stored under `ids`."""
    positions_ = np.asarray(positions, dtype=np.int64)
    ids_ = np.asarray(ids, dtype=np.int64)
    has_label = np.array([labels[p] is not None for p in positions], dtype=bool)
    has_value = np.array([values[p] is not None for p in positions], dtype=bool)
    has_confidence = np.array([confidences[p] is not None for p in positions], dtype=bool)
    has_meta = np.array([metas is not None and metas[p] is not None for p in positions], dtype=bool)
    pattern = has_label * 1 + has_value * 2 + has_confidence * 4 + has_meta * 8
    parts = [HEADER]
    for code in np.unique(pattern).tolist():
        rows = np.flatnonzero(pattern == code)
        chosen = positions_[rows]
        value_dim = len(values[int(chosen[0])]) if code & 2 else 0  # type: ignore[arg-type]
        dtype = _row_dtype(keys.shape[1], code & 1, value_dim, code & 4, code & 8)
        group = np.zeros(len(rows), dtype=dtype)
        group["n"] = len(COPY_ITEM_COLUMNS)
        group["l_bank"], group["bank"] = 8, bank_id
        group["l_id"], group["id"] = 8, ids_[rows]
        group["l_key"], group["key_dim"], group["key"] = 4 + 4 * keys.shape[1], keys.shape[1], keys[chosen]
        group["l_label"] = 4 if code & 1 else _NULL
        if code & 1:
            group["label"] = [labels[p] for p in chosen.tolist()]
        group["l_value"] = 4 + 4 * value_dim if code & 2 else _NULL
        if code & 2:
            group["value_dim"], group["value"] = value_dim, np.stack([values[p] for p in chosen.tolist()])
        group["l_confidence"] = 4 if code & 4 else _NULL
        if code & 4:
            group["confidence"] = [confidences[p] for p in chosen.tolist()]
        group["l_version"], group["version"] = 8, version
        group["l_inserted_version"], group["inserted_version"] = 8, version
        group["l_rank"], group["rank"] = 4, chosen
        if not code & 8:
            group["l_meta"] = _NULL
            parts.append(group.tobytes())
            continue
        for row, position in zip(group, chosen.tolist()):  # jsonb's binary form: version 1, then the text
            meta = b"\x01" + encode_meta(metas[position]).encode("utf-8")  # type: ignore[index]
            parts += [row.tobytes(), len(meta).to_bytes(4, "big"), meta]
    parts.append(TRAILER)
    return b"".join(parts)


def _row_dtype(dim: int, label: int, value_dim: int, confidence: int, meta: int) -> np.dtype:
    """One row's layout: a field count, then each field's length (-1: null) and big-endian data."""
    fields: list[tuple] = [("n", ">i2"), ("l_bank", ">i4"), ("bank", ">i8"), ("l_id", ">i4"), ("id", ">i8")]
    fields += [("l_key", ">i4"), ("key_dim", ">i2"), ("key_unused", ">i2"), ("key", ">f4", (dim,))]
    fields += [("l_label", ">i4")] + ([("label", ">i4")] if label else [])
    fields += [("l_value", ">i4")]
    if value_dim:
        fields += [("value_dim", ">i2"), ("value_unused", ">i2"), ("value", ">f4", (value_dim,))]
    fields += [("l_confidence", ">i4")] + ([("confidence", ">f4")] if confidence else [])
    fields += [("l_version", ">i4"), ("version", ">i8"), ("l_inserted_version", ">i4"), ("inserted_version", ">i8")]
    fields += [("l_rank", ">i4"), ("rank", ">i4")]
    if not meta:  # a row with meta carries its length and text after the array's bytes
        fields += [("l_meta", ">i4")]
    return np.dtype(fields)
