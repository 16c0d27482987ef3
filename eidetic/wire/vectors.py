"""float32 vectors from requests: one cast and one finiteness check shared by every route."""

from __future__ import annotations

import numpy as np

from eidetic.errors import NonFiniteValue, VectorTooLarge, ZeroVector

# Up to a quarter of float32's range per squared norm, every L2 distance and inner product of
# two such vectors is finite in float32 (|a-b|^2 <= 2|a|^2 + 2|b|^2, |a.b| <= |a||b|).
MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4


def as_float32(values) -> np.ndarray:
    """A float32 array; a number beyond float32's range becomes inf, which `require_finite` refuses."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float32)


def require_finite(matrix: np.ndarray, field_template: str) -> None:
    """Refuses the first row holding NaN or Inf; `field_template` names it, e.g. "rows[{}].values"."""
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise NonFiniteValue(
            f"row {bad} holds NaN, Inf or a value beyond float32's range", field=field_template.format(bad)
        )


def require_comparable(matrix: np.ndarray, metric: str, field_template: str) -> None:
    """Keys and queries every metric can score: finite, within range, and with a direction for cosine.

    A zero vector (or one so small that its squared norm underflows in float32, as pgvector
    sums it) has no cosine similarity to anything: pgvector answers NaN. Such vectors are
    refused as `zero_vector` on write and on query, so no stored key can break a search.
    """
    require_finite(matrix, field_template)
    squared = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
    too_large = squared > MAX_SQUARED_NORM
    if too_large.any():
        bad = int(np.argmax(too_large))
        raise VectorTooLarge(
            f"row {bad} has a norm of {np.sqrt(squared[bad]):.3g}; at most {np.sqrt(MAX_SQUARED_NORM):.3g} "
            "keeps distances within float32",
            field=field_template.format(bad),
        )
    if metric == "cosine":
        zero = (np.square(matrix, dtype=np.float32)).sum(axis=1, dtype=np.float32) == 0
        if zero.any():
            bad = int(np.argmax(zero))
            raise ZeroVector(
                f"row {bad} is a zero vector (or too small to normalise): cosine similarity is undefined for it",
                field=field_template.format(bad),
            )
