"""Cached and trainable memory for a classifier's features (seed 001), vectorised, optionally kept in the store.

- `CachedMemory` stores feature vectors and labels as they come (no parameters) in a
  `MemoryCache` under the bank policy `same_class_lowest_similarity`: insert until full,
  then a novel item (best cosine similarity under the threshold) replaces the
  lowest-similarity item of its class, else the lowest-similarity item overall. With a
  store it is backed by the bank of that name (found, or created) and every write is also
  sent behind to it; without one the device cache is the whole memory. The policy runs on
  the device either way, so a run gives the same results with the store or without.
- `TrainableMemory` holds learnable keys (M x feature_dim) and class-value logits
  (M x classes). A slot's label is the argmax of its value and its confidence that
  class's probability. When full, a novel item replaces the least confident slot (the
  oldest among equals): the bank policy `least_confident`, decided for a whole batch at
  once. With a store its slots are saved after each epoch as a bank generation
  `NAME@EPOCH` and restored from the newest one on start, so training can resume.

Both answer `retrieve` (the nearest item by cosine similarity: its label, and the
similarity as confidence, as the service's k=1 vote) and `memory_loss` (a supervised
contrastive loss of the batch against the memory and itself).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eidetic.client import EideticAPIError, EideticClient
from eidetic.torch.memory_cache import BankSpec, MemoryCache, WriteOutcome
from eidetic.wire.bank_policy import BankState, Batch, Similarities, WritePlan, inserted_until_full, plan_write

NO_PREDICTION = -1  # the memory's prediction where it holds nothing


@dataclass
class MemoryReadout:
    """The nearest stored item of each query: its label (-1 if the memory is empty) and its similarity, at least 0."""

    prediction: torch.Tensor
    confidence: torch.Tensor


@dataclass(frozen=True)
class MemoryStore:
    """Where a memory lives in the Eidetic store: a client, and the bank's name (trainable memory: the
    generations' prefix)."""

    client: EideticClient
    bank_name: str


class BankMismatch(ValueError):
    """A bank of that name exists with another shape or policy than the memory needs."""


# ---------------------------------------------------------------- the loss


def memory_contrastive_loss(
    queries: torch.Tensor,
    labels: torch.Tensor,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Contrastive loss of each query against the memory and the batch: -log of the softmax mass on its positives.

    The candidates of a query are the memory's keys and the other queries; its positives
    are those of its class, its negatives the rest, all by cosine similarity over
    `temperature` (the seed's loss, over the batch too: SupCon's L_in, Khosla et al. 2020).
    A query with no positive at all (its class has a single sample in the batch and none
    in the memory) takes itself as its positive, as SupCon's second view would be, so it
    still pushes away from the other classes: the loss stays finite (no 0/0), and every
    query gets a gradient whenever there is anything to contrast it with.
    """
    n = len(queries)
    if n == 0:
        return queries.sum() * 0.0
    unit = F.normalize(queries, dim=1)
    candidates = torch.cat([F.normalize(keys.to(unit.dtype), dim=1), unit])
    candidate_labels = torch.cat([key_labels.to(labels.device, torch.long), labels.long()])
    logits = unit @ candidates.T / temperature  # (n, m + n)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[:, len(keys) :] = torch.eye(n, dtype=torch.bool, device=logits.device)
    positive = (labels.long()[:, None] == candidate_labels[None, :]) & ~is_self
    lonely = ~positive.any(dim=1)
    positive |= is_self & lonely[:, None]
    allowed = ~is_self | lonely[:, None]
    log_all = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=1)
    log_positive = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (log_all - log_positive).mean()


# ---------------------------------------------------------------- cached memory


class CachedMemory(nn.Module):
    """Stored features and labels (no parameters) in a device `MemoryCache`, backed by a bank when given a store."""

    policy = "same_class_lowest_similarity"

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        memory_size: int = 10_000,
        *,
        similarity_threshold: float = 0.85,
        temperature: float = 0.1,
        device: torch.device | str = "cpu",
        store: MemoryStore | None = None,
    ) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.capacity = memory_size
        self.temperature = temperature
        self.similarity_threshold = similarity_threshold
        self.store = store
        spec = BankSpec(
            dim=feature_dim,
            capacity=memory_size,
            metric="cosine",
            policy=self.policy,
            similarity_threshold=similarity_threshold,
        )
        if store is None:
            self.cache = MemoryCache(spec, device)
            self.bank_id: int | None = None
        else:
            bank = open_bank(store.client, store.bank_name, spec)
            self.bank_id = int(bank["id"])
            self.cache = MemoryCache.from_service(store.client, self.bank_id, device)

    @property
    def size(self) -> int:
        return self.cache.size

    def retrieve(self, features: torch.Tensor) -> MemoryReadout:
        """Nearest stored item of each feature vector, through the device cache (k=1)."""
        answer = self.cache.search(features, k=1)
        return MemoryReadout(answer.prediction.long(), answer.confidence)

    def memory_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.cache.size
        return memory_contrastive_loss(features, labels, self.cache.keys[:n], self.cache.labels[:n], self.temperature)

    def write(self, features: torch.Tensor, labels: torch.Tensor) -> WriteOutcome:
        """Applies the policy at once on the device (and sends the batch behind to the bank, with a store)."""
        return self.cache.write(features.detach(), labels.detach().cpu().tolist())

    def end_epoch(self, epoch: int) -> None:
        """Waits until the bank has every write (with a store); the cache is then in step with it."""
        self.cache.flush()

    def stored_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and labels in slot order (for a checkpoint when no store keeps them)."""
        n = self.cache.size
        return self.cache.keys[:n].clone(), self.cache.labels[:n].clone()

    def load_items(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Fills an empty memory with saved items, in their slots (as written into an empty bank: all inserted)."""
        if self.cache.size:
            raise RuntimeError("load_items needs an empty memory")
        if len(keys) > self.capacity:
            raise ValueError(f"{len(keys)} items do not fit a memory of {self.capacity}")
        if len(keys):
            self.cache.write(keys, labels.cpu().tolist())


# ---------------------------------------------------------------- trainable memory


class TrainableMemory(nn.Module):
    """Learnable keys and value logits; least-confident replacement of novel items once full."""

    policy = "least_confident"
    filled: torch.Tensor  # buffers (registered in __init__): used slots, each slot's age, the next age
    order: torch.Tensor
    next_order: torch.Tensor

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        memory_size: int = 10_000,
        *,
        similarity_threshold: float = 0.85,
        temperature: float = 0.1,
        written_confidence: float = 0.9,
        device: torch.device | str | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("a memory of class values needs at least two classes")
        if not 1.0 / num_classes < written_confidence < 1.0:
            raise ValueError(f"written_confidence must lie in (1/{num_classes}, 1)")
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.capacity = memory_size
        self.temperature = temperature
        self.similarity_threshold = similarity_threshold
        self.keys = nn.Parameter(torch.zeros(memory_size, feature_dim, device=device))
        self.values = nn.Parameter(torch.zeros(memory_size, num_classes, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("order", torch.zeros(memory_size, dtype=torch.long, device=device))  # older first
        self.register_buffer("next_order", torch.zeros((), dtype=torch.long, device=device))
        # A written item's value: this logit for its class, 0 for the others, so its probability is written_confidence.
        self.value_logit = math.log(written_confidence * (num_classes - 1) / (1.0 - written_confidence))
        self.store = store
        self.restored_epoch: int | None = None
        self._unit_keys_of: tuple | None = None
        self._unit_keys: torch.Tensor | None = None
        if store is not None:
            self.restore()

    # ------------------------------------------------------------ what the slots hold

    @property
    def size(self) -> int:
        return int(self.filled)

    @staticmethod
    def _confidence_and_label(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Max class probability and its class. The softmax runs over each row sorted, so its rounding does not
        depend on where the class sits: equal rows up to the class's place tie exactly, as the policy needs."""
        ranked, classes = values.detach().float().sort(dim=1, descending=True, stable=True)
        return torch.softmax(ranked, dim=1)[:, 0], classes[:, 0]

    def slot_confidences(self) -> torch.Tensor:
        """Per used slot: the probability of its class (the max of its value's softmax)."""
        return self._confidence_and_label(self.values[: self.size])[0]

    def slot_labels(self) -> torch.Tensor:
        return self._confidence_and_label(self.values[: self.size])[1]

    @property
    def written_confidence(self) -> torch.Tensor:
        """The confidence of a freshly written slot, computed as a slot's is (so ties are exact)."""
        row = torch.zeros(1, self.num_classes, device=self.values.device)
        row[0, 0] = self.value_logit
        return self._confidence_and_label(row)[0][0]

    def unit_keys(self, n: int | None = None) -> torch.Tensor:
        """Normalised keys of the used slots, recomputed only when the keys have changed (an optimizer step,
        a write)."""
        n = self.size if n is None else n
        stamp = (self.keys._version, self.keys.data_ptr(), n)
        if self._unit_keys is None or self._unit_keys_of != stamp:
            with torch.no_grad():
                self._unit_keys = F.normalize(self.keys[:n].detach().float(), dim=1)
            self._unit_keys_of = stamp
        return self._unit_keys

    # ------------------------------------------------------------ reading

    @torch.no_grad()
    def retrieve(self, features: torch.Tensor) -> MemoryReadout:
        """Nearest slot of each feature vector by cosine similarity: its class and the similarity."""
        n = self.size
        if n == 0:
            return _empty_readout(len(features), features.device)
        best, slot = (F.normalize(features.float(), dim=1) @ self.unit_keys(n).T).max(dim=1)
        return MemoryReadout(self.values[slot].argmax(dim=1), best.clamp_min(0.0))

    def memory_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Contrastive loss against the slots (trains keys and features), plus the read-out's NLL (trains values).

        The read-out is attention over the slots (softmax of similarity / temperature)
        applied to the slots' class probabilities: the memory's differentiable prediction.
        """
        n = self.size
        keys, values = self.keys[:n], self.values[:n]
        contrast = memory_contrastive_loss(features, labels, keys, values.detach().argmax(dim=1), self.temperature)
        if n == 0:
            return contrast
        attention = torch.softmax(F.normalize(features, dim=1) @ F.normalize(keys, dim=1).T / self.temperature, dim=1)
        read = attention @ torch.softmax(values, dim=1)
        return contrast + F.nll_loss(torch.log(read.clamp_min(1e-12)), labels)

    # ------------------------------------------------------------ writing

    @torch.no_grad()
    def write(self, features: torch.Tensor, labels: torch.Tensor) -> WriteOutcome:
        """Inserts until full; then each novel item replaces the least confident slot, as if written one at a time.

        The bank policy planner (eidetic.wire.bank_policy) decides, as it does for the
        service: every written item has the same confidence and is newer than every slot,
        so it plans the whole batch at once. Counts follow the service's: an item that
        takes a slot filled earlier in this same batch counts as inserted, the item it
        displaced as skipped.
        """
        keys = features.detach().to(self.keys.device, self.keys.dtype)
        labels = labels.detach().to(self.keys.device, torch.long)
        n, r = self.size, len(keys)
        first_order = int(self.next_order)
        batch = Batch(
            labels=labels.cpu().numpy(),
            confidences=np.full(r, float(self.written_confidence)),
            orders=first_order + np.arange(r, dtype=np.int64),
        )
        fits = inserted_until_full(bank_size=n, capacity=self.capacity, batch_size=r)
        if fits < r:
            tail = F.normalize(keys[fits:].float(), dim=1)
            confidence, label = self._confidence_and_label(self.values[:n])
            plan = plan_write(
                self.policy,
                BankState(
                    labels=label.cpu().numpy(),
                    confidences=confidence.double().cpu().numpy(),
                    orders=self.order[:n].cpu().numpy(),
                ),
                batch,
                capacity=self.capacity,
                similarity_threshold=self.similarity_threshold,
                similarities=Similarities(
                    to_bank=(tail @ self.unit_keys(n).T).cpu().numpy(),
                    among=(tail @ F.normalize(keys.float(), dim=1).T).cpu().numpy(),
                ),
            )
        else:
            plan = WritePlan.until_full(bank_size=n, capacity=self.capacity, batch_size=r)
        stored = torch.from_numpy(plan.stored).to(keys.device)
        if len(stored):
            slots = torch.from_numpy(plan.slots[plan.stored]).to(keys.device)
            self._put(slots, keys[stored], labels[stored], first_order + stored)
        self.filled += plan.inserted
        self.next_order += r
        return WriteOutcome(plan.slots.tolist(), plan.inserted, plan.replaced, plan.skipped)

    def _put(self, slots: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, orders: torch.Tensor) -> None:
        self.keys[slots] = keys
        self.values[slots] = F.one_hot(labels, self.num_classes).to(self.values.dtype) * self.value_logit
        self.order[slots] = orders

    # ------------------------------------------------------------ the store: a generation per epoch

    def persist(self, epoch: int) -> torch.Tensor:
        """Saves the used slots as bank `NAME@EPOCH` (policy least_confident) and drops the other generations.

        One atomic write, oldest slot first, so the bank's insertion order is the memory's
        and a generation with items is complete; the older ones go only after it is.
        Returns the slots in the order written (restore(slots=...) puts them back there).
        """
        store = self._require_store()
        n = self.size
        slots = torch.argsort(self.order[:n], stable=True)
        name = generation_name(store.bank_name, epoch)
        generations = self.generations()
        if epoch in generations:  # this epoch again (a resumed run): replace it
            store.client.delete_bank(generations.pop(epoch)["id"])
        bank = store.client.create_bank(
            name,
            self.feature_dim,
            self.capacity,
            metric="cosine",
            policy=self.policy,
            similarity_threshold=self.similarity_threshold,
            value_dim=self.num_classes,
        )
        if n:
            keys = self.keys[slots].detach().float().cpu()
            values = self.values[slots].detach().float().cpu()
            confidence, label = self._confidence_and_label(values)
            items = [
                {"key": k, "label": item_label, "value": v, "confidence": c}
                for k, item_label, v, c in zip(keys.numpy(), label.tolist(), values.tolist(), confidence.tolist())
            ]
            result = store.client.write_items(bank["id"], items)
            if result["inserted"] != n:
                raise RuntimeError(f"bank {name!r} stored {result['inserted']} of {n} slots")
        for other in generations.values():
            store.client.delete_bank(other["id"])
        return slots

    def restore(self, epoch: int | None = None, slots: torch.Tensor | None = None) -> int | None:
        """Loads the newest generation with items (or the given epoch's); returns its epoch, None if there is none.

        `slots` puts the i-th stored item (oldest first) in slot slots[i], as persist()
        returned them, so parameters line up with an optimizer state saved beside them.
        """
        store = self._require_store()
        generations = {e: bank for e, bank in self.generations().items() if bank["size"] > 0}
        if epoch is not None and epoch not in generations:
            raise LookupError(f"no saved generation {generation_name(store.bank_name, epoch)!r}")
        if not generations:
            self.restored_epoch = None
            return None
        epoch = max(generations) if epoch is None else epoch
        bank = generations[epoch]
        _check_bank(
            bank,
            BankSpec(
                self.feature_dim, self.capacity, "cosine", self.policy, self.similarity_threshold, self.num_classes
            ),
        )
        saved = MemoryCache.from_service(store.client, int(bank["id"]), self.keys.device)
        n = saved.size
        oldest_first = torch.argsort(saved.order[:n], stable=True)
        slots = torch.arange(n, device=self.keys.device) if slots is None else slots.to(self.keys.device)
        if len(slots) != n:
            raise ValueError(f"generation {epoch} holds {n} items, {len(slots)} slots were given")
        with torch.no_grad():
            self.keys.zero_()
            self.values.zero_()
            self.keys[slots] = saved.keys[oldest_first].to(self.keys.dtype)
            self.values[slots] = saved.values[oldest_first].to(self.values.dtype)
            self.order.zero_()
            self.order[slots] = torch.arange(n, device=self.order.device)
            self.filled.fill_(n)
            self.next_order.fill_(n)
        self.restored_epoch = epoch
        return epoch

    def end_epoch(self, epoch: int) -> torch.Tensor | None:
        """With a store: persist(epoch); returns the slots in the order written."""
        return self.persist(epoch) if self.store is not None else None

    def generations(self) -> dict[int, dict]:
        """This memory's saved generations in the store: epoch -> bank."""
        store = self._require_store()
        pattern = re.compile(re.escape(store.bank_name) + r"@(\d+)")
        found = {}
        for bank in store.client.list_banks():
            match = pattern.fullmatch(bank["name"])
            if match:
                found[int(match.group(1))] = bank
        return found

    def _require_store(self) -> MemoryStore:
        if self.store is None:
            raise RuntimeError("this memory has no store")
        return self.store


# ---------------------------------------------------------------- banks


def generation_name(bank_name: str, epoch: int) -> str:
    return f"{bank_name}@{epoch}"


def open_bank(client: EideticClient, name: str, spec: BankSpec) -> dict:
    """The bank of that name, created with the spec if there is none; a bank that differs from the spec is an error."""
    bank = client.find_bank(name)
    if bank is None:
        options = {"metric": spec.metric, "policy": spec.policy, "similarity_threshold": spec.similarity_threshold}
        if spec.value_dim:
            options["value_dim"] = spec.value_dim
        try:
            bank = client.create_bank(name, spec.dim, spec.capacity, **options)
        except EideticAPIError as error:
            if error.code != "conflict":  # created meanwhile by another worker: use it
                raise
            bank = client.find_bank(name)
            if bank is None:
                raise LookupError(f"bank {name!r} was said to exist and then was not found") from error
    _check_bank(bank, spec)
    return bank


def _check_bank(bank: dict, spec: BankSpec) -> None:
    wanted = {
        "dim": spec.dim,
        "capacity": spec.capacity,
        "metric": spec.metric,
        "policy": spec.policy,
        "value_dim": spec.value_dim,
    }
    differs = {name: (bank[name], value) for name, value in wanted.items() if bank[name] != value}
    if not math.isclose(bank["similarity_threshold"], spec.similarity_threshold, rel_tol=1e-6):
        differs["similarity_threshold"] = (bank["similarity_threshold"], spec.similarity_threshold)
    if differs:
        detail = ", ".join(f"{name} {have!r} (wanted {want!r})" for name, (have, want) in differs.items())
        raise BankMismatch(f"bank {bank['name']!r} exists with {detail}")


def _empty_readout(n: int, device: torch.device) -> MemoryReadout:
    return MemoryReadout(
        torch.full((n,), NO_PREDICTION, dtype=torch.long, device=device), torch.zeros(n, device=device)
    )
