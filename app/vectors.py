"""float32 vectors from requests: one cast and one finiteness check shared by every route."""

from __future__ import annotations

import numpy as np

from app.errors import NonFiniteValue


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
