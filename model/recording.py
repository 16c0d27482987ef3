"""Recording activations from outside a model: forward hooks on named modules, rows sent to sinks.

Layers stay pure (no client, no writer): an experiment attaches an `ActivationRecorder`
for as long as it wants rows, the way timm's `FeatureHooks` collects features. Each
hooked module's output goes to that module's sink:

- `WriterSink`: an `eidetic.open_writer(...)` writer (rows stream into the store);
- `ReservoirSink`: a bounded uniform sample in memory (local quantiles, USE_DB off);
- `ListSink`: every batch in memory (tests, small probes);
- `TeeSink`: several of these at once.

    sink = ReservoirSink(units=36, capacity=10_000)
    with ActivationRecorder(model, {"eidetic_indexed.pre_bias": sink}, task="B") as recorder:
        for images, labels, ids in batches:
            recorder.annotate(sample_id=ids, label=labels)
            model(images)
    boundaries = local_boundaries(sink.values(), n_quantiles)

Sampling (`sample_rate` < 1) draws from the recorder's own generator, so recording
never moves torch's global random state: training is the same with or without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from eidetic.writer import ActivationWriter

__all__ = [
    "ActivationRecorder",
    "ActivationSink",
    "ListSink",
    "RecordedBatch",
    "ReservoirSink",
    "TeeSink",
    "WriterSink",
]


class ActivationSink(Protocol):
    """Where recorded rows go: `rows` is (batch x units) on the CPU; metadata is per row or scalar."""

    def write(self, rows: torch.Tensor, *, task: str | None = None, **metadata: Any) -> None: ...


class WriterSink:
    """Rows into the store through an ActivationWriter (the caller opens and closes the writer)."""

    def __init__(self, writer: ActivationWriter) -> None:
        self.writer = writer

    def write(self, rows: torch.Tensor, *, task: str | None = None, **metadata: Any) -> None:
        self.writer.write(rows, task=task, **metadata)


class RecordedBatch:
    """One batch a ListSink kept: its rows, task and metadata."""

    __slots__ = ("metadata", "rows", "task")

    def __init__(self, rows: torch.Tensor, task: str | None, metadata: dict[str, Any]) -> None:
        self.rows, self.task, self.metadata = rows, task, metadata


class ListSink:
    """Every batch in memory, in order."""

    def __init__(self) -> None:
        self.batches: list[RecordedBatch] = []

    def write(self, rows: torch.Tensor, *, task: str | None = None, **metadata: Any) -> None:
        self.batches.append(RecordedBatch(rows, task, metadata))

    def values(self) -> torch.Tensor:
        """All kept rows, concatenated (rows x units)."""
        return torch.cat([batch.rows for batch in self.batches]) if self.batches else torch.empty(0, 0)


class TeeSink:
    """The same rows to several sinks."""

    def __init__(self, *sinks: ActivationSink) -> None:
        self.sinks = sinks

    def write(self, rows: torch.Tensor, *, task: str | None = None, **metadata: Any) -> None:
        for sink in self.sinks:
            sink.write(rows, task=task, **metadata)


class ReservoirSink:
    """A bounded uniform sample of the rows written: Algorithm R (Vitter 1985), vectorised over a batch.

    Owns its random generator, so it never moves torch's global random state. Holds every
    row until `capacity` is reached; `clear` restarts the sequence (the same rows again
    give the same sample).
    """

    def __init__(self, units: int, capacity: int, *, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity is at least 1")
        self.units = units
        self.capacity = capacity
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._storage = torch.empty(0, units)  # grows by doubling up to capacity
        self.rows_kept = 0
        self.rows_offered = 0

    def values(self) -> torch.Tensor:
        """The kept rows (rows_kept x units), float32 on the CPU."""
        return self._storage[: self.rows_kept]

    def clear(self) -> None:
        self._storage = torch.empty(0, self.units)
        self.rows_kept = self.rows_offered = 0
        self.generator.manual_seed(self.seed)

    def write(self, rows: torch.Tensor, *, task: str | None = None, **metadata: Any) -> None:
        rows = rows.to(dtype=torch.float32)
        free = self.capacity - self.rows_kept
        if free > 0:
            head = rows[:free]
            needed = self.rows_kept + head.shape[0]
            if needed > self._storage.shape[0]:
                grown = torch.empty(min(self.capacity, max(needed, 2 * self._storage.shape[0])), self.units)
                grown[: self.rows_kept] = self._storage[: self.rows_kept]
                self._storage = grown
            self._storage[self.rows_kept : needed] = head
            self.rows_kept = needed
        rest = rows[free:] if free > 0 else rows
        first = self.rows_offered + rows.shape[0] - rest.shape[0]
        self.rows_offered += rows.shape[0]
        if rest.shape[0] == 0:
            return
        positions = torch.arange(first, first + rest.shape[0], dtype=torch.float64)
        slots = (torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64) * (positions + 1)).long()
        hit = slots < self.capacity
        slots, order = slots[hit], torch.nonzero(hit).squeeze(1)
        if slots.numel() == 0:
            return
        # Sequential semantics: when two rows of one batch land in the same slot, the later one stays.
        unique_slots, inverse = torch.unique(slots, return_inverse=True)
        last = torch.full_like(unique_slots, -1).scatter_reduce(0, inverse, order, reduce="amax")
        self._storage[unique_slots] = rest[last]


class ActivationRecorder:
    """Forward hooks on named modules of `model`; each output (detached, float32, CPU) goes to its sink.

    `sinks` maps a module name (as in `model.named_modules()`) to its sink; a module that
    returns a tuple is recorded by its first element. Rows are sampled at `sample_rate`
    with a generator per module seeded alike, so modules that see the same batches keep
    the same rows. Use as a context manager (hooks removed on exit) or call `remove()`.
    """

    def __init__(
        self,
        model: nn.Module,
        sinks: Mapping[str, ActivationSink],
        *,
        task: str | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError("sample_rate is in (0, 1]")
        if not sinks:
            raise ValueError("name at least one module to record")
        self.task = task
        self.sample_rate = sample_rate
        self.rows_seen: dict[str, int] = dict.fromkeys(sinks, 0)  # rows produced while attached
        self.rows_recorded: dict[str, int] = dict.fromkeys(sinks, 0)  # rows sent to the sink (after sampling)
        self._metadata: dict[str, Any] = {}
        self._pending: set[str] = set()  # modules that have not yet seen the annotated batch
        self._generators = {name: torch.Generator().manual_seed(seed) for name in sinks}
        self._handles: list[RemovableHandle] = []
        for name, sink in sinks.items():
            module = model.get_submodule(name)  # raises AttributeError for a name the model lacks
            self._handles.append(module.register_forward_hook(self._hook(name, sink)))

    def annotate(self, **metadata: Any) -> None:
        """Metadata (sample_id, label, step, epoch; per row or scalar) of the rows of the next forward."""
        self._metadata = metadata
        self._pending = set(self.rows_seen)

    def remove(self) -> None:
        """Detaches every hook; the model computes as before, with nothing recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _hook(self, name: str, sink: ActivationSink) -> Callable[[nn.Module, Any, Any], None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            values = output[0] if isinstance(output, tuple) else output
            rows = values.detach().to(device="cpu", dtype=torch.float32)
            metadata = self._metadata if name in self._pending else {}
            self._pending.discard(name)
            self.rows_seen[name] += rows.shape[0]
            if self.sample_rate < 1.0:
                keep = torch.rand(rows.shape[0], generator=self._generators[name]) < self.sample_rate
                rows = rows[keep]
                metadata = {key: _select_rows(value, keep) for key, value in metadata.items()}
            if rows.shape[0] == 0:
                return
            self.rows_recorded[name] += rows.shape[0]
            sink.write(rows, task=self.task, **metadata)

        return record


def _select_rows(value: Any, keep: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[keep.to(value.device)]
    if hasattr(value, "__len__") and not isinstance(value, str):
        return torch.as_tensor(value)[keep]
    return value
