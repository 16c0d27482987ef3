"""Continual-learning metrics over an accuracy matrix, each defined once and named after its paper.

R[i][j] is the test accuracy on task j after training on tasks 0..i (T x T); `initial[j]`
is the accuracy on task j of the model before any training (GEM's b-bar).

- Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (GEM):
  ACC = 1/T sum_j R[T-1][j];  BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]);
  FWT = 1/(T-1) sum_{j>0} (R[j-1][j] - initial[j]).
- Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning" (RWalk):
  average accuracy A_k = 1/k sum_{j<=k} R[k][j] (equal to ACC after the last task) and
  forgetting F_k = 1/(k-1) sum_{j<k} max_{l<k} (R[l][j] - R[k][j]).

Indices here are 0-based: `after=k` means "after training task k".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Matrix = Sequence[Sequence[float]] | np.ndarray


def _square(accuracy: Matrix) -> np.ndarray:
    matrix = np.asarray(accuracy, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"the accuracy matrix is T x T (row: after task i, column: task j), got {matrix.shape}")
    return matrix


def _after(matrix: np.ndarray, after: int | None) -> int:
    last = matrix.shape[0] - 1
    k = last if after is None else after
    if not 0 <= k <= last:
        raise ValueError(f"after is a task index in 0..{last}")
    return k


def average_accuracy(accuracy: Matrix, after: int | None = None) -> float:
    """Chaudhry et al. 2018 A_k: mean accuracy over the tasks seen so far (GEM's ACC after the last task)."""
    matrix = _square(accuracy)
    k = _after(matrix, after)
    return float(matrix[k, : k + 1].mean())


def backward_transfer(accuracy: Matrix) -> float:
    """GEM BWT: how training later tasks changed earlier ones (negative: forgetting). NaN for one task."""
    matrix = _square(accuracy)
    t = matrix.shape[0]
    if t < 2:
        return float("nan")
    return float(np.mean([matrix[t - 1, j] - matrix[j, j] for j in range(t - 1)]))


def forward_transfer(accuracy: Matrix, initial: Sequence[float] | np.ndarray) -> float:
    """GEM FWT: accuracy on each task just before training it, minus that of the untrained model."""
    matrix = _square(accuracy)
    baseline = np.asarray(initial, dtype=np.float64)
    t = matrix.shape[0]
    if baseline.shape != (t,):
        raise ValueError(f"initial holds one accuracy per task ({t}), got shape {baseline.shape}")
    if t < 2:
        return float("nan")
    return float(np.mean([matrix[j - 1, j] - baseline[j] for j in range(1, t)]))


def forgetting(accuracy: Matrix, after: int | None = None) -> float:
    """Chaudhry et al. 2018 F_k: mean over earlier tasks of the best accuracy they ever had minus the current one."""
    matrix = _square(accuracy)
    k = _after(matrix, after)
    if k == 0:
        return float("nan")
    return float(np.mean([matrix[:k, j].max() - matrix[k, j] for j in range(k)]))


@dataclass(frozen=True)
class ContinualMetrics:
    """Every metric above for one accuracy matrix, after the last task."""

    average_accuracy: float
    backward_transfer: float
    forward_transfer: float
    forgetting: float

    @classmethod
    def of(cls, accuracy: Matrix, initial: Sequence[float] | np.ndarray) -> ContinualMetrics:
        return cls(
            average_accuracy=average_accuracy(accuracy),
            backward_transfer=backward_transfer(accuracy),
            forward_transfer=forward_transfer(accuracy, initial),
            forgetting=forgetting(accuracy),
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
