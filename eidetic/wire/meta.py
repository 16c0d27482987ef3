"""An item's `meta`: a small JSON object stored beside its key, checked the same way by the service and clients.

It must be an object, at most `MAX_META_BYTES` as compact UTF-8 JSON and `MAX_META_DEPTH`
levels deep, with finite numbers and text PostgreSQL's jsonb can hold (no NUL, no lone
surrogates). A value that breaks a rule is refused before the write, naming the rule.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_META_BYTES", "MAX_META_DEPTH", "encode_meta", "meta_problem"]

MAX_META_BYTES = 4096
MAX_META_DEPTH = 16


def encode_meta(meta: dict[str, Any]) -> str:
    """Compact JSON, as its size is counted (and as the snapshot carries it)."""
    return json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def meta_problem(meta: object) -> str | None:
    """Why `meta` cannot be stored as an item's meta, or None when it can."""
    if not isinstance(meta, dict):
        return "must be a JSON object"
    problem = _value_problem(meta, depth=1)
    if problem is not None:
        return problem
    size = len(encode_meta(meta).encode("utf-8"))
    if size > MAX_META_BYTES:
        return f"is {size} bytes as compact JSON; at most {MAX_META_BYTES}"
    return None


def _value_problem(value: object, depth: int) -> str | None:
    if depth > MAX_META_DEPTH:
        return f"is nested more than {MAX_META_DEPTH} levels deep"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return "has a key that is not text"
            problem = _text_problem(key) or _value_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, list):
        for item in value:
            problem = _value_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "holds a number that is not finite (NaN or infinity)"
    if value is None or isinstance(value, (bool, int, float)):
        return None
    return f"holds a {type(value).__name__}, which is not a JSON value"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds text with a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "holds text that is not valid Unicode (a lone surrogate)"
    return None
