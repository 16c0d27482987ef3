"""The bank policy planner alone (no database): the one-at-a-time rule, and the batch-at-once plans equal to it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eidetic.wire.bank_policy import (
    NO_CONFIDENCE,
    NO_LABEL,
    POLICIES,
    BankState,
    Batch,
    LeastConfident,
    Similarities,
    WritePlan,
    _plan_one_at_a_time,
    encode_confidences,
    encode_labels,
    inserted_until_full,
    plan_write,
    similarity_matrix,
)

# ---------------------------------------------------------------- a write, and the rule written plainly


@dataclass
class Write:
    """A bank (keys, labels, confidences, ages) and a batch of candidates, with every pairwise similarity."""

    policy: str
    capacity: int
    threshold: float
    bank_labels: list[int | None]
    bank_confidences: list[float | None]
    bank_orders: list[int]
    labels: list[int | None]
    confidences: list[float | None]
    similarity: np.ndarray  # (bank + batch) x (bank + batch)

    @property
    def n(self) -> int:
        return len(self.bank_labels)

    @property
    def r(self) -> int:
        return len(self.labels)

    def orders(self) -> np.ndarray:
        return max(self.bank_orders, default=0) + 1 + np.arange(self.r)

    def plan(self) -> WritePlan:
        fits = inserted_until_full(bank_size=self.n, capacity=self.capacity, batch_size=self.r)
        rows = self.n + np.arange(fits, self.r)
        similarities = Similarities(
            to_bank=self.similarity[np.ix_(rows, np.arange(self.n))],
            among=self.similarity[np.ix_(rows, self.n + np.arange(self.r))],
        )
        return plan_write(
            self.policy,
            self.bank(),
            self.batch(),
            capacity=self.capacity,
            similarity_threshold=self.threshold,
            similarities=similarities,
        )

    def bank(self) -> BankState:
        return BankState(
            encode_labels(self.bank_labels),
            encode_confidences(self.bank_confidences),
            np.array(self.bank_orders, dtype=np.int64),
        )

    def batch(self) -> Batch:
        return Batch(encode_labels(self.labels), encode_confidences(self.confidences), self.orders())

    def one_at_a_time(self) -> tuple[list[int], list[list[int]]]:
        """The rule itself: per candidate its final slot (-1 if not stored), and each candidate's view of the
        bank when it came (which vector every slot held)."""
        holders = list(range(self.n))  # slot -> vector index (bank items first, then candidates)
        label = [*self.bank_labels, *self.labels]
        confidence = [NO_CONFIDENCE if c is None else c for c in [*self.bank_confidences, *self.confidences]]
        order = [*self.bank_orders, *self.orders().tolist()]
        views = []
        for p in range(self.r):
            vector = self.n + p
            views.append(list(holders))
            if len(holders) < self.capacity:
                holders.append(vector)
                continue
            if self.policy == "none":
                continue
            similarity = [float(self.similarity[vector, h]) for h in holders]
            if max(similarity) >= self.threshold:
                continue
            slots = range(len(holders))
            if self.policy == "fifo":
                victim = min(slots, key=lambda s: (order[holders[s]], s))
            elif self.policy == "least_confident":
                victim = min(slots, key=lambda s: (confidence[holders[s]], order[holders[s]], s))
            else:
                same = [s for s in slots if label[holders[s]] == label[vector]]
                victim = min(same or slots, key=lambda s: (similarity[s], s))
            holders[victim] = vector
        final = [-1] * self.r
        for slot, vector in enumerate(holders):
            if vector >= self.n:
                final[vector - self.n] = slot
        return final, views


@st.composite
def writes(draw, policies=tuple(POLICIES), one_confidence: bool = False) -> Write:
    """Clustered keys (so full banks see familiar and novel candidates), labels and confidences with ties."""
    policy = draw(st.sampled_from(policies))
    capacity = draw(st.integers(1, 8))
    n = draw(st.integers(0, capacity))
    r = draw(st.integers(1, 14))
    seed = draw(st.integers(0, 2**32 - 1))
    metric = draw(st.sampled_from(["cosine", "l2", "ip"]))
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 5))
    centres = rng.standard_normal((3, dim))
    keys = centres[rng.integers(0, 3, n + r)] + draw(st.floats(0.05, 1.5)) * rng.standard_normal((n + r, dim))
    similarity = similarity_matrix(metric, keys, keys)
    threshold = float(np.quantile(similarity, draw(st.floats(0.05, 1.0))))
    label_of = st.one_of(st.none(), st.integers(0, 2))
    confidence_of = st.sampled_from([None, 0.1, 0.5, 0.9])
    batch_confidence = draw(confidence_of)
    return Write(
        policy=policy,
        capacity=capacity,
        threshold=threshold,
        bank_labels=draw(st.lists(label_of, min_size=n, max_size=n)),
        bank_confidences=draw(st.lists(confidence_of, min_size=n, max_size=n)),
        bank_orders=draw(st.permutations(range(n))),
        labels=draw(st.lists(label_of, min_size=r, max_size=r)),
        confidences=[batch_confidence] * r if one_confidence else draw(st.lists(confidence_of, min_size=r, max_size=r)),
        similarity=similarity,
    )


# ---------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(write=writes())
def test_the_plan_is_the_one_at_a_time_rule(write):
    final, _ = write.one_at_a_time()
    assert write.plan().slots.tolist() == final


@settings(max_examples=200, deadline=None)
@given(write=writes(policies=("fifo", "least_confident"), one_confidence=True))
def test_the_batch_at_once_schedule_equals_one_at_a_time(write):
    """Fifo, and least confident with one confidence per batch, are planned for the batch at once: the same plan."""
    planned = write.plan()
    fits = inserted_until_full(bank_size=write.n, capacity=write.capacity, batch_size=write.r)
    if fits == write.r:
        return
    bank, batch = write.bank(), write.batch()
    full = BankState(
        np.concatenate([bank.labels, batch.labels[:fits]]),
        np.concatenate([bank.confidences, batch.confidences[:fits]]),
        np.concatenate([bank.orders, batch.orders[:fits]]),
    )
    rows = write.n + np.arange(fits, write.r)
    to_slots = write.similarity[np.ix_(rows, np.arange(write.n + fits))]
    among = write.similarity[np.ix_(rows, rows)]
    tail = Batch(batch.labels[fits:], batch.confidences[fits:], batch.orders[fits:])
    holders = _plan_one_at_a_time(POLICIES[write.policy], full, tail, to_slots, among, write.threshold)
    for slot, holder in enumerate(holders):
        if holder >= 0:
            assert planned.slots[fits + holder] == slot


@settings(max_examples=200, deadline=None)
@given(write=writes())
def test_capacity_is_never_exceeded_and_every_slot_holds_one_candidate(write):
    plan = write.plan()
    stored = plan.slots[plan.slots >= 0]
    assert len(set(stored.tolist())) == len(stored)
    assert write.n + plan.inserted <= write.capacity
    assert plan.inserts.tolist() == sorted(plan.inserts.tolist(), key=lambda p: plan.slots[p])
    assert plan.slots[plan.inserts].tolist() == list(range(write.n, write.n + plan.inserted))
    assert plan.inserted + plan.replaced + plan.skipped == write.r
    assert plan.inserted == inserted_until_full(bank_size=write.n, capacity=write.capacity, batch_size=write.r)


@settings(max_examples=200, deadline=None)
@given(write=writes(policies=("fifo", "least_confident", "same_class_lowest_similarity")))
def test_a_full_bank_stores_only_novel_candidates(write):
    """A candidate that meets a full bank is stored only if it is under the threshold against the bank as it is."""
    plan = write.plan()
    _, views = write.one_at_a_time()
    fits = inserted_until_full(bank_size=write.n, capacity=write.capacity, batch_size=write.r)
    for p in range(fits, write.r):
        best = max(float(write.similarity[write.n + p, h]) for h in views[p])
        if plan.slots[p] >= 0:
            assert best < write.threshold


@settings(max_examples=200, deadline=None)
@given(write=writes(policies=("same_class_lowest_similarity",)))
def test_a_novel_candidate_replaces_its_own_class_when_the_bank_holds_it(write):
    plan = write.plan()
    _, views = write.one_at_a_time()
    labels = [*write.bank_labels, *write.labels]
    for p, slot in enumerate(plan.slots.tolist()):
        if 0 <= slot < write.n:  # replaced a stored item: it was of p's class if the bank held any
            view = views[p]
            classes = {labels[h] for h in view}
            if write.labels[p] in classes:
                assert labels[view[slot]] == write.labels[p]


@settings(max_examples=200, deadline=None)
@given(write=writes(policies=("fifo",)))
def test_fifo_replaces_stored_items_oldest_first(write):
    plan = write.plan()
    replaced = [slot for slot, _ in plan.replacements]
    ages = [write.bank_orders[slot] for slot in replaced]
    assert sorted(ages) == sorted(write.bank_orders)[: len(ages)]


# ---------------------------------------------------------------- examples


def example(policy: str, capacity: int, bank_keys, bank_labels, keys, labels, threshold=0.9, confidences=None):
    bank_keys, keys = np.array(bank_keys, dtype=np.float64).reshape(-1, 3), np.array(keys, dtype=np.float64)
    n = len(bank_keys)
    fits = inserted_until_full(bank_size=n, capacity=capacity, batch_size=len(keys))
    return plan_write(
        policy,
        BankState(encode_labels(bank_labels), encode_confidences(confidences or [None] * n), np.arange(n)),
        Batch(encode_labels(labels), encode_confidences([None] * len(keys)), n + np.arange(len(keys))),
        capacity=capacity,
        similarity_threshold=threshold,
        similarities=Similarities(
            similarity_matrix("cosine", keys[fits:], bank_keys), similarity_matrix("cosine", keys[fits:], keys)
        ),
    )


E1, E2, E3 = [1, 0, 0], [0, 1, 0], [0, 0, 1]


def test_inserts_until_full_then_none_skips_without_looking():
    plan = WritePlan.until_full(bank_size=1, capacity=3, batch_size=4)
    assert plan.slots.tolist() == [1, 2, -1, -1]
    assert (plan.inserted, plan.replaced, plan.skipped) == (2, 0, 2)
    assert example("none", 2, [E1], [0], [E2, E3], [1, 2]).slots.tolist() == [1, -1]


def test_same_class_picks_its_least_similar_item_then_the_least_similar_overall():
    bank = [[1, 0.3, 0], [0, 0.2, 1], [1, 0.5, 0.5]]
    assert example("same_class_lowest_similarity", 3, bank, [0, 0, 1], [[0.7, 0.7, 0]], [0]).slots.tolist() == [1]
    assert example("same_class_lowest_similarity", 2, [E1, E3], [0, 1], [[0.8, 0.6, 0]], [5]).slots.tolist() == [1]


def test_a_missing_label_is_a_class_of_its_own():
    plan = example("same_class_lowest_similarity", 2, [E1, E2], [None, 3], [[0.6, 0.0, 0.8]], [None])
    assert plan.slots.tolist() == [0]  # E2 is less similar, but E1 is the one without a label
    assert np.iinfo(np.int64).min == NO_LABEL


def test_least_confident_and_a_missing_confidence_goes_first():
    plan = example("least_confident", 3, [E1, E2, E3], [0, 1, 2], [[1, 1, 1]], [3], confidences=[0.9, None, 0.2])
    assert plan.slots.tolist() == [1]


def test_candidates_of_one_batch_see_each_other_and_a_replaced_insert_counts_once():
    plan = example("same_class_lowest_similarity", 2, [], [], [E1, E2, [1, 0.05, 0]], [0, 0, 0])
    assert plan.slots.tolist() == [0, 1, -1]  # the third is a near copy of the first
    plan = example("fifo", 1, [], [], [E1, E2, E3], [0, 1, 2])
    assert plan.slots.tolist() == [-1, -1, 0]
    assert (plan.inserted, plan.replaced, plan.skipped) == (1, 0, 2)


def test_a_write_that_meets_a_full_bank_needs_its_similarities():
    bank = BankState(encode_labels([0]), encode_confidences([None]), np.zeros(1, dtype=np.int64))
    batch = Batch(encode_labels([1]), encode_confidences([None]), np.ones(1, dtype=np.int64))
    with pytest.raises(ValueError, match="similarities"):
        plan_write(LeastConfident(), bank, batch, capacity=1, similarity_threshold=0.5, similarities=None)
    with pytest.raises(ValueError, match="unknown bank policy"):
        plan_write("lru", bank, batch, capacity=1, similarity_threshold=0.5, similarities=None)


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_similarity_matrix_is_each_metrics_definition(metric):
    rng = np.random.default_rng(0)
    queries, keys = rng.standard_normal((4, 5)), rng.standard_normal((6, 5))
    keys[2] = 0
    got = similarity_matrix(metric, queries, keys)
    for i, q in enumerate(queries):
        for j, k in enumerate(keys):
            if metric == "cosine":
                want = 0.0 if not k.any() else q @ k / (np.linalg.norm(q) * np.linalg.norm(k))
            elif metric == "ip":
                want = q @ k
            else:
                want = 1 / (1 + np.linalg.norm(q - k))
            assert got[i, j] == pytest.approx(want, abs=1e-12)
