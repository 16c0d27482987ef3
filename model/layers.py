"""The seed's Eidetic and Indexed linear layers, vectorised.

- `EideticLinear` is a linear layer whose pre-bias outputs pass through a hook point
  (`pre_bias`, an identity) and, once per-unit quantile boundaries are installed, emit
  the bucket (0..Q-1) of every unit of every output it computes.
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

The layers do no I/O: what they produced is recorded by hooks attached from outside
(`model.recording.ActivationRecorder`, sending rows to the store, to memory or nowhere),
and their boundaries are computed by whoever holds the recorded rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


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


class Bucketizer(Protocol):
    """Per-unit quantile boundaries that map values to buckets (eidetic.torch.QuantileCache is one)."""

    def bucketize(self, values: torch.Tensor) -> torch.Tensor: ...


class _Eidetic:
    """What makes a layer eidetic: a hook point for its pre-bias outputs and the buckets it emits.

    Recording is attached from outside (model.recording.ActivationRecorder hooks the
    `pre_bias` submodule), so the layer computes the same with a store, without one, or
    with any other sink. `quantiles` is installed by whoever computed the boundaries.
    """

    pre_bias: nn.Identity
    quantiles: Bucketizer | None

    def _init_eidetic(self) -> None:
        self.pre_bias = nn.Identity()  # the hook point: its output is the layer's pre-bias output
        self.quantiles = None

    def _emit(self, pre_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Passes pre-bias outputs through the hook point; their buckets once quantiles are installed."""
        pre_bias = self.pre_bias(pre_bias)
        return pre_bias, None if self.quantiles is None else self.quantiles.bucketize(pre_bias)


# ---------------------------------------------------------------- layers


class EideticLinear(_Eidetic, nn.Module):
    """A linear layer whose forward returns (outputs, buckets of its pre-bias outputs or None)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_linear(self.weight, self.bias)
        self._init_eidetic()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pre_bias, buckets = self._emit(F.linear(x, self.weight))
        return (pre_bias if self.bias is None else pre_bias + self.bias), buckets

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class IndexedLinear(nn.Module):
    """A linear layer with one weight slice per bucket, selected per input unit once the index is built.

    Before `build_index` it is a plain linear layer over `weight` (out x in). Building
    the index copies `weight` into every slice of `bucket_weights` (quantiles x in x out);
    from then on the slices are what forward uses (with one quantile: the same function).
    """

    index_built: torch.Tensor  # a bool buffer, so the state dict says whether the slices are in use

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
        bias: bool = True,
    ) -> None:
        IndexedLinear.__init__(self, in_features, out_features, n_quantiles, bias=bias)
        self._init_eidetic()

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, buckets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        pre_bias, own_buckets = self._emit(self._product(x, buckets, None))
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
