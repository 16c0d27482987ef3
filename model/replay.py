"""Replay memories of the continual arms, and the reservoir policy that fills the sample buffer.

Two kinds, each with an in-memory form here and a store form in `model.store_replay`:

- a `SampleBuffer` of raw inputs for experience replay, filled by reservoir sampling
  (Vitter's algorithm R: after n samples every one of them is held with probability
  capacity / n). The decisions come from the policy's own generator, never from the
  data or the backend, so both forms hold the same samples in the same order;
- a `LatentMemory` of read-out inputs (the frozen features of a Hebbian network), a
  fixed number per task, recalled for later tasks' read-out training.

Order is part of the contract: a buffer lists its samples oldest-stored first (the store
lists a bank by item id, which grows with every write), and a latent memory by (task,
sample id). Replay batches drawn by index then match whatever the backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "InMemoryLatentMemory",
    "InMemoryReservoir",
    "LatentMemory",
    "Reservoir",
    "ReservoirPlan",
    "SampleBuffer",
]


@dataclass(frozen=True)
class ReservoirPlan:
    """What one batch of new samples does to a buffer: stored positions to evict, new samples to keep."""

    evicted: list[int]  # positions in the buffer's current order
    admitted: list[int]  # indices into the new samples, in the order they are appended


class Reservoir:
    """Reservoir sampling decisions for a buffer of `capacity`, from a generator seeded here."""

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity < 1:
            raise ValueError("a reservoir holds at least one sample")
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def plan(self, n_stored: int, n_new: int) -> ReservoirPlan:
        """Offers `n_new` samples, in order, to a buffer holding `n_stored`.

        A sample replacing position j leaves the others in order and goes to the end, so
        the buffer stays oldest-stored first; j indexes that order at the moment of the offer.
        """
        order: list[tuple[bool, int]] = [(False, i) for i in range(n_stored)]  # (is new, index)
        for index in range(n_new):
            self.seen += 1
            if len(order) < self.capacity:
                order.append((True, index))
                continue
            j = int(self._rng.integers(0, self.seen))
            if j < self.capacity:
                del order[j]
                order.append((True, index))
        kept = {index for is_new, index in order if not is_new}
        return ReservoirPlan(
            evicted=[i for i in range(n_stored) if i not in kept],
            admitted=[index for is_new, index in order if is_new],
        )


@runtime_checkable
class SampleBuffer(Protocol):
    """Inputs and labels kept for experience replay, oldest-stored first."""

    capacity: int

    def extend(self, samples: Tensor, labels: Tensor) -> None: ...

    def contents(self) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class LatentMemory(Protocol):
    """Read-out inputs kept per task; `recall` lists them by (task, sample id)."""

    def add_task(self, task: int, features: Tensor, labels: Tensor, sample_ids: Tensor) -> None: ...

    def recall(self, tasks: Sequence[int]) -> tuple[Tensor, Tensor]: ...


class InMemoryReservoir:
    """A `SampleBuffer` in host memory (float32 samples, int64 labels)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.policy = Reservoir(capacity, seed)
        self.capacity = capacity
        self._samples: Tensor | None = None
        self._labels = torch.zeros(0, dtype=torch.long)

    def extend(self, samples: Tensor, labels: Tensor) -> None:
        samples = samples.detach().to("cpu", torch.float32)
        stored = 0 if self._samples is None else self._samples.shape[0]
        plan = self.policy.plan(stored, samples.shape[0])
        keep = torch.ones(stored, dtype=torch.bool)
        keep[plan.evicted] = False
        admitted = torch.as_tensor(plan.admitted, dtype=torch.long)
        old = samples[:0] if self._samples is None else self._samples[keep]
        self._samples = torch.cat([old, samples[admitted]])
        self._labels = torch.cat([self._labels[keep], labels.detach().to("cpu", torch.long)[admitted]])

    def contents(self) -> tuple[Tensor, Tensor]:
        if self._samples is None:
            return torch.zeros(0), self._labels
        return self._samples, self._labels


class InMemoryLatentMemory:
    """A `LatentMemory` in host memory."""

    def __init__(self) -> None:
        self._tasks: dict[int, tuple[Tensor, Tensor]] = {}

    def add_task(self, task: int, features: Tensor, labels: Tensor, sample_ids: Tensor) -> None:
        order = torch.argsort(sample_ids.detach().cpu())
        self._tasks[task] = (
            features.detach().to("cpu", torch.float32)[order].clone(),
            labels.detach().to("cpu", torch.long)[order].clone(),
        )

    def recall(self, tasks: Sequence[int]) -> tuple[Tensor, Tensor]:
        found = [self._tasks[t] for t in tasks if t in self._tasks]
        if not found:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat([f for f, _ in found]), torch.cat([y for _, y in found])
