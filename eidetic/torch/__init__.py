"""The device caches: quantile boundaries and memory banks held next to the model (needs torch)."""

from __future__ import annotations

from eidetic.torch.kernels import count_below
from eidetic.torch.memory_cache import BankSpec, CacheAnswer, CacheStats, MemoryCache, WriteOutcome
from eidetic.torch.quantile_cache import QuantileCache, QuantileCacheStats, local_boundaries

__all__ = [
    "BankSpec",
    "CacheAnswer",
    "CacheStats",
    "MemoryCache",
    "QuantileCache",
    "QuantileCacheStats",
    "WriteOutcome",
    "count_below",
    "local_boundaries",
]
