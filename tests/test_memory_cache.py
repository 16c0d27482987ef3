"""MemoryCache: the service's answers and policy decisions, on the device, kept in step through the change feed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eidetic.client import EideticClient
from eidetic.torch.memory_cache import NO_LABEL, BankSpec, MemoryCache, vote


@pytest.fixture
def client(service):
    with EideticClient(service.base_url, service.write_key) as c:
        yield c


def bank_contents(client, bank_id) -> set[tuple]:
    import io

    import pyarrow as pa

    table = pa.ipc.open_stream(io.BytesIO(client.snapshot(bank_id))).read_all()
    return {
        (row["id"], row["label"], tuple(np.round(np.array(row["key"], dtype=np.float32).astype(np.float64), 5)))
        for row in table.to_pylist()
    }


def cache_contents(cache: MemoryCache) -> set[tuple]:
    n = cache.size
    keys = cache.keys[:n].cpu().numpy().astype(np.float64)
    labels = cache.labels[:n].tolist()
    return {
        (int(i), None if label == NO_LABEL else label, tuple(np.round(k, 5)))
        for i, label, k in zip(cache.ids[:n].tolist(), labels, keys)
    }


def clustered_batches(seed: int, batches: int = 6, size: int = 20, dim: int = 8):
    """Keys around a few centres, so a full bank sees both novel and familiar items."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, dim))
    for _ in range(batches):
        which = rng.integers(0, 5, size)
        keys = centres[which] + 0.6 * rng.standard_normal((size, dim))
        yield keys.astype(np.float32), which.tolist(), rng.uniform(0, 1, size).round(3).tolist()


@pytest.mark.parametrize("policy", ["same_class_lowest_similarity", "least_confident", "fifo", "none"])
def test_a_device_only_cache_decides_exactly_as_the_service(client, policy):
    options = {"metric": "cosine", "policy": policy, "similarity_threshold": 0.9}
    bank = client.create_bank(f"b-{policy}", 8, 30, **options)
    local = MemoryCache(BankSpec(dim=8, capacity=30, **options))  # no client: the device alone
    for keys, labels, confidences in clustered_batches(1):
        items = [{"key": k.tolist(), "label": label, "confidence": c} for k, label, c in zip(keys, labels, confidences)]
        served = client.write_items(bank["id"], items)
        applied = local.write(torch.from_numpy(keys), labels, confidences=confidences)
        assert (applied.inserted, applied.replaced, applied.skipped) == (
            served["inserted"],
            served["replaced"],
            served["skipped"],
        )
    stored = {(label, key) for _, label, key in bank_contents(client, bank["id"])}
    cached = {(label, key) for _, label, key in cache_contents(local)}
    assert stored == cached


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_top_k_on_the_device_equals_the_services_exact_search(client, metric):
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((400, 16)).astype(np.float32)
    bank = client.create_bank(f"s-{metric}", 16, 1000, metric=metric, policy="none")
    client.write_items(bank["id"], [{"key": k.tolist(), "label": int(i % 6)} for i, k in enumerate(keys)])
    cache = MemoryCache.from_service(client, bank["id"])
    assert cache.size == 400 and cache.stats.version == 1
    queries = rng.standard_normal((32, 16)).astype(np.float32)
    served = client.search(bank["id"], queries, k=5, exact=True)
    answer = cache.search(torch.from_numpy(queries), k=5)
    assert answer.ids.tolist() == [r["ids"] for r in served]
    np.testing.assert_allclose(answer.scores.numpy(), [r["scores"] for r in served], rtol=1e-4, atol=1e-5)
    assert answer.prediction.tolist() == [r["prediction"] for r in served]
    np.testing.assert_allclose(answer.confidence.numpy(), [r["confidence"] for r in served], rtol=1e-4, atol=1e-6)
    assert cache.stats.hits == 32 and cache.stats.misses == 0


def test_writes_apply_at_once_and_the_store_ends_up_identical(client):
    bank = client.create_bank("behind", 8, 30, policy="same_class_lowest_similarity", similarity_threshold=0.9)
    cache = MemoryCache.from_service(client, bank["id"])
    for keys, labels, confidences in clustered_batches(3):
        cache.write(torch.from_numpy(keys), labels, confidences=confidences)
        top = cache.search(torch.from_numpy(keys[:1]), k=1)  # visible at once, before any acknowledgement
        assert float(top.scores[0, 0]) > 0.999 or cache.size == 30
    cache.flush()
    assert cache_contents(cache) == bank_contents(client, bank["id"])
    assert cache.stats.version == client.get_bank(bank["id"])["version"] == 6
    assert cache.stats.rewarms == 1  # the service agreed with every local decision


def test_the_cache_follows_other_writers_through_the_change_feed(client):
    bank = client.create_bank("shared", 4, 100, policy="none")
    cache = MemoryCache.from_service(client, bank["id"], max_staleness=0)
    client.write_items(bank["id"], [{"key": [1, 0, 0, 0], "label": 1}, {"key": [0, 1, 0, 0], "label": 2}])
    assert cache.sync() == 2 and cache.size == 2 and cache.stats.version == 1
    cache.write(torch.tensor([[0.0, 0, 1, 0]]), [3])
    client.write_items(bank["id"], [{"key": [0, 0, 0, 1], "label": 4}])  # races the write-behind
    cache.flush()
    assert cache_contents(cache) == bank_contents(client, bank["id"])
    assert cache.stats.staleness == 0


def test_a_deleted_item_leaves_the_cache_through_its_tombstone(client):
    bank = client.create_bank("tomb", 2, 10, policy="none")
    ids = client.write_items(bank["id"], [{"key": [1, 0], "label": 1}, {"key": [0, 1], "label": 2}])["ids"]
    cache = MemoryCache.from_service(client, bank["id"])
    client.request("DELETE", f"/v1/memory-banks/{bank['id']}/items/{ids[0]}")
    cache.sync()
    assert cache.size == 1 and cache.ids[:1].tolist() == [ids[1]]


def test_a_partial_cache_keeps_the_most_hit_items_and_asks_the_service_for_the_rest(client):
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((50, 8)).astype(np.float32)
    bank = client.create_bank("big", 8, 50, policy="none", similarity_threshold=0.95)
    ids = client.write_items(bank["id"], [{"key": k.tolist(), "label": i} for i, k in enumerate(keys)])["ids"]
    client.search(bank["id"], np.repeat(keys[:5], 3, axis=0), k=1)  # items 0..4 become the hot ones
    cache = MemoryCache.from_service(client, bank["id"], cache_capacity=5)
    assert cache.partial and sorted(cache.ids[:5].tolist()) == ids[:5]
    answer = cache.search(torch.from_numpy(keys[[0, 1, 30, 40]]), k=1)
    assert answer.from_service.tolist() == [False, False, True, True]
    assert answer.ids[:, 0].tolist() == [ids[0], ids[1], ids[30], ids[40]]
    assert (cache.stats.hits, cache.stats.misses) == (2, 2)


def test_vote_matches_the_services_rule():
    scores = torch.tensor([[0.9, 0.5, 0.45], [0.2, -0.1, 0.1], [0.3, 0.2, 0.1]])
    labels = torch.tensor([[1, 2, 2], [4, 3, NO_LABEL], [NO_LABEL, NO_LABEL, NO_LABEL]])
    prediction, confidence = vote(scores, labels, 3)
    assert prediction.tolist() == [2, 4, -1]
    np.testing.assert_allclose(confidence.numpy(), [0.95 / 3, 0.2 / 3, 0.0], rtol=1e-6)
