"""Replay memories kept in the store: a reservoir in a memory bank, latent features in a layer.

`BankReservoir` keeps experience replay's buffer in a memory bank created with policy
"none" and the buffer's capacity: the bank only stores and never chooses, while the
reservoir decisions come from `model.replay.Reservoir` on the client, which deletes the
evicted items and writes the admitted ones. The service's own policies replace by
similarity, confidence or age, none of which is reservoir sampling; deciding on the
client keeps the choice identical to the in-memory buffer's, and the bank, read back
whole (a snapshot, in item-id order) before each task, is the buffer replay draws from.

`StoredLatentMemory` writes the read-out inputs of each task through an activation
writer into a layer of the run (one task name per task) and reads them back with the
client's Arrow read, sorted by sample id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from eidetic.client import EideticClient
from eidetic.config import ClientSettings
from eidetic.writer import ActivationWriter, open_writer
from model.replay import Reservoir

__all__ = ["BankReservoir", "StoredLatentMemory"]

WRITE_CHUNK = 256  # items per bank write (a JSON body of a few MiB for 28 x 28 inputs)


class BankReservoir:
    """A `SampleBuffer` whose samples are the items of one memory bank (key: the flattened input)."""

    def __init__(self, client: EideticClient, name: str, sample_shape: tuple[int, ...], capacity: int, seed: int):
        self.client = client
        self.capacity = capacity
        self.sample_shape = tuple(sample_shape)
        self.policy = Reservoir(capacity, seed)
        dim = int(np.prod(self.sample_shape))
        bank = client.create_bank(name, dim, capacity, metric="l2", policy="none")
        self.bank_id = int(bank["id"])
        self._ids: list[int] = []  # the bank's items, oldest-stored (lowest id) first

    def extend(self, samples: Tensor, labels: Tensor) -> None:
        plan = self.policy.plan(len(self._ids), samples.shape[0])
        for position in plan.evicted:
            self.client.delete_item(self.bank_id, self._ids[position])
        evicted = set(plan.evicted)
        kept = [item for position, item in enumerate(self._ids) if position not in evicted]
        keys = samples.detach().to("cpu", torch.float32).flatten(1).numpy()
        targets = labels.detach().cpu().tolist()
        new_ids: list[int] = []
        for start in range(0, len(plan.admitted), WRITE_CHUNK):
            chosen = plan.admitted[start : start + WRITE_CHUNK]
            items = [{"key": keys[i], "label": int(targets[i])} for i in chosen]  # numpy keys: an Arrow body
            written = self.client.write_items(self.bank_id, items)
            if written["inserted"] != len(items):
                raise RuntimeError(f"bank {self.bank_id} stored {written['inserted']} of {len(items)} admitted items")
            new_ids.extend(int(i) for i in written["ids"])
        self._ids = kept + new_ids

    def contents(self) -> tuple[Tensor, Tensor]:
        """The bank as stored now, lowest item id first."""
        table = self.client.snapshot_table(self.bank_id)
        ids = table.column("id").to_pylist()
        if ids != sorted(self._ids):
            raise RuntimeError(f"bank {self.bank_id} holds other items than this buffer wrote")
        if table.num_rows == 0:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        keys = _fixed_size_matrix(table.column("key"))
        samples = torch.from_numpy(keys.copy()).view(-1, *self.sample_shape)
        labels = torch.tensor(table.column("label").to_numpy(), dtype=torch.long)
        return samples, labels


class StoredLatentMemory:
    """A `LatentMemory` in a layer of a run: one task name ("0", "1", ...) per task."""

    def __init__(self, client: EideticClient, settings: ClientSettings, run_id: int, layer: str, dim: int) -> None:
        self.client = client
        self.settings = settings
        self.run_id = run_id
        self.layer_id = client.create_layer(run_id, layer, dim, kind="latent_replay", sketch=False).id
        self._writer: ActivationWriter | None = None

    def add_task(self, task: int, features: Tensor, labels: Tensor, sample_ids: Tensor) -> None:
        if self._writer is None:
            self._writer = open_writer(self.run_id, self.layer_id, self.settings, in_flight=1)
        self._writer.write(features, sample_id=sample_ids, label=labels, task=str(task), epoch=0, step=task)
        self._writer.flush()  # a later task reads it back: acknowledged before learn() returns

    def recall(self, tasks: Sequence[int]) -> tuple[Tensor, Tensor]:
        features, labels = [], []
        for task in tasks:
            table = self.client.read_activations(self.run_id, self.layer_id, task=str(task))
            order = np.argsort(table.column("sample_id").to_numpy(), kind="stable")
            features.append(torch.from_numpy(_fixed_size_matrix(table.column("values"))[order].copy()))
            labels.append(torch.tensor(table.column("label").to_numpy()[order], dtype=torch.long))
        if not features:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat(features), torch.cat(labels)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _fixed_size_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A column of fixed-size float32 lists as one (rows x size) matrix."""
    combined = column.combine_chunks()
    size = combined.type.list_size
    return combined.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, size)
