"""A `KernelStatsSink` in the store: each (task, layer) record is a kernel-record set of a run.

Records go to `POST /v1/runs/{run}/kernel-records` and come back from the store on every
read, so a later task, a resumed job or another process sees the same records. Values
travel as float64 and are float32 on both ends, so a record reads back bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from eidetic.client import EideticClient
from model.kernel_plasticity import KernelRecord

__all__ = ["StoreKernelStatsSink"]


class StoreKernelStatsSink:
    """Writes and reads one run's kernel records through the REST client (which it does not close)."""

    def __init__(self, client: EideticClient, run_id: int) -> None:
        self.client = client
        self.run_id = run_id

    def record(self, task: int, layer: str, kernel_change: Tensor, importance: Tensor, intervals: int = 0) -> None:
        if kernel_change.shape != importance.shape or kernel_change.ndim != 1:
            raise ValueError(
                f"one value per kernel in both: kernel_change {tuple(kernel_change.shape)}, "
                f"importance {tuple(importance.shape)}"
            )
        change = kernel_change.detach().to("cpu", torch.float32).numpy()
        summed = importance.detach().to("cpu", torch.float32).numpy()
        self.client.write_kernel_records(self.run_id, task, layer, change, summed, intervals)

    def read(self, task: int, layer: str) -> KernelRecord | None:
        found = self.client.kernel_records(self.run_id, task=task, layer=layer)
        if not found:
            return None
        (stored,) = found
        return KernelRecord(
            torch.from_numpy(stored.change.astype("float32")),
            torch.from_numpy(stored.importance.astype("float32")),
            stored.intervals,
        )
