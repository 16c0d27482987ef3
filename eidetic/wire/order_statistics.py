"""Order statistics of the store's quantiles: which sorted positions are the boundaries.

Boundary i of Q (i = 1..Q-1) is percentile_disc(i/Q) of a unit's values, numpy's
`method="inverted_cdf"`; the bucket of a value is the number of boundaries strictly below
it. The service (exact sets) and the device cache (boundaries from a local tensor) share
these positions, so both compute the same boundaries.
"""

from __future__ import annotations

import numpy as np

__all__ = ["exact_boundaries_of", "order_statistics"]


def order_statistics(n_rows: int, n_quantiles: int) -> np.ndarray:
    """0-based sorted positions of the Q-1 boundaries among n_rows values.

    Asked of numpy itself (inverted_cdf over 0..n-1), so the positions agree with
    `np.quantile(..., method="inverted_cdf")` to the last rounding.
    """
    levels = np.arange(1, n_quantiles) / n_quantiles
    return np.quantile(np.arange(n_rows, dtype=np.float64), levels, method="inverted_cdf").astype(np.int64)


def exact_boundaries_of(matrix: np.ndarray, n_quantiles: int) -> np.ndarray:
    """Exact boundaries of every column of an in-memory matrix (rows x units)."""
    positions = order_statistics(matrix.shape[0], n_quantiles)
    columns = np.ascontiguousarray(matrix.T, dtype=np.float32)  # units-major: each sort runs over contiguous memory
    columns.sort(axis=1)  # measured faster than np.partition for every Q tried (bench/quantiles.py)
    return np.ascontiguousarray(columns[:, positions])
