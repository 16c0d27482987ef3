"""Quantile boundaries held on the model's device, bucketing activations in one fused kernel.

The hot path (bucketing a training batch) never touches the network: the boundaries
are a (units x Q-1) tensor on the device, and `refresh` swaps in a newer version only
when the store has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from eidetic.client import EideticClient
from eidetic.torch.kernels import count_below
from eidetic.wire.order_statistics import order_statistics


def local_boundaries(values: torch.Tensor, n_quantiles: int) -> torch.Tensor:
    """Exact per-unit boundaries of a (rows x units) tensor: numpy's inverted CDF, as the service computes.

    Uses the same order statistics as the service, so USE_DB on and off give identical
    boundaries.
    """
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"need a non-empty (rows x units) tensor, got shape {tuple(values.shape)}")
    positions = torch.from_numpy(order_statistics(values.shape[0], n_quantiles)).to(values.device)
    ordered = torch.sort(values.detach().to(torch.float32), dim=0).values
    return ordered.index_select(0, positions).T.contiguous()


@dataclass
class QuantileCacheStats:
    lookups: int = 0
    values_bucketed: int = 0
    refreshes: int = 0
    version: int = 0


class QuantileCache:
    """One quantile set's boundaries on a device; `bucketize` is vectorised over batch and units."""

    def __init__(
        self, boundaries: torch.Tensor, version: int = 0, set_id: int | None = None, *, compiled: bool = True
    ) -> None:
        """`compiled=False` keeps bucketing in eager torch (no compile on first use)."""
        if boundaries.ndim != 2:
            raise ValueError("boundaries are (units x Q-1)")
        self.boundaries = boundaries.to(torch.float32).contiguous()
        self.compiled = compiled
        self.version = version
        self.set_id = set_id
        self.stats = QuantileCacheStats(version=version)
        self._source: tuple[int, int, str | None] | None = None  # (run, layer, method) when loaded from the store

    @property
    def n_quantiles(self) -> int:
        return self.boundaries.shape[1] + 1

    @property
    def device(self) -> torch.device:
        return self.boundaries.device

    @classmethod
    def from_quantile_set(cls, answer: dict, device: torch.device | str = "cpu") -> QuantileCache:
        boundaries = torch.tensor(np.asarray(answer["boundaries"], dtype=np.float32), device=device)
        return cls(boundaries, version=int(answer["version"]), set_id=int(answer["id"]))

    @classmethod
    def from_service(
        cls,
        client: EideticClient,
        run_id: int,
        layer_id: int,
        device: torch.device | str = "cpu",
        method: str | None = None,
    ) -> QuantileCache:
        """The layer's latest quantile set from the store."""
        cache = cls.from_quantile_set(client.latest_quantiles(run_id, layer_id, method), device)
        cache._source = (run_id, layer_id, method)
        return cache

    @property
    def boundaries(self) -> torch.Tensor:
        """(units x Q-1), each row ascending."""
        return self._boundaries

    @boundaries.setter
    def boundaries(self, value: torch.Tensor) -> None:
        self._boundaries = value
        self.boundaries_by_rank = value.T.contiguous()  # (Q-1 x units): the layout the kernel reads

    def to(self, device: torch.device | str) -> QuantileCache:
        self.boundaries = self.boundaries.to(device)
        return self

    def refresh(self, client: EideticClient) -> bool:
        """Loads the store's latest version if it is newer than the one held; True if it changed."""
        if self._source is None:
            raise ValueError("this cache was not loaded from the store (QuantileCache.from_service)")
        run_id, layer_id, method = self._source
        answer = client.latest_quantiles(run_id, layer_id, method)
        if int(answer["version"]) <= self.version:
            return False
        fresh = QuantileCache.from_quantile_set(answer, self.device)
        self.boundaries, self.version, self.set_id = fresh.boundaries, fresh.version, fresh.set_id
        self.stats.refreshes += 1
        self.stats.version = self.version
        return True

    def bucketize(self, activations: torch.Tensor, *, out_int32: bool = False) -> torch.Tensor:
        """Bucket (0..Q-1) of every value: the number of its unit's boundaries strictly below it.

        torch.bucketize(right=False) with one boundary table per unit, in one fused kernel
        (model/kernels.py); int64 like torch.bucketize, int32 with `out_int32`.
        """
        if activations.ndim != 2 or activations.shape[1] != self.boundaries.shape[0]:
            raise ValueError(
                f"activations must be (batch x {self.boundaries.shape[0]}), got {tuple(activations.shape)}"
            )
        values = activations.detach().to(device=self.device, dtype=torch.float32)
        buckets = count_below(values, self.boundaries_by_rank, out_int32=out_int32, compiled=self.compiled)
        self.stats.lookups += 1
        self.stats.values_bucketed += activations.numel()
        return buckets
