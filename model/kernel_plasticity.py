"""Per-kernel statistics of a task and the neuromodulation that protects important kernels.

While a task trains, every `interval` updates of a layer the change of each kernel since
the last look, ||W_t - W_{t-n}||_2, is measured; the mean of those changes over the task is
the kernel's *change*. After the task, each kernel's summed absolute activation over the
task's data is its *importance*. Both go to a `KernelStatsSink`, one record per (task,
layer) holding one value per kernel: the in-memory sink here, the store's in
`model.store_kernel_stats`.

On a later task, `Neuromodulation` compares each kernel's mean change so far in this task
with the change it had in the earlier tasks whose top-k (by importance) it belongs to. Such
a kernel that now changes more than it did then is slowed (its plasticity multiplied by
`slow_factor`, 0 freezes it); when a layer slows any kernel, the kernels in no earlier
top-k learn faster (`boost_factor`), so learning moves to kernels no earlier task relies on.
Comparing means rather than the last interval alone keeps a frozen kernel from thawing
at the very next look: it thaws once its mean over the task has fallen back under budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from model.softhebb import SoftHebbConv2d

__all__ = [
    "ActivationImportance",
    "InMemoryKernelStatsSink",
    "KernelChangeMeter",
    "KernelRecord",
    "KernelStatsSink",
    "Neuromodulation",
    "NeuromodulationConfig",
]


@dataclass(frozen=True)
class KernelRecord:
    """One layer's statistics over one task: one value per kernel in each tensor (CPU, float32)."""

    kernel_change: Tensor
    importance: Tensor
    intervals: int = 0  # how many looks the mean change is over


@runtime_checkable
class KernelStatsSink(Protocol):
    """Where per-kernel statistics go; `read` answers None for a (task, layer) never recorded."""

    def record(self, task: int, layer: str, kernel_change: Tensor, importance: Tensor, intervals: int = 0) -> None: ...

    def read(self, task: int, layer: str) -> KernelRecord | None: ...


class InMemoryKernelStatsSink:
    """A `KernelStatsSink` in a dict; it keeps copies, so later training cannot alter a record."""

    def __init__(self) -> None:
        self.records: dict[tuple[int, str], KernelRecord] = {}

    def record(self, task: int, layer: str, kernel_change: Tensor, importance: Tensor, intervals: int = 0) -> None:
        if kernel_change.shape != importance.shape or kernel_change.ndim != 1:
            raise ValueError(
                f"one value per kernel in both: kernel_change {tuple(kernel_change.shape)}, "
                f"importance {tuple(importance.shape)}"
            )
        self.records[(task, layer)] = KernelRecord(
            kernel_change.detach().to("cpu", torch.float32).clone(),
            importance.detach().to("cpu", torch.float32).clone(),
            intervals,
        )

    def read(self, task: int, layer: str) -> KernelRecord | None:
        return self.records.get((task, layer))


class KernelChangeMeter:
    """Mean per-kernel change ||W_t - W_{t-n}|| over a task, one look every `interval` updates."""

    def __init__(self, layers: Mapping[str, SoftHebbConv2d], interval: int) -> None:
        if interval < 1:
            raise ValueError("interval is a number of updates, at least 1")
        self.layers = dict(layers)
        self.interval = interval
        self.start_task()

    def start_task(self) -> None:
        self._snapshot = {name: conv.weight.detach().clone() for name, conv in self.layers.items()}
        self._updates = dict.fromkeys(self.layers, 0)
        self._sum = {name: torch.zeros_like(conv.plasticity) for name, conv in self.layers.items()}
        self._looks = dict.fromkeys(self.layers, 0)

    def after_update(self, layer: str) -> bool:
        """Count one update of `layer`; True when this one completed an interval and was measured."""
        self._updates[layer] += 1
        if self._updates[layer] % self.interval:
            return False
        self._look(layer)
        return True

    def _look(self, layer: str) -> None:
        weight = self.layers[layer].weight.detach()
        self._sum[layer] += torch.linalg.vector_norm((weight - self._snapshot[layer]).flatten(1), dim=1)
        self._looks[layer] += 1
        self._snapshot[layer] = weight.clone()

    def looks(self, layer: str) -> int:
        """Intervals measured so far in this task."""
        return self._looks[layer]

    def mean_change(self, layer: str) -> Tensor:
        """Mean change per look so far in this task (zeros before the first look)."""
        return self._sum[layer] / max(self._looks[layer], 1)

    def finish_task(self, layer: str) -> Tensor:
        """The task's mean change over its complete intervals (updates after the last one are not
        counted); a layer updated fewer than `interval` times in all is measured once now."""
        if self._looks[layer] == 0 and self._updates[layer] > 0:
            self._look(layer)
        return self.mean_change(layer)


class ActivationImportance:
    """Summed absolute activation per kernel, read by forward hooks on the activation modules."""

    def __init__(self, activations: Mapping[str, nn.Module]) -> None:
        self.activations = dict(activations)
        self.totals: dict[str, Tensor] = {}

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def accumulate(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            summed = output.detach().abs().sum(dim=(0, 2, 3))
            self.totals[name] = summed if name not in self.totals else self.totals[name] + summed

        return accumulate

    @contextmanager
    def watching(self) -> Iterator[ActivationImportance]:
        """Accumulate over every forward pass inside the block, from zero."""
        self.totals = {}
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self.activations.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@dataclass(frozen=True)
class NeuromodulationConfig:
    """Which kernels count as important, how hard they are protected, and how often it is decided."""

    top_fraction: float = 0.15  # of each layer's kernels, by importance, per earlier task
    slow_factor: float = 0.0  # plasticity of a protected kernel over its budget (0 freezes it)
    boost_factor: float = 1.15  # plasticity of unprotected kernels while any kernel is slowed
    interval: int = 10  # updates between two looks at the kernels (and two decisions)

    def top_k(self, n_kernels: int) -> int:
        return max(1, min(n_kernels, math.ceil(self.top_fraction * n_kernels - 1e-9)))


class Neuromodulation:
    """Decides each kernel's plasticity multiplier from earlier tasks' records and the current change."""

    def __init__(self, config: NeuromodulationConfig) -> None:
        self.config = config

    def budgets(self, previous: list[KernelRecord]) -> Tensor:
        """Per kernel, the smallest change it had in an earlier task whose top-k it is in; +inf if none."""
        if not previous:
            raise ValueError("budgets need at least one earlier task's record")
        n = previous[0].importance.numel()
        budget = torch.full((n,), math.inf)
        for record in previous:
            top = torch.topk(record.importance, self.config.top_k(n)).indices
            budget[top] = torch.minimum(budget[top], record.kernel_change[top])
        return budget

    def plasticity(self, current_change: Tensor, previous: list[KernelRecord]) -> Tensor:
        """The multipliers m_k for one layer; all ones when there is no earlier task."""
        if not previous:
            return torch.ones_like(current_change)
        budget = self.budgets(previous).to(current_change.device, current_change.dtype)
        protected = torch.isfinite(budget)
        slowed = protected & (current_change > budget)
        multiplier = torch.ones_like(current_change)
        if slowed.any():
            multiplier[~protected] = self.config.boost_factor
            multiplier[slowed] = self.config.slow_factor
        return multiplier
