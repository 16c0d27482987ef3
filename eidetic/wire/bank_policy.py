"""Memory-bank replacement policies, decided once for the service and the device memories (numpy only).

A write is planned before anything is stored: given the bank's items (label,
confidence, age) and a batch of candidates with their similarities, the plan says
which candidate is inserted, which replaces which stored item, and which is skipped.
The rule, applied to each candidate in order as if written one at a time: insert
while the bank is not full; once full, a candidate is stored only if it is novel (its
best similarity to the bank as it is by then is under the threshold) and it then
replaces the item its policy picks. The service applies a plan under the bank's row
lock; `MemoryCache` and `TrainableMemory` apply it to their device tensors.

A missing label is `NO_LABEL` (it matches no real label, only other missing labels);
a missing confidence is -inf (the least confident of all).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = [
    "NO_CONFIDENCE",
    "NO_LABEL",
    "POLICIES",
    "BankPolicy",
    "BankState",
    "Batch",
    "Fifo",
    "LeastConfident",
    "NoReplacement",
    "SameClassLowestSimilarity",
    "Similarities",
    "WritePlan",
    "encode_confidences",
    "encode_labels",
    "inserted_until_full",
    "plan_write",
    "policy_named",
    "similarity_matrix",
]

NO_LABEL = int(np.iinfo(np.int64).min)  # stands for a missing label; matches no real label
NO_CONFIDENCE = float("-inf")  # a missing confidence: less confident than any given one


def encode_labels(labels: Sequence[int | None] | np.ndarray) -> np.ndarray:
    """int64 labels with `NO_LABEL` for a missing one."""
    if isinstance(labels, np.ndarray) and labels.dtype != object:
        return labels.astype(np.int64, copy=False)
    return np.array([NO_LABEL if label is None else int(label) for label in labels], dtype=np.int64)


def encode_confidences(confidences: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """float64 confidences with `NO_CONFIDENCE` (-inf) for a missing one."""
    if isinstance(confidences, np.ndarray) and confidences.dtype != object:
        return confidences.astype(np.float64, copy=False)
    return np.array([NO_CONFIDENCE if c is None else float(c) for c in confidences], dtype=np.float64)


@dataclass
class BankState:
    """Per stored item, in the caller's slot order: its label, confidence, and age (`orders`, older first).

    Ties between items are broken by slot order (the first slot wins), so the service,
    which orders its items by id, and a cache, which orders them by slot, each get the
    answer their order implies.
    """

    labels: np.ndarray  # int64, NO_LABEL where missing
    confidences: np.ndarray  # float64, NO_CONFIDENCE where missing
    orders: np.ndarray  # int64, older first

    @property
    def size(self) -> int:
        return len(self.labels)

    def copy(self) -> BankState:
        return BankState(self.labels.copy(), self.confidences.copy(), self.orders.copy())


@dataclass(frozen=True)
class Batch:
    """The candidates of one write, in the order they are written; `orders` must be newer than every stored item's."""

    labels: np.ndarray
    confidences: np.ndarray
    orders: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Similarities:
    """Similarities of the candidates that meet a full bank (the batch from `inserted_until_full` on).

    `to_bank`: (those candidates x stored items), `among`: (those candidates x the whole
    batch). Higher is more similar, as `similarity_matrix` defines it for each metric.
    """

    to_bank: np.ndarray
    among: np.ndarray


# ---------------------------------------------------------------- policies


class BankPolicy(ABC):
    """Which stored item a novel candidate replaces once the bank is full."""

    name: ClassVar[str]
    replaces: ClassVar[bool] = True  # False: a full bank stores nothing more

    @abstractmethod
    def victim(self, bank: BankState, similarity: np.ndarray, label: int) -> int:
        """The slot the candidate replaces; `similarity` is its similarity to each slot."""


class NoReplacement(BankPolicy):
    """Insert until full, then skip: a bank of the first items."""

    name = "none"
    replaces = False

    def victim(self, bank: BankState, similarity: np.ndarray, label: int) -> int:
        raise ValueError("policy 'none' never replaces an item")


class Fifo(BankPolicy):
    """The oldest item goes."""

    name = "fifo"

    def victim(self, bank: BankState, similarity: np.ndarray, label: int) -> int:
        return int(np.argmin(bank.orders))


class LeastConfident(BankPolicy):
    """The least confident item goes, the oldest among equals (trainable memory)."""

    name = "least_confident"

    def victim(self, bank: BankState, similarity: np.ndarray, label: int) -> int:
        lowest = np.flatnonzero(bank.confidences == bank.confidences.min())
        return int(lowest[np.argmin(bank.orders[lowest])])


class SameClassLowestSimilarity(BankPolicy):
    """The item of the candidate's class least similar to it goes, else the least similar overall (cached memory)."""

    name = "same_class_lowest_similarity"

    def victim(self, bank: BankState, similarity: np.ndarray, label: int) -> int:
        same = np.flatnonzero(bank.labels == label)
        if len(same):
            return int(same[np.argmin(similarity[same])])
        return int(np.argmin(similarity))


POLICIES: dict[str, BankPolicy] = {
    policy.name: policy for policy in (NoReplacement(), Fifo(), SameClassLowestSimilarity(), LeastConfident())
}


def policy_named(name: str) -> BankPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown bank policy {name!r}; known: {', '.join(POLICIES)}") from None


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class WritePlan:
    """Where each candidate of a batch ends up.

    `slots[p]` is the slot candidate p is stored in when the write is done, or -1 if it
    is not stored (skipped, or stored and replaced again by a later candidate of the
    same batch). Slots below `bank_size` held items before the write (the candidate
    replaces that item); from `bank_size` on they are new, the k-th insert in slot
    `bank_size + k`. Counts follow from that: a candidate that takes the slot of an
    earlier insert of its own batch counts as inserted, the one it displaced as skipped.
    """

    slots: np.ndarray  # int64, one per candidate
    bank_size: int

    @classmethod
    def until_full(cls, *, bank_size: int, capacity: int, batch_size: int) -> WritePlan:
        """The plan when no candidate can replace anything: insert while there is room, skip the rest."""
        fits = inserted_until_full(bank_size=bank_size, capacity=capacity, batch_size=batch_size)
        slots = np.full(batch_size, -1, dtype=np.int64)
        slots[:fits] = np.arange(bank_size, bank_size + fits)
        return cls(slots, bank_size)

    @property
    def stored(self) -> np.ndarray:
        """Positions of the candidates stored when the write is done, in batch order."""
        return np.flatnonzero(self.slots >= 0)

    @property
    def inserts(self) -> np.ndarray:
        """Positions of the candidates in the new slots, in slot order (the k-th holds slot bank_size + k)."""
        new = np.flatnonzero(self.slots >= self.bank_size)
        return new[np.argsort(self.slots[new])]

    @property
    def replacements(self) -> list[tuple[int, int]]:
        """(slot, position) for each stored item replaced by a candidate, in batch order."""
        positions = np.flatnonzero((self.slots >= 0) & (self.slots < self.bank_size))
        return [(int(self.slots[p]), int(p)) for p in positions]

    @property
    def inserted(self) -> int:
        return int((self.slots >= self.bank_size).sum())

    @property
    def replaced(self) -> int:
        return int(((self.slots >= 0) & (self.slots < self.bank_size)).sum())

    @property
    def skipped(self) -> int:
        return len(self.slots) - self.inserted - self.replaced


def inserted_until_full(*, bank_size: int, capacity: int, batch_size: int) -> int:
    """How many candidates of a batch are inserted before the bank is full (those meet no novelty test)."""
    return max(0, min(batch_size, capacity - bank_size))


def plan_write(
    policy: BankPolicy | str,
    bank: BankState,
    batch: Batch,
    *,
    capacity: int,
    similarity_threshold: float,
    similarities: Similarities | None,
) -> WritePlan:
    """The plan of one write: each candidate in order, as if written one at a time.

    `similarities` may be None when no candidate meets a full bank, or the policy never
    replaces. Victims that depend on age and confidence alone (fifo; least confident
    with one confidence for the whole batch) are planned for the batch at once.
    """
    policy = policy_named(policy) if isinstance(policy, str) else policy
    fits = inserted_until_full(bank_size=bank.size, capacity=capacity, batch_size=len(batch))
    if fits == len(batch) or not policy.replaces:
        return WritePlan.until_full(bank_size=bank.size, capacity=capacity, batch_size=len(batch))
    if similarities is None:
        raise ValueError("a write that meets a full bank needs the candidates' similarities")
    rest = len(batch) - fits
    if similarities.to_bank.shape != (rest, bank.size) or similarities.among.shape != (rest, len(batch)):
        raise ValueError(
            f"similarities of {rest} candidates to {bank.size} items and {len(batch)} candidates expected, got "
            f"{similarities.to_bank.shape} and {similarities.among.shape}"
        )
    # The bank once the first `fits` candidates are in: stored items, then those inserts.
    full = BankState(
        labels=np.concatenate([bank.labels, batch.labels[:fits]]),
        confidences=np.concatenate([bank.confidences, batch.confidences[:fits]]),
        orders=np.concatenate([bank.orders, batch.orders[:fits]]),
    )
    to_slots = np.concatenate([similarities.to_bank, similarities.among[:, :fits]], axis=1)
    tail = Batch(batch.labels[fits:], batch.confidences[fits:], batch.orders[fits:])
    among = similarities.among[:, fits:]
    if _victims_ignore_keys(policy, tail):
        holders = _plan_by_schedule(policy, full, tail, to_slots, among, similarity_threshold)
    else:
        holders = _plan_one_at_a_time(policy, full, tail, to_slots, among, similarity_threshold)
    slots = np.full(len(batch), -1, dtype=np.int64)
    slots[:fits] = np.arange(bank.size, bank.size + fits)
    for slot, holder in enumerate(holders):  # holder: position in the tail that ends in the slot, or -1
        if holder >= 0:
            if slot >= bank.size:  # an insert of this batch, replaced again
                slots[slot - bank.size] = -1
            slots[fits + holder] = slot
    return WritePlan(slots, bank.size)


def _plan_one_at_a_time(
    policy: BankPolicy,
    bank: BankState,
    tail: Batch,
    to_slots: np.ndarray,
    among: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """Per slot of a full bank, the candidate of the tail that ends in it (-1: untouched); the rule itself."""
    state = bank.copy()
    current = np.array(to_slots, copy=True)  # column v: each candidate's similarity to what slot v holds now
    holders = np.full(state.size, -1, dtype=np.int64)
    for t in range(len(tail)):
        similarity = current[t]
        if similarity.max() >= threshold:
            continue
        victim = policy.victim(state, similarity, int(tail.labels[t]))
        state.labels[victim] = tail.labels[t]
        state.confidences[victim] = tail.confidences[t]
        state.orders[victim] = tail.orders[t]
        current[:, victim] = among[:, t]
        holders[victim] = t
    return holders


def _victims_ignore_keys(policy: BankPolicy, tail: Batch) -> bool:
    """Fifo, and least confident when the whole batch has one confidence: victims follow a fixed schedule."""
    if isinstance(policy, Fifo):
        return True
    return isinstance(policy, LeastConfident) and bool(np.all(tail.confidences == tail.confidences[0]))


def _plan_by_schedule(
    policy: BankPolicy,
    bank: BankState,
    tail: Batch,
    to_slots: np.ndarray,
    among: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """`_plan_one_at_a_time` for victims that do not depend on keys, decided for the whole tail at once.

    The candidates share one confidence c and are newer than every slot, so the victims
    are the slots in (confidence, age) order while their confidence is at most c (`cycle`
    of them, at least one; every slot under fifo), then the batch's own items in those
    slots, oldest first. Only novelty is left, and candidate t's novelty depends on the
    decisions for the candidates before it alone, so iterating the decision for every
    candidate from a guess is exact after at most len + 1 rounds (in practice two or three).
    """
    r = len(tail)
    if isinstance(policy, Fifo):
        schedule = np.argsort(bank.orders, kind="stable")
        cycle = bank.size
    else:
        by_age = np.argsort(bank.orders, kind="stable")
        schedule = by_age[np.argsort(bank.confidences[by_age], kind="stable")]
        cycle = max(1, int((bank.confidences <= tail.confidences[0]).sum()))
    # remaining_best[t, p]: best similarity to the slots still there once the first p in the schedule are
    # replaced (suffix maxima). At most min(cycle, r) are replaced before any candidate, so only those p are
    # needed: the scheduled head's columns, and one maximum over all the others.
    head = schedule[: min(cycle, r)]
    others = to_slots.copy()
    others[:, head] = -np.inf
    columns = [to_slots[:, head], others.max(axis=1, keepdims=True)]
    remaining_best = np.maximum.accumulate(np.concatenate(columns, axis=1)[:, ::-1], axis=1)[:, ::-1]
    earlier = np.tril(np.ones((r, r), dtype=bool), -1)  # [t, s]: s comes before t
    accepted = remaining_best[:, 0] < threshold  # first guess: the bank as it was, the batch ignored
    for _ in range(r + 1):
        before: np.ndarray = np.cumsum(accepted) - accepted  # candidates stored before t
        best_slot = remaining_best[np.arange(r), np.minimum(before, cycle)]
        # the batch's stored candidates still in the bank at t: the last `cycle` of those before it
        present = earlier & accepted[None, :] & ((before + 1)[None, :] > (before - cycle)[:, None])
        best_batch = np.where(present, among, -np.inf).max(axis=1, initial=-np.inf)
        decided = np.maximum(best_slot, best_batch) < threshold
        if np.array_equal(decided, accepted):
            break
        accepted = decided
    positions = np.flatnonzero(accepted)
    rank = np.arange(len(positions))
    kept = rank >= len(positions) - cycle  # an earlier one in the same slot was replaced again
    holders = np.full(bank.size, -1, dtype=np.int64)
    holders[schedule[rank[kept] % cycle]] = positions[kept]
    return holders


# ---------------------------------------------------------------- similarity


def similarity_matrix(metric: str, queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(queries x keys) similarities, higher is more similar: cosine, inner product, or 1/(1 + L2 distance).

    Under cosine a zero vector is at similarity 0 (pgvector puts it at distance NaN).
    """
    queries = np.atleast_2d(queries)
    if metric == "cosine":
        norms = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(keys, axis=1)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            cosine = (queries @ keys.T) / norms
        return np.where(norms > 0, cosine, 0.0).astype(cosine.dtype, copy=False)
    if metric == "ip":
        return queries @ keys.T
    if metric == "l2":  # row by row: the expanded form |q|^2 + |k|^2 - 2 q.k loses near duplicates to rounding
        distances = np.empty((len(queries), len(keys)), dtype=np.result_type(queries, keys))
        for i, query in enumerate(queries):
            distances[i] = np.linalg.norm(keys - query, axis=1)
        return 1.0 / (1.0 + distances)
    raise ValueError(f"unknown metric {metric!r}")
