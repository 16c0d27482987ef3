"""A memory bank held on the model's device: exact top-k by matmul on the hot path, writes applied at once.

The store is the source of truth; this is a copy that knows which bank version it
holds. Writes are applied locally with the bank's policy (the same rules as the
service) and sent behind by a background thread; the change feed (`since=version`)
brings other writers' changes, and a search never runs more than `max_staleness`
versions behind what the cache last heard of. With no client it is a device-only
memory with the same policy (USE_DB off).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from eidetic.client import EideticClient
from eidetic.wire.bank_policy import (
    NO_CONFIDENCE,
    NO_LABEL,
    BankState,
    Batch,
    Similarities,
    WritePlan,
    encode_confidences,
    encode_labels,
    inserted_until_full,
    plan_write,
    policy_named,
)

__all__ = ["NO_LABEL", "BankSpec", "CacheAnswer", "CacheStats", "MemoryCache", "WriteOutcome", "vote"]


@dataclass
class BankSpec:
    """What the cache needs to know of a bank: its shape, metric and policy."""

    dim: int
    capacity: int
    metric: str = "cosine"
    policy: str = "same_class_lowest_similarity"
    similarity_threshold: float = 0.85
    value_dim: int | None = None
    id: int | None = None

    @classmethod
    def from_service(cls, bank: dict) -> BankSpec:
        names = ("dim", "capacity", "metric", "policy", "similarity_threshold", "value_dim", "id")
        return cls(**{name: bank[name] for name in names})


@dataclass
class CacheStats:
    hits: int = 0  # queries answered on the device
    misses: int = 0  # queries sent to the service (partial cache, best similarity under the threshold)
    syncs: int = 0
    rewarms: int = 0
    writes_local: int = 0
    writes_sent: int = 0
    version: int = 0
    known_version: int = 0

    @property
    def staleness(self) -> int:
        return max(0, self.known_version - self.version)


@dataclass
class CacheAnswer:
    """Top-k of a batch of queries: tensors of shape (batch, k) on the cache's device."""

    ids: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor  # NO_LABEL where an item has none
    prediction: torch.Tensor  # -1 where no neighbour has a label
    confidence: torch.Tensor
    from_service: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


@dataclass
class WriteOutcome:
    """Per item: the slot it went to (or -1 if skipped), and the counts, as the service reports them."""

    slots: list[int]
    inserted: int
    replaced: int
    skipped: int


class MemoryCache:
    """Keys, labels, values and confidences of a bank as preallocated device tensors."""

    def __init__(
        self,
        spec: BankSpec,
        device: torch.device | str = "cpu",
        *,
        client: EideticClient | None = None,
        cache_capacity: int | None = None,
        max_staleness: int = 0,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.client = client
        self.capacity = min(cache_capacity or spec.capacity, spec.capacity)
        self.max_staleness = max_staleness
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._allocate()
        self._outbox: queue.Queue = queue.Queue()
        self._pending = 0
        self._sender: threading.Thread | None = None
        self._failure: Exception | None = None
        self._next_provisional = -1
        self._resolved: dict[int, int] = {}  # provisional id -> the id the service gave it

    # ---------------------------------------------------------------- storage

    def _allocate(self) -> None:
        n, dim = self.capacity, self.spec.dim
        self.keys = torch.zeros(n, dim, device=self.device)
        self.unit_keys = torch.zeros(n, dim, device=self.device)  # normalised, for cosine
        self.labels = torch.full((n,), NO_LABEL, dtype=torch.long, device=self.device)
        self.values = torch.zeros(n, self.spec.value_dim or 0, device=self.device)
        self.confidences = torch.full((n,), NO_CONFIDENCE, device=self.device)
        self.order = torch.zeros(n, dtype=torch.long, device=self.device)
        self.hits = torch.zeros(n, dtype=torch.long, device=self.device)
        self.ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.size = 0
        self._slot_of: dict[int, int] = {}

    @property
    def partial(self) -> bool:
        """True when the cache holds only the most-hit part of a larger bank."""
        return self.capacity < self.spec.capacity

    def _put(
        self, slot: int, item_id: int, key: torch.Tensor, label: int | None, value, confidence, order: int
    ) -> None:
        old = int(self.ids[slot]) if slot < self.size else None
        if old is not None and self._slot_of.get(old) == slot:
            del self._slot_of[old]
        self.ids[slot] = item_id
        self._slot_of[item_id] = slot
        self.keys[slot] = key
        self.unit_keys[slot] = _unit(key)
        self.labels[slot] = NO_LABEL if label is None else int(label)
        if self.spec.value_dim:
            self.values[slot] = 0 if value is None else torch.as_tensor(value, dtype=torch.float32, device=self.device)
        self.confidences[slot] = NO_CONFIDENCE if confidence is None else float(confidence)
        self.order[slot] = order
        self.hits[slot] = 0

    def _remove(self, item_id: int) -> None:
        slot = self._slot_of.pop(item_id, None)
        if slot is None:
            return
        last = self.size - 1
        if slot != last:  # move the last item into the hole
            moved = int(self.ids[last])
            for tensor in (
                self.keys,
                self.unit_keys,
                self.labels,
                self.values,
                self.confidences,
                self.order,
                self.hits,
            ):
                tensor[slot] = tensor[last]
            self.ids[slot] = moved
            self._slot_of[moved] = slot
        self.size -= 1

    # ---------------------------------------------------------------- warm and follow

    @classmethod
    def from_service(
        cls,
        client: EideticClient,
        bank_id: int,
        device: torch.device | str = "cpu",
        *,
        cache_capacity: int | None = None,
        max_staleness: int = 0,
    ) -> MemoryCache:
        cache = cls(
            BankSpec.from_service(client.get_bank(bank_id)),
            device,
            client=client,
            cache_capacity=cache_capacity,
            max_staleness=max_staleness,
        )
        cache.warm()
        return cache

    def warm(self) -> None:
        """Loads the bank from its Arrow snapshot (the most-hit items when it does not all fit)."""
        client, bank_id = self._service()
        table = client.snapshot_table(bank_id)
        version = int(table.schema.metadata[b"bank_version"])
        if table.num_rows > self.capacity:
            order = np.argsort(-np.asarray(table.column("hits")), kind="stable")[: self.capacity]
            table = table.take(pa.array(np.sort(order)))
        with self._lock:
            self._allocate()
            n = table.num_rows
            if n:
                keys = torch.from_numpy(np.stack(table.column("key").to_numpy(zero_copy_only=False))).to(self.device)
                self.keys[:n] = keys
                self.unit_keys[:n] = _unit(keys)
                labels = table.column("label").to_pylist()
                self.labels[:n] = torch.tensor(
                    [NO_LABEL if label is None else label for label in labels], device=self.device
                )
                confidences = table.column("confidence").to_pylist()
                self.confidences[:n] = torch.tensor(
                    [NO_CONFIDENCE if c is None else c for c in confidences], device=self.device
                )
                if self.spec.value_dim:
                    values = [
                        np.zeros(self.spec.value_dim) if v is None else v for v in table.column("value").to_pylist()
                    ]
                    self.values[:n] = torch.tensor(np.array(values, dtype=np.float32), device=self.device)
                versions = torch.tensor(table.column("version").to_pylist(), device=self.device)
                self.order[:n] = versions * (1 << 32) + torch.tensor(
                    table.column("rank").to_pylist(), device=self.device
                )
                self.hits[:n] = torch.tensor(table.column("hits").to_pylist(), device=self.device)
                self.ids[:n] = torch.tensor(table.column("id").to_pylist(), device=self.device)
                self._slot_of = {int(i): s for s, i in enumerate(self.ids[:n].tolist())}
            self.size = n
            self.stats.version = self.stats.known_version = version
            self.stats.rewarms += 1

    def sync(self) -> int:
        """Applies the change feed after the version held; returns how many changes it applied."""
        applied = 0
        client, bank_id = self._service()
        with self._lock:
            since = self.stats.version
            while True:
                page = client.changes(bank_id, since)
                for tombstone in page["tombstones"]:
                    self._remove(int(tombstone["id"]))
                for item in page["items"]:
                    self._upsert(item)
                applied += len(page["items"]) + len(page["tombstones"])
                since = page["version"]
                if page["next_since"] is None:
                    break
            self.stats.version = max(self.stats.version, since)
            self.stats.known_version = max(self.stats.known_version, since)
            self.stats.syncs += 1
        return applied

    def _upsert(self, item: dict) -> None:
        item_id = int(item["id"])
        slot = self._slot_of.get(item_id)
        if slot is None:
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:  # a partial cache: the newcomer takes the least-hit slot
                slot = int(torch.argmin(self.hits[: self.size]))
        key = torch.tensor(item["key"], dtype=torch.float32, device=self.device)
        order = (int(item["version"]) << 32) + int(item["rank"])  # the write that stored it, its place in that write
        self._put(slot, item_id, key, item["label"], item["value"], item["confidence"], order)

    # ---------------------------------------------------------------- search (the hot path)

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """(batch x size) similarities to the stored keys (or to `keys`), defined as the service defines them."""
        if keys is None:
            keys = self.keys[: self.size]
            unit_keys = self.unit_keys[: self.size]
        else:
            unit_keys = _unit(keys)
        if self.spec.metric == "cosine":
            return _unit(queries) @ unit_keys.T
        if self.spec.metric == "ip":
            return queries @ keys.T
        return 1.0 / (1.0 + torch.cdist(queries, keys))

    def search(self, queries: torch.Tensor, k: int = 1) -> CacheAnswer:
        """Exact top-k on the device; a partial cache asks the service for queries it can't answer well."""
        queries = queries.detach().to(device=self.device, dtype=torch.float32)
        self._keep_fresh()
        with self._lock:
            if self.size == 0:
                empty = torch.zeros(len(queries), 0, device=self.device)
                answer = CacheAnswer(
                    empty.long(),
                    empty,
                    empty.long(),
                    torch.full((len(queries),), -1, device=self.device),
                    torch.zeros(len(queries), device=self.device),
                )
            else:
                top = torch.topk(self.similarity(queries), min(k, self.size), dim=1)
                slots = top.indices
                answer = CacheAnswer(
                    ids=self.ids[slots],
                    scores=top.values,
                    labels=self.labels[slots],
                    prediction=torch.empty(0),
                    confidence=torch.empty(0),
                )
                answer.prediction, answer.confidence = vote(answer.scores, answer.labels, k)
                self.hits.index_add_(0, slots[:, 0], torch.ones(len(queries), dtype=torch.long, device=self.device))
        answer.from_service = torch.zeros(len(queries), dtype=torch.bool, device=self.device)
        if self.partial and self.client is not None:
            best = (
                answer.scores[:, 0]
                if answer.scores.shape[1]
                else torch.full((len(queries),), float("-inf"), device=self.device)
            )
            remote = torch.nonzero(best < self.spec.similarity_threshold).flatten()
            if len(remote) and answer.scores.shape[1] == k:
                self._answer_remotely(queries, remote, k, answer)
        self.stats.misses += int(answer.from_service.sum())
        self.stats.hits += len(queries) - int(answer.from_service.sum())
        return answer

    def _answer_remotely(self, queries: torch.Tensor, rows: torch.Tensor, k: int, answer: CacheAnswer) -> None:
        client, bank_id = self._service()
        results = client.search(bank_id, queries[rows].cpu().numpy(), k, exact=True)
        for row, result in zip(rows.tolist(), results):
            n = len(result["ids"])
            answer.ids[row, :n] = torch.tensor(result["ids"], device=self.device)
            answer.scores[row, :n] = torch.tensor(result["scores"], device=self.device)
            answer.labels[row, :n] = torch.tensor(
                [NO_LABEL if label is None else label for label in result["labels"]], device=self.device
            )
            answer.prediction[row] = -1 if result["prediction"] is None else result["prediction"]
            answer.confidence[row] = result["confidence"]
            answer.from_service[row] = True

    def _keep_fresh(self) -> None:
        if self.client is None or self._pending or self.stats.staleness <= self.max_staleness:
            return
        self.sync()

    # ---------------------------------------------------------------- writes

    def write(
        self,
        keys: torch.Tensor,
        labels: torch.Tensor | list | None = None,
        values: torch.Tensor | None = None,
        confidences: torch.Tensor | list | None = None,
    ) -> WriteOutcome:
        """Applies the bank's policy to each item at once on the device, and sends the batch behind.

        A partial cache can't see the whole bank, so it sends the items without applying
        them and picks up what the service stored from the change feed.
        """
        keys = keys.detach().to(device=self.device, dtype=torch.float32)
        n = len(keys)
        labels = _as_list(labels, n)
        confidences = _as_list(confidences, n)
        values_list = [None] * n if values is None else list(values.detach().to(self.device, torch.float32))
        self._raise_failure()
        if self.partial and self.client is not None:
            self._send(keys, labels, values_list, confidences, expected=None)
            return WriteOutcome([-1] * n, 0, 0, 0)
        with self._lock:
            outcome, expected = self._apply(keys, labels, values_list, confidences)
            self.stats.writes_local += n
            if self.client is None and outcome.skipped < n:  # device alone: every change is a version
                self.stats.version += 1
                self.stats.known_version = self.stats.version
        if self.client is not None:
            self._send(keys, labels, values_list, confidences, expected=expected)
        return outcome

    def _apply(
        self, keys: torch.Tensor, labels: list, values: list, confidences: list
    ) -> tuple[WriteOutcome, list[int | None]]:
        """Plans the write with the bank's policy, as the service does (eidetic.wire.bank_policy), and applies it here.

        Returns the outcome and, per item, the id the service should report for it.
        """
        n, r = self.size, len(keys)
        version = self.stats.version + 1 + self._pending  # the version the service will give this batch
        batch = Batch(
            labels=encode_labels(labels),
            # as the cache holds them (float32), so the batch's items tie with stored ones as they will here
            confidences=encode_confidences(confidences).astype(np.float32).astype(np.float64),
            orders=(version << 32) + np.arange(r, dtype=np.int64),  # the service's: version, then place in the write
        )
        policy = policy_named(self.spec.policy)
        fits = inserted_until_full(bank_size=n, capacity=self.capacity, batch_size=r)
        if fits < r and policy.replaces:
            tail = keys[fits:]
            bank = BankState(
                labels=self.labels[:n].cpu().numpy(),
                confidences=self.confidences[:n].double().cpu().numpy(),
                orders=self.order[:n].cpu().numpy(),
            )
            similarities = Similarities(
                to_bank=self.similarity(tail).cpu().numpy(), among=self.similarity(tail, keys).cpu().numpy()
            )
            plan = plan_write(
                policy,
                bank,
                batch,
                capacity=self.capacity,
                similarity_threshold=self.spec.similarity_threshold,
                similarities=similarities,
            )
        else:
            plan = WritePlan.until_full(bank_size=n, capacity=self.capacity, batch_size=r)
        return WriteOutcome(plan.slots.tolist(), plan.inserted, plan.replaced, plan.skipped), self._store(
            plan, batch, keys, values
        )

    def _store(self, plan: WritePlan, batch: Batch, keys: torch.Tensor, values: list) -> list[int | None]:
        """Writes the plan's stored items into their slots at once; returns per item the id the service will report."""
        n = plan.bank_size
        provisional = list(range(self._next_provisional, self._next_provisional - plan.inserted, -1))
        self._next_provisional -= plan.inserted
        replaced_slots = [slot for slot, _ in plan.replacements]
        replaced_ids = self.ids[torch.tensor(replaced_slots, dtype=torch.long, device=self.device)].tolist()
        victim_id = dict(zip(replaced_slots, replaced_ids))
        stored = plan.stored
        if len(stored):
            positions = torch.from_numpy(stored).to(self.device)
            slots = torch.from_numpy(plan.slots[stored]).to(self.device)
            self.keys[slots] = keys[positions]
            self.unit_keys[slots] = _unit(keys[positions])
            self.labels[slots] = torch.from_numpy(batch.labels[stored]).to(self.device)
            if self.spec.value_dim:
                zero = torch.zeros(self.spec.value_dim, device=self.device)
                self.values[slots] = torch.stack([zero if values[p] is None else values[p] for p in stored.tolist()])
            self.confidences[slots] = torch.from_numpy(batch.confidences[stored]).to(self.device, torch.float32)
            self.order[slots] = torch.from_numpy(batch.orders[stored]).to(self.device)
            self.hits[slots] = 0
        if provisional:  # a replaced item keeps its id; a new slot gets a provisional one until the service answers
            self.ids[n : n + len(provisional)] = torch.tensor(provisional, dtype=torch.long, device=self.device)
            self._slot_of.update(zip(provisional, range(n, n + len(provisional))))
            self.size = n + len(provisional)
        return [None if s < 0 else provisional[s - n] if s >= n else victim_id[s] for s in plan.slots.tolist()]

    # ---------------------------------------------------------------- write-behind

    def _send(self, keys, labels, values, confidences, expected) -> None:
        items = [
            {
                "key": key.tolist(),
                "label": label,
                "value": None if value is None else value.tolist(),
                "confidence": None if confidence is None else float(confidence),
            }
            for key, label, value, confidence in zip(keys.cpu(), labels, values, confidences)
        ]
        with self._lock:
            self._pending += 1
        self._outbox.put((items, expected))
        if self._sender is None or not self._sender.is_alive():
            self._sender = threading.Thread(target=self._send_loop, name="eidetic-memory-cache", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        while True:
            try:
                items, expected = self._outbox.get(timeout=1.0)
            except queue.Empty:
                return
            try:
                result = self._post_with_retries(items)
                self.stats.writes_sent += len(items)
                self._reconcile(result, expected)
            except Exception as error:  # surfaced on the next write or flush
                self._failure = error
            finally:
                with self._lock:
                    self._pending -= 1
                self._outbox.task_done()

    def _post_with_retries(self, items: list[dict], attempts: int = 5) -> dict:
        client, bank_id = self._service()
        for attempt in range(attempts):
            try:
                return client.write_items(bank_id, items)
            except Exception as error:
                retryable = getattr(error, "retryable", True)
                if not retryable or attempt == attempts - 1:
                    raise
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def _reconcile(self, result: dict, expected: list | None) -> None:
        """Gives provisional items their real ids; if the service decided otherwise, re-warms."""
        with self._lock:
            self.stats.known_version = max(self.stats.known_version, int(result["version"]))
            if expected is None:  # a partial cache: the feed brings what was stored
                self.sync()
                return
            real = result["ids"]
            # a provisional id of an earlier batch may have got its real id since this batch was applied
            expected = [None if e is None else self._resolved.get(e, e) for e in expected]
            agrees = len(real) == len(expected) and all(
                (e is None) == (r is None) and (e is None or e < 0 or e == r) for e, r in zip(expected, real)
            )
            in_step = int(result["version"]) in (self.stats.version, self.stats.version + 1)
            if agrees:
                for provisional, item_id in zip(expected, real):
                    if provisional is not None and provisional < 0 and provisional in self._slot_of:
                        slot = self._slot_of.pop(provisional)
                        self.ids[slot] = item_id
                        self._slot_of[item_id] = slot
                        self._resolved[provisional] = item_id
                if self._pending <= 1:
                    self._resolved.clear()
            if agrees and in_step:
                self.stats.version = int(result["version"])
            elif agrees:
                self.sync()  # another writer changed the bank meanwhile: follow the feed
            else:
                self.warm()

    def flush(self, timeout: float = 60.0) -> None:
        """Waits until every write is acknowledged by the service and the cache is in step."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)
        self._raise_failure()
        if self.client is not None:  # also picks up other writers' changes the cache has not heard of
            self.sync()

    def _service(self) -> tuple[EideticClient, int]:
        """The client and the bank this cache copies (a device-only cache has neither)."""
        if self.client is None or self.spec.id is None:
            raise RuntimeError("this cache is not backed by a bank in the store")
        return self.client, self.spec.id

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


def vote(scores: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The service's similarity-weighted vote, vectorised: weight max(score, 0) per label, confidence = best / k."""
    if labels.numel() == 0:
        return torch.full((len(labels),), -1, dtype=torch.long, device=labels.device), torch.zeros(
            len(labels), device=labels.device
        )
    unique, index = torch.unique(labels, return_inverse=True)
    weights = torch.clamp(scores, min=0)
    tallies = torch.zeros(len(labels), len(unique), device=scores.device).scatter_add_(1, index, weights)
    present = torch.zeros(len(labels), len(unique), dtype=torch.bool, device=scores.device).scatter_(1, index, True)
    present[:, unique == NO_LABEL] = False
    tallies = torch.where(present, tallies, torch.full_like(tallies, float("-inf")))
    best, winner = tallies.max(dim=1)
    has_label = present.any(dim=1)
    prediction = torch.where(has_label, unique[winner], torch.full_like(unique[winner], -1))
    confidence = torch.where(has_label, best / k, torch.zeros_like(best))
    return prediction, confidence


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    norms = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, vectors / norms.clamp_min(1e-30), torch.zeros_like(vectors))


def _as_list(given, n: int) -> list:
    if given is None:
        return [None] * n
    if isinstance(given, torch.Tensor):
        return given.detach().cpu().tolist()
    return list(given)
