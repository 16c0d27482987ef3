"""The seed's Eidetic and Indexed linear layers, vectorised.

- `EideticLinear` is a linear layer that can record its pre-bias outputs (sampled at a
  rate, into a bounded local reservoir and, when a store is bound or a writer given,
  into the Eidetic store), compute per-unit quantile boundaries of what it recorded
  (locally, or exactly through the service: the same boundaries either way), and then
  emit the bucket (0..Q-1) of every unit of every output it computes.
- `IndexedLinear` holds one weight slice per bucket (quantiles x in x out). Once its
  index is built (the trained weight copied into every slice), each input unit picks
  its weight row by the bucket of its own activation:
  out[b, o] = sum_i x[b, i] * W[bucket[b, i], i, o] + bias.
- `EideticIndexedLinear` is both: bucket-selected weights in, buckets of its own
  outputs out.

Bucket selection is one GEMM: the input is spread into a (batch x Q x in) tensor that is
zero except at each unit's bucket, then multiplied by the (Q*in x out) weight table. That
keeps autograd exact, the backward deterministic (no atomic index_put as with a gather),
and the working memory at batch*Q*in instead of batch*in*out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eidetic.client import EideticClient
from eidetic.config import ClientSettings
from eidetic.torch.quantile_cache import QuantileCache, local_boundaries
from eidetic.writer import ActivationWriter, open_writer


def bucket_linear(
    x: torch.Tensor, buckets: torch.Tensor, bucket_weights: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """out[b, o] = sum_i x[b, i] * bucket_weights[buckets[b, i], i, o] (+ bias[o]), for any batch size."""
    n_quantiles, n_in, n_out = bucket_weights.shape
    if x.ndim != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must be (batch x {n_in}), got {tuple(x.shape)}")
    if buckets.shape != x.shape:
        raise ValueError(f"buckets must have x's shape {tuple(x.shape)}, got {tuple(buckets.shape)}")
    if n_quantiles == 1:
        out = x @ bucket_weights[0]
    else:
        spread = x.new_zeros(x.shape[0], n_quantiles, n_in).scatter(
            1, buckets.to(device=x.device, dtype=torch.long).unsqueeze(1), x.unsqueeze(1)
        )
        out = spread.reshape(x.shape[0], n_quantiles * n_in) @ bucket_weights.reshape(n_quantiles * n_in, n_out)
    return out if bias is None else out + bias


def _init_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """nn.Linear's initialisation (and the seed's): Kaiming-uniform weight, uniform bias in +-1/sqrt(fan_in)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


# ---------------------------------------------------------------- recording


class ActivationRecorder:
    """Rows a layer produced: sampled at `sample_rate`, kept up to `capacity` in a uniform reservoir.

    Owns its random generator, so sampling never moves torch's global random state
    (training is the same with the store on or off). Every sampled row also goes to the
    writer, when there is one; the reservoir holds all of them until `capacity` is reached.
    """

    def __init__(self, units: int, capacity: int, sample_rate: float = 1.0, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity is at least 1")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError("sample_rate is in (0, 1]")
        self.units = units
        self.capacity = capacity
        self.sample_rate = sample_rate
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._storage = torch.empty(0, units)  # grows by doubling up to capacity
        self.rows_kept = 0
        self.rows_sampled = 0  # rows offered to the reservoir (and to the writer)
        self.rows_seen = 0  # rows produced while recording, before sampling

    def values(self) -> torch.Tensor:
        """The kept rows (rows_kept x units), float32 on the CPU."""
        return self._storage[: self.rows_kept]

    def clear(self) -> None:
        """Forgets every row and restarts the sampling sequence (the same rows again give the same sample)."""
        self._storage = torch.empty(0, self.units)
        self.rows_kept = self.rows_sampled = self.rows_seen = 0
        self.generator.manual_seed(self.seed)

    def observe(self, values: torch.Tensor, writer: ActivationWriter | None, task: str | None, metadata: dict) -> None:
        rows = values.detach().to(device="cpu", dtype=torch.float32)
        self.rows_seen += rows.shape[0]
        if self.sample_rate < 1.0:
            keep = torch.rand(rows.shape[0], generator=self.generator) < self.sample_rate
            rows = rows[keep]
            metadata = {name: _select_rows(value, keep) for name, value in metadata.items()}
        if rows.shape[0] == 0:
            return
        if writer is not None:
            writer.write(rows, task=task, **metadata)
        self._offer(rows)

    def _offer(self, rows: torch.Tensor) -> None:
        """Algorithm R (Vitter 1985), vectorised over a batch: the reservoir stays a uniform sample."""
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
        first = self.rows_sampled + rows.shape[0] - rest.shape[0]
        self.rows_sampled += rows.shape[0]
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


def _select_rows(value: Any, keep: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[keep.to(value.device)]
    if hasattr(value, "__len__") and not isinstance(value, str):
        return torch.as_tensor(value)[keep]
    return value


@dataclass
class StoreBinding:
    """Where a layer's rows live in the store: recording streams there, quantiles are computed there."""

    client: EideticClient
    run_id: int
    layer_id: int
    settings: ClientSettings


class _Eidetic:
    """What makes a layer eidetic: a recorder, an optional store binding, and a quantile cache."""

    recorder: ActivationRecorder
    quantiles: QuantileCache | None
    store: StoreBinding | None

    def _init_eidetic(self, units: int, buffer_rows: int, sample_rate: float, seed: int) -> None:
        self.recorder = ActivationRecorder(units, buffer_rows, sample_rate, seed)
        self.quantiles = None
        self.store = None
        self._recording: tuple[ActivationWriter | None, str | None] | None = None
        self._metadata: dict[str, Any] = {}

    @property
    def is_recording(self) -> bool:
        return self._recording is not None

    def bind_store(self, store: StoreBinding | None) -> None:
        """Record into and compute quantiles through the store (None: local only)."""
        self.store = store

    @contextmanager
    def recording(
        self, task: str | None = None, writer: ActivationWriter | None = None
    ) -> Iterator[ActivationRecorder]:
        """Record pre-bias outputs while inside; rows go to `writer`, else to the bound store, and to the reservoir.

        A writer this opens (for a bound store) is flushed and closed on the way out, so
        every recorded row is committed before quantiles are computed.
        """
        if self._recording is not None:
            raise RuntimeError("this layer is already recording")
        own = writer is None and self.store is not None
        if own:
            writer = open_writer(self.store.run_id, self.store.layer_id, self.store.settings)
        self._recording = (writer, task)
        try:
            yield self.recorder
        finally:
            self._recording = None
            self._metadata = {}
            if own:
                writer.close()

    def annotate(self, **metadata: Any) -> None:
        """Metadata (sample_id, label, step, epoch; scalars or per-row) of the rows of the next forward."""
        self._metadata = metadata

    def compute_quantiles(self, n_quantiles: int, task: str | None = None) -> QuantileCache:
        """Boundaries of every unit over the recorded rows, installed so forward emits buckets.

        Through the service (exact, filtered by `task`) when a store is bound, else from
        the local reservoir with the same order statistics: identical boundaries when the
        reservoir holds every recorded row.
        """
        device = self._device()
        if n_quantiles < 1:
            raise ValueError("n_quantiles is at least 1")
        if n_quantiles == 1:
            cache = QuantileCache(torch.empty(self.recorder.units, 0, device=device))
        elif self.store is not None:
            answer = self.store.client.compute_quantiles(
                self.store.run_id, self.store.layer_id, n_quantiles, "exact", task=task
            )
            cache = QuantileCache.from_quantile_set(answer, device)
        else:
            if self.recorder.rows_kept == 0:
                raise RuntimeError("nothing recorded; record some outputs before computing quantiles")
            cache = QuantileCache(local_boundaries(self.recorder.values(), n_quantiles).to(device))
        self.quantiles = cache
        return cache

    def _emit(self, pre_bias: torch.Tensor) -> torch.Tensor | None:
        """Records (when recording) and buckets (when quantiles are installed) one batch of pre-bias outputs."""
        if self._recording is not None:
            writer, task = self._recording
            metadata, self._metadata = self._metadata, {}
            self.recorder.observe(pre_bias, writer, task, metadata)
        return None if self.quantiles is None else self.quantiles.bucketize(pre_bias)

    def _device(self) -> torch.device:
        return self.weight.device  # type: ignore[attr-defined]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the store binding and any open recording behind."""
        state = dict(self.__dict__)
        state["store"] = None
        state["_recording"] = None
        state["_metadata"] = {}
        return state


# ---------------------------------------------------------------- layers


class EideticLinear(_Eidetic, nn.Module):
    """A linear layer whose forward returns (outputs, buckets of its pre-bias outputs or None)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        buffer_rows: int = 10_000,
        sample_rate: float = 1.0,
        seed: int = 0,
        bias: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_linear(self.weight, self.bias)
        self._init_eidetic(out_features, buffer_rows, sample_rate, seed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pre_bias = F.linear(x, self.weight)
        buckets = self._emit(pre_bias)
        return (pre_bias if self.bias is None else pre_bias + self.bias), buckets

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class IndexedLinear(nn.Module):
    """A linear layer with one weight slice per bucket, selected per input unit once the index is built.

    Before `build_index` it is a plain linear layer over `weight` (out x in). Building
    the index copies `weight` into every slice of `bucket_weights` (quantiles x in x out);
    from then on the slices are what forward uses (with one quantile: the same function).
    """

    def __init__(self, in_features: int, out_features: int, n_quantiles: int = 1, *, bias: bool = True) -> None:
        super().__init__()
        if n_quantiles < 1:
            raise ValueError("n_quantiles is at least 1")
        self.in_features, self.out_features, self.n_quantiles = in_features, out_features, n_quantiles
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_linear(self.weight, self.bias)
        # Zeros, not random: the slices are filled by build_index, and allocating them must not
        # move the global random state (models with any number of quantiles start alike).
        self.bucket_weights = nn.Parameter(torch.zeros(n_quantiles, in_features, out_features))
        self.register_buffer("index_built", torch.tensor(False))

    @property
    def is_indexed(self) -> bool:
        return bool(self.index_built)

    @torch.no_grad()
    def build_index(self) -> None:
        """Copies the trained weight into every bucket's slice and switches forward to the slices."""
        self.bucket_weights.copy_(self.weight.T.unsqueeze(0).expand_as(self.bucket_weights))
        self.index_built.fill_(True)

    def _product(self, x: torch.Tensor, buckets: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.is_indexed:
            return F.linear(x, self.weight, bias)
        if self.n_quantiles == 1:
            # The single slice in nn.Linear's (out x in) layout: the very same kernel, so the very same numbers.
            return F.linear(x, self.bucket_weights[0].T.contiguous(), bias)
        if buckets is None:
            raise ValueError("an indexed layer with several quantiles needs the bucket of every input unit")
        return bucket_linear(x, buckets, self.bucket_weights, bias)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor | None = None) -> torch.Tensor:
        return self._product(x, buckets, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"n_quantiles={self.n_quantiles}, bias={self.bias is not None}"
        )


class EideticIndexedLinear(_Eidetic, IndexedLinear):
    """Bucket-selected weights over its inputs (once indexed) and the buckets of its own pre-bias outputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_quantiles: int = 1,
        *,
        buffer_rows: int = 10_000,
        sample_rate: float = 1.0,
        seed: int = 0,
        bias: bool = True,
    ) -> None:
        IndexedLinear.__init__(self, in_features, out_features, n_quantiles, bias=bias)
        self._init_eidetic(out_features, buffer_rows, sample_rate, seed)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, buckets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pre_bias = self._product(x, buckets, None)
        own_buckets = self._emit(pre_bias)
        return (pre_bias if self.bias is None else pre_bias + self.bias), own_buckets


# ---------------------------------------------------------------- freezing


def indexed_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The bucket weights of every IndexedLinear (or EideticIndexedLinear) whose index is built."""
    return [layer.bucket_weights for layer in module.modules() if isinstance(layer, IndexedLinear) and layer.is_indexed]


def freeze_all_but(module: nn.Module, trainable: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Sets requires_grad on exactly `trainable`; returns them (what the next optimiser should hold)."""
    keep = list(trainable)
    ids = {id(parameter) for parameter in keep}
    for parameter in module.parameters():
        parameter.requires_grad_(id(parameter) in ids)
    return keep
