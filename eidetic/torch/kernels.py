"""Bucketing kernels: counting each unit's boundaries strictly below each value.

Eager torch spends most of a bucketing call moving memory: one comparison pass per boundary,
each writing a full (batch x units) mask that the next reads back. `torch.compile` fuses the
unrolled comparisons into one loop over the values (C++ on CPU, Triton on CUDA), which reads
each value once and writes its bucket once: 5-15x faster on CPU (bench/caches.py).

The compiled kernel is an optimisation, never a requirement: where compiling fails (no C++
compiler, an unsupported device or build) the eager kernel answers, with one warning, and
both give identical buckets (tests/test_quantile_cache.py).
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

# Up to this many boundaries per unit a comparison per boundary beats a binary search per value;
# the compiled kernel unrolls that many comparisons, so the limit also bounds its compile time.
UNROLLED_MAX_BOUNDARIES = 32


def _count_below_unrolled(values: torch.Tensor, boundaries_by_rank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch x units) counts; boundaries_by_rank is (Q-1 x units). Written to be fused by torch.compile."""
    counts = (values > boundaries_by_rank[0]).to(dtype)
    for rank in range(1, boundaries_by_rank.shape[0]):
        counts = counts + (values > boundaries_by_rank[rank]).to(dtype)
    return counts


def _count_below_eager(values: torch.Tensor, boundaries_by_rank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same counts in eager torch, with one reused mask and an in-place uint8 accumulator."""
    if boundaries_by_rank.shape[0] > UNROLLED_MAX_BOUNDARIES:
        return torch.searchsorted(
            boundaries_by_rank.T.contiguous(), values.T.contiguous(), right=False, out_int32=dtype == torch.int32
        ).T.to(dtype)
    counts = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    mask = torch.empty(values.shape, dtype=torch.bool, device=values.device)
    for boundary in boundaries_by_rank:
        torch.gt(values, boundary, out=mask)
        counts.add_(mask.view(torch.uint8))  # a bool is one byte: adding its view avoids a cast pass
    return counts.to(dtype)


class _CompiledCounter:
    """The fused kernel, compiled on first use per device type; falls back to eager for good on failure."""

    def __init__(self) -> None:
        self._compiled = torch.compile(_count_below_unrolled, dynamic=True)
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def usable(self, device: torch.device) -> bool:
        return device.type not in self._failed

    def __call__(
        self, values: torch.Tensor, boundaries_by_rank: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The counts, or None when this device's compile failed (now or before)."""
        if not self.usable(values.device):
            return None
        try:
            return self._compiled(values, boundaries_by_rank, dtype)
        except Exception as error:
            with self._lock:
                if values.device.type not in self._failed:
                    self._failed.add(values.device.type)
                    log.warning(
                        "torch.compile of the bucketing kernel failed on %s (%s: %s); using the eager kernel",
                        values.device.type,
                        type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "",
                    )
            return None


_compiled_counter: _CompiledCounter | None = None


def count_below(
    values: torch.Tensor, boundaries_by_rank: torch.Tensor, *, out_int32: bool = False, compiled: bool = True
) -> torch.Tensor:
    """For every value of a (batch x units) tensor, how many of its unit's boundaries lie strictly below it.

    `boundaries_by_rank` is (Q-1 x units), each column sorted ascending. This is
    torch.bucketize(right=False) with one boundary table per unit. Answers int64 (int32 with
    `out_int32`, as torch.bucketize).
    """
    global _compiled_counter
    dtype = torch.int32 if out_int32 else torch.int64
    if boundaries_by_rank.shape[0] == 0:
        return torch.zeros(values.shape, dtype=dtype, device=values.device)
    if compiled and boundaries_by_rank.shape[0] <= UNROLLED_MAX_BOUNDARIES and values.numel() > 0:
        if _compiled_counter is None:
            _compiled_counter = _CompiledCounter()
        counts = _compiled_counter(values, boundaries_by_rank, dtype)
        if counts is not None:
            return counts
    return _count_below_eager(values, boundaries_by_rank, dtype)
