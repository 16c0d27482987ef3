"""Cached and trainable memory: their policies, the contrastive loss, the path choice, and the store behind them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from eidetic.client import EideticClient
from eidetic.torch.memory_cache import BankSpec, MemoryCache
from model.enhanced_classifier import EnhancedClassifier
from model.memory_modules import (
    BankMismatch,
    CachedMemory,
    MemoryStore,
    TrainableMemory,
    generation_name,
    memory_contrastive_loss,
)

E1, E2, E3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


def tensor(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def labels(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def contents(keys: torch.Tensor, item_labels) -> set[tuple]:
    return {(int(label), tuple(np.round(key.tolist(), 4))) for key, label in zip(keys, item_labels)}


@pytest.fixture
def client(service):
    with EideticClient(service.base_url, service.write_key) as c:
        yield c


# ---------------------------------------------------------------- cached memory: the policy on hand-made examples


def test_cached_memory_inserts_until_full_then_stores_only_novel_items():
    memory = CachedMemory(3, 3, memory_size=3, similarity_threshold=0.9)
    first = memory.write(tensor([E1, E2, E1]), labels([0, 1, 0]))  # a duplicate too: no novelty test before full
    assert (first.inserted, first.replaced, first.skipped, memory.size) == (3, 0, 0, 3)
    familiar = memory.write(tensor([[1.0, 0.1, 0.0]]), labels([2]))  # cosine 0.995 with E1
    assert (familiar.inserted, familiar.replaced, familiar.skipped) == (0, 0, 1)
    assert contents(*memory.stored_items()) == contents(tensor([E1, E2, E1]), [0, 1, 0])


def test_a_novel_item_replaces_the_least_similar_item_of_its_class():
    memory = CachedMemory(3, 3, memory_size=3, similarity_threshold=0.9)
    memory.write(tensor([E1, [0.6, 0.8, 0.0], E3]), labels([0, 0, 1]))
    # E2 is novel (best similarity 0.8 < 0.9); of class 0, E1 (similarity 0) is less like it than [.6, .8, 0] (0.8)
    outcome = memory.write(tensor([E2]), labels([0]))
    assert outcome.replaced == 1 and outcome.slots == [0]  # E1, the class-0 item least like E2
    assert contents(*memory.stored_items()) == contents(tensor([E2, [0.6, 0.8, 0.0], E3]), [0, 0, 1])


def test_a_novel_item_of_a_class_not_in_memory_replaces_the_least_similar_item():
    memory = CachedMemory(3, 3, memory_size=3, similarity_threshold=0.9)
    memory.write(tensor([E1, [0.0, 0.6, 0.8], E3]), labels([0, 0, 1]))
    outcome = memory.write(tensor([E2]), labels([2]))  # similarities 0, 0.6, 0: the first lowest, E1
    assert outcome.slots == [0]
    assert contents(*memory.stored_items()) == contents(tensor([E2, [0.0, 0.6, 0.8], E3]), [2, 0, 1])


def test_retrieval_answers_the_nearest_items_label_with_its_similarity():
    memory = CachedMemory(3, 3, memory_size=4)
    empty = memory.retrieve(tensor([E1]))
    assert empty.prediction.tolist() == [-1] and empty.confidence.tolist() == [0.0]
    memory.write(tensor([E1, E2]), labels([0, 1]))
    answer = memory.retrieve(tensor([[0.6, 0.8, 0.0], [-1.0, -0.1, 0.0]]))  # the second is unlike both: E2 is nearest
    assert answer.prediction.tolist() == [1, 1]
    assert answer.confidence[0].item() == pytest.approx(0.8) and answer.confidence[1].item() == 0.0  # clamped at 0


# ---------------------------------------------------------------- trainable memory: the policy


def set_confidences(memory: TrainableMemory, confidences: list[float]) -> None:
    """Gives the used slots these class probabilities (their classes unchanged), as training would."""
    with torch.no_grad():
        for slot, confidence in enumerate(confidences):
            label = int(memory.values[slot].argmax())
            logit = math.log(confidence * (memory.num_classes - 1) / (1 - confidence))
            memory.values[slot] = 0
            memory.values[slot, label] = logit


def test_trainable_memory_replaces_the_least_confident_slot_with_a_novel_item():
    memory = TrainableMemory(3, 3, memory_size=3, similarity_threshold=0.9)
    memory.write(tensor([E1, E2, E3]), labels([0, 1, 2]))
    assert memory.slot_confidences().tolist() == pytest.approx([0.9, 0.9, 0.9])
    set_confidences(memory, [0.95, 0.5, 0.7])
    familiar = memory.write(tensor([[1.0, 0.05, 0.0]]), labels([1]))
    assert (familiar.replaced, familiar.skipped) == (0, 1)
    novel = memory.write(tensor([[1.0, 1.0, 1.0]]), labels([0]))  # best similarity 0.577
    assert novel.slots == [1] and novel.replaced == 1
    assert memory.slot_labels().tolist() == [0, 0, 2]
    assert memory.slot_confidences()[1].item() == pytest.approx(0.9)


def test_among_equally_confident_slots_the_oldest_goes_first_and_a_batch_follows_one_at_a_time():
    memory = TrainableMemory(3, 3, memory_size=3, similarity_threshold=0.9)
    memory.write(tensor([E1, E2, E3]), labels([0, 1, 2]))  # all at the written confidence 0.9
    outcome = memory.write(tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.01], [0.0, 1.0, 1.0]]), labels([0, 0, 1]))
    # item 0 replaces the oldest (slot 0); item 1 is then familiar (cosine ~1 with item 0); item 2 replaces slot 1
    assert outcome.slots == [0, -1, 1]
    assert (outcome.inserted, outcome.replaced, outcome.skipped) == (0, 2, 1)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    capacity=st.integers(1, 12),
    threshold=st.floats(0.2, 0.99),
    spread=st.floats(0.1, 1.5),
    written_confidence=st.floats(0.4, 0.99),
)
def test_trainable_writes_decide_as_the_services_least_confident_policy(
    seed, capacity, threshold, spread, written_confidence
):
    """The batch-at-once plan equals the one-at-a-time rule the service (and MemoryCache) apply."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    memory = TrainableMemory(5, 3, capacity, similarity_threshold=threshold, written_confidence=written_confidence)
    reference = MemoryCache(BankSpec(5, capacity, "cosine", "least_confident", threshold))
    written = [float(memory.written_confidence)]
    centres = torch.randn(3, 5, generator=generator)
    for _ in range(5):
        size = int(rng.integers(1, 2 * capacity + 3))
        classes = torch.randint(0, 3, (size,), generator=generator)
        keys = centres[classes] + spread * torch.randn(size, 5, generator=generator)
        ours = memory.write(keys, classes)
        theirs = reference.write(keys, classes.tolist(), confidences=written * size)
        assert (ours.slots, ours.inserted, ours.replaced, ours.skipped) == (
            theirs.slots,
            theirs.inserted,
            theirs.replaced,
            theirs.skipped,
        )
        with torch.no_grad():  # training moves some slots' confidences
            moved = torch.rand(memory.size, generator=generator) < 0.4
            memory.values[: memory.size][moved] += torch.randn(int(moved.sum()), 3, generator=generator)
        reference.confidences[: memory.size] = memory.slot_confidences()
    assert torch.equal(memory.keys[: memory.size].detach(), reference.keys[: reference.size])


# ---------------------------------------------------------------- the loss


def reference_loss(queries, query_labels, keys, key_labels, temperature):
    """The definition, one query at a time."""
    q = torch.nn.functional.normalize(queries, dim=1)
    k = torch.nn.functional.normalize(keys, dim=1)
    losses = []
    for i in range(len(q)):
        others = [j for j in range(len(q)) if j != i]
        candidates = torch.cat([k, q[others]])
        candidate_labels = torch.cat([key_labels, query_labels[others]])
        positive = candidate_labels == query_labels[i]
        if not positive.any():
            candidates = torch.cat([candidates, q[i : i + 1]])
            positive = torch.cat([torch.zeros_like(positive), torch.ones(1, dtype=torch.bool)])
        logits = candidates @ q[i] / temperature
        losses.append(torch.logsumexp(logits, 0) - torch.logsumexp(logits[positive], 0))
    return torch.stack(losses).mean()


def test_the_loss_is_its_definition_vectorised():
    generator = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(9, 6, generator=generator), torch.randn(7, 6, generator=generator)
    query_labels, key_labels = labels([0, 0, 1, 2, 2, 2, 3, 1, 4]), labels([0, 1, 1, 2, 5, 5, 0])
    ours = memory_contrastive_loss(queries, query_labels, keys, key_labels, 0.1)
    assert ours.item() == pytest.approx(reference_loss(queries, query_labels, keys, key_labels, 0.1).item(), rel=1e-5)


@pytest.mark.parametrize(
    "batch_labels, memory_labels",
    [([0, 0, 1], []), ([0, 1, 2], []), ([0, 1, 2], [0, 3]), ([0, 0, 0, 1], [1, 1])],
    ids=["a-single-sample-class", "only-single-sample-classes", "singletons-with-memory", "usual"],
)
def test_the_loss_is_finite_with_a_gradient_for_every_sample(batch_labels, memory_labels):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(len(batch_labels), 4, generator=generator, requires_grad=True)
    keys = torch.randn(len(memory_labels), 4, generator=generator, requires_grad=True)
    loss = memory_contrastive_loss(queries, labels(batch_labels), keys, labels(memory_labels), 0.1)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(queries.grad).all() and (queries.grad.norm(dim=1) > 0).all()
    if memory_labels:
        assert torch.isfinite(keys.grad).all() and keys.grad.abs().sum() > 0


def test_trainable_memory_loss_trains_features_keys_and_values():
    memory = TrainableMemory(4, 3, memory_size=8)
    generator = torch.Generator().manual_seed(1)
    memory.write(torch.randn(6, 4, generator=generator), labels([0, 1, 2, 0, 1, 2]))
    features = torch.randn(5, 4, generator=generator, requires_grad=True)
    loss = memory.memory_loss(features, labels([0, 0, 1, 2, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert (features.grad.norm(dim=1) > 0).all()
    assert (memory.keys.grad[:6].norm(dim=1) > 0).all() and (memory.values.grad[:6].norm(dim=1) > 0).all()
    assert memory.keys.grad[6:].abs().sum() == 0  # unused slots take no part


# ---------------------------------------------------------------- the path choice


@pytest.mark.parametrize("kind", [CachedMemory, TrainableMemory])
def test_the_memory_path_is_taken_exactly_from_the_threshold_on(kind):
    memory = kind(3, 3, memory_size=4)
    memory.write(tensor([E1, E2]), labels([2, 2]))
    model = EnhancedClassifier(nn.Identity(), 3, 3, memory, dropout=0.0)
    with torch.no_grad():  # the head always says class 0; the memory says 2
        model.head[1].weight.zero_()
        model.head[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    model.eval()
    queries = tensor([[0.8, 0.6, 0.0]])
    confidence = memory.retrieve(queries).confidence.item()
    assert confidence == pytest.approx(0.8)
    model.confidence_threshold = confidence
    at = model(queries)
    assert at.from_memory.tolist() == [True] and at.prediction.tolist() == [2]
    model.confidence_threshold = float(np.nextafter(np.float32(confidence), np.float32(1)))
    above = model(queries)
    assert above.from_memory.tolist() == [False] and above.prediction.tolist() == [0]
    assert model.predict(queries)[0].tolist() == [0]


def test_predict_runs_the_head_only_where_the_memory_does_not_answer():
    memory = CachedMemory(3, 3, memory_size=4)
    memory.write(tensor([E1]), labels([1]))
    model = EnhancedClassifier(nn.Identity(), 3, 3, memory, confidence_threshold=0.9, dropout=0.0).eval()
    seen: list[int] = []
    model.head.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    queries = tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.99, 0.05, 0.0]])
    prediction, from_memory = model.predict(queries)
    assert from_memory.tolist() == [True, False, True] and seen == [1]
    assert torch.equal(prediction, model(queries).prediction)


# ---------------------------------------------------------------- with the store


def stream(seed: int, batches: int = 6, size: int = 12, dim: int = 6):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, dim, generator=generator)
    for _ in range(batches):
        classes = torch.randint(0, 4, (size,), generator=generator)
        yield centres[classes] + 0.5 * torch.randn(size, dim, generator=generator), classes


def test_cached_memory_gives_the_same_results_with_the_store_or_without(client):
    local = CachedMemory(6, 4, memory_size=20, similarity_threshold=0.8)
    stored = CachedMemory(6, 4, memory_size=20, similarity_threshold=0.8, store=MemoryStore(client, "cached-bank"))
    for keys, classes in stream(1):
        a, b = local.write(keys, classes), stored.write(keys, classes)
        assert (a.slots, a.inserted, a.replaced, a.skipped) == (b.slots, b.inserted, b.replaced, b.skipped)
        queries = keys + 0.1
        assert torch.equal(local.retrieve(queries).prediction, stored.retrieve(queries).prediction)
        assert torch.equal(local.retrieve(queries).confidence, stored.retrieve(queries).confidence)
        assert local.memory_loss(keys, classes).item() == stored.memory_loss(keys, classes).item()
    stored.end_epoch(0)
    assert torch.equal(local.stored_items()[0], stored.stored_items()[0])
    # the bank holds what the cache holds, and a new memory of that name starts from it
    again = CachedMemory(6, 4, memory_size=20, similarity_threshold=0.8, store=MemoryStore(client, "cached-bank"))
    assert contents(*again.stored_items()) == contents(*local.stored_items())


def test_an_existing_bank_of_another_shape_is_refused(client):
    client.create_bank("taken", 5, 20)
    with pytest.raises(BankMismatch, match="dim 5"):
        CachedMemory(6, 4, memory_size=20, store=MemoryStore(client, "taken"))


def trained_memory(store: MemoryStore | None) -> TrainableMemory:
    memory = TrainableMemory(6, 4, memory_size=20, similarity_threshold=0.8, store=store)
    for step, (keys, classes) in enumerate(stream(2)):
        memory.write(keys, classes)
        with torch.no_grad():  # as an optimizer would: keys and values move
            memory.keys.add_(0.01 * step)
            memory.values[::3] += 0.2
    return memory


def test_trainable_memory_resumes_from_its_bank(client):
    store = MemoryStore(client, "trainable")
    memory = trained_memory(store)
    assert memory.restored_epoch is None
    memory.persist(0)
    slots = memory.persist(1)  # replaces generation 0
    assert sorted(b["name"] for b in client.list_banks()) == [generation_name("trainable", 1)]
    client.create_bank(generation_name("trainable", 2), 6, 20)  # a generation whose write never came: ignored
    resumed = TrainableMemory(6, 4, memory_size=20, similarity_threshold=0.8, store=store)
    assert resumed.restored_epoch == 1 and resumed.size == memory.size
    order = torch.argsort(memory.order[: memory.size])
    assert torch.equal(resumed.keys[: resumed.size], memory.keys[order].detach())
    assert torch.equal(resumed.values[: resumed.size], memory.values[order].detach())
    resumed.restore(epoch=1, slots=slots)  # back in the slots they came from
    assert torch.equal(resumed.keys, memory.keys) and torch.equal(resumed.values, memory.values)
    for keys, classes in stream(3, batches=3):  # and the policy carries on identically
        a, b = memory.write(keys, classes), resumed.write(keys, classes)
        assert (a.slots, a.replaced, a.skipped) == (b.slots, b.replaced, b.skipped)
    assert torch.equal(resumed.keys, memory.keys)
