"""The growing items of a segmented bank, held by the service between searches: every search answers from
exactly what its snapshot holds, whether the held items were caught up from the change feed, read whole
(an older snapshot), or let go (over the memory budget); and the float32 screening of the growing items
ranks them exactly as the exact scan does, ties and zero keys included."""

from __future__ import annotations

import re

import numpy as np
import psycopg
import pytest
from threadpoolctl import threadpool_info

from app.banks.growing import GrowingCache
from app.banks.schema import bank_by_id
from app.banks.search import distances, nearest_positions
from app.banks.segments import Segment, sealed_segments
from app.settings import Settings
from tests.helpers import run_concurrently
from tests.test_bank_segments import make_bank, write


@pytest.fixture(params=[0, 8 * 2**20], ids=["sealed-by-index", "small-sealed-held"])
def settings(request) -> Settings:
    """No background merges: the tests merge when they mean to. Sealed segments searched through their
    indexes, or (the default) the newest small ones held and searched exactly with the growing items."""
    return Settings(
        database_url=None, no_auth=False, merge_interval_s=0, merge_idle_s=0, exact_scan_values=request.param
    )


def metric_value(client, name: str) -> float:
    text = client.get("/metrics").text
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def assert_search_matches_exact(client, bank_id: int, queries: np.ndarray, k: int = 10) -> None:
    url = f"/v1/memory-banks/{bank_id}/search"
    for labels in (None, [1]):
        body = {"queries": queries.tolist(), "k": k, "labels": labels}
        exact = client.post(url, json={**body, "exact": True}).json()["results"]
        held = client.post(url, json={**body, "ef_search": 400}).json()["results"]
        for e, h in zip(exact, held):
            assert h["ids"] == e["ids"] and h["labels"] == e["labels"]
            np.testing.assert_allclose(h["scores"], e["scores"], rtol=1e-5, atol=1e-5)


def test_search_follows_inserts_replacements_deletions_and_merges_through_the_held_items(api):
    rng = np.random.default_rng(3)
    bank = make_bank(api, dim=8, capacity=120, policy="fifo", merge_threshold=100_000)
    queries = rng.standard_normal((12, 8)).astype(np.float32)
    url = f"/v1/memory-banks/{bank['id']}"
    for step in range(10):  # the last step writes after a merge: items are held at the end
        write(api, bank["id"], rng.standard_normal((40, 8)).astype(np.float32), rng.integers(0, 3, 40))
        if step % 2:  # a deletion: its tombstone must take the item out of the held ones
            ids = api.post(f"{url}/search", json={"queries": queries[:1].tolist(), "k": 1, "exact": True})
            victim = ids.json()["results"][0]["ids"][0]
            assert api.delete(f"{url}/items/{victim}").status_code == 200
        if step % 3 == 2:  # a merge seals what is held: the next search lets those go
            assert api.post(f"{url}/merge").json()["merged"]
        assert_search_matches_exact(api, bank["id"], queries)
    assert api.get(f"{url}").json()["size"] == 119  # full since step 2 (later writes replaced, FIFO), less one
    assert metric_value(api, "eidetic_growing_cache_catch_ups_total") >= 9  # followed, not read again
    assert metric_value(api, "eidetic_growing_cache_bytes") > 0


def test_deleting_a_bank_lets_its_held_items_go(api):
    bank = make_bank(api, dim=8, merge_threshold=100_000)
    write(api, bank["id"], np.random.default_rng(2).standard_normal((50, 8)).astype(np.float32))
    found = api.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [[1.0] * 8], "k": 3})
    assert len(found.json()["results"][0]["ids"]) == 3
    assert metric_value(api, "eidetic_growing_cache_bytes") > 0
    assert api.delete(f"/v1/memory-banks/{bank['id']}").status_code == 204
    assert metric_value(api, "eidetic_growing_cache_bytes") == 0


def growing_ids(cache: GrowingCache, conn: psycopg.Connection, bank_id: int) -> set[int]:
    bank = bank_by_id(conn, bank_id)
    assert bank is not None
    return set(cache.growing(conn, bank, sealed_segments(conn, bank_id)).ids.tolist())


def test_a_search_in_an_older_snapshot_reads_what_that_snapshot_holds(service, api):
    rng = np.random.default_rng(4)
    bank = make_bank(api, dim=8, merge_threshold=100_000)
    first = write(api, bank["id"], rng.standard_normal((30, 8)).astype(np.float32))["ids"]
    cache = GrowingCache(1 << 20)
    with psycopg.connect(service.database_url) as old, psycopg.connect(service.database_url) as new:
        old.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert growing_ids(cache, old, bank["id"]) == set(first)  # the snapshot is taken here
        second = write(api, bank["id"], rng.standard_normal((20, 8)).astype(np.float32))["ids"]
        api.delete(f"/v1/memory-banks/{bank['id']}/items/{first[0]}")
        with new.transaction():
            assert growing_ids(cache, new, bank["id"]) == set(first[1:] + second)  # caught up
        assert (cache.reads, cache.catch_ups) == (1, 1)
        assert growing_ids(cache, old, bank["id"]) == set(first)  # older than the held view: read whole
        assert cache.reads == 2
        old.rollback()
        with new.transaction():  # the newer view is still the one held
            assert growing_ids(cache, new, bank["id"]) == set(first[1:] + second)
        assert (cache.reads, cache.catch_ups) == (2, 1)


def test_held_items_stay_within_their_memory_budget(service, api):
    rng = np.random.default_rng(5)
    banks = [make_bank(api, name=f"b{i}", dim=16, merge_threshold=100_000)["id"] for i in range(2)]
    for bank_id in banks:
        write(api, bank_id, rng.standard_normal((100, 16)).astype(np.float32))
    one_bank = 100 * (16 * 4 + 3 * 8 + 1 + 4)  # keys, id, version, label, has_label, norm
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        too_small = GrowingCache(one_bank - 1)
        assert len(growing_ids(too_small, conn, banks[0])) == 100  # answered, not held
        assert too_small.held_bytes() == 0
        room_for_one = GrowingCache(one_bank + 100)
        growing_ids(room_for_one, conn, banks[0])
        assert room_for_one.held_bytes() == one_bank
        growing_ids(room_for_one, conn, banks[1])  # the least recently searched bank goes
        assert room_for_one.held_bytes() == one_bank
        growing_ids(room_for_one, conn, banks[1])
        assert (room_for_one.reads, room_for_one.catch_ups) == (2, 0)  # the last search was served as held
        growing_ids(room_for_one, conn, banks[0])
        assert room_for_one.reads == 3


def test_the_newest_sealed_segments_that_fit_are_held_and_the_rest_searched_by_index(service, api):
    segments = [Segment(0, 1, 5000), Segment(1, 2, 1000), Segment(2, 3, 1000)]
    with psycopg.connect(service.database_url) as conn:
        bank = bank_by_id(conn, make_bank(api, dim=8)["id"])
    assert bank is not None
    assert GrowingCache(1 << 20, exact_values=2000 * 8).indexed(bank, segments) == segments[:1]
    assert GrowingCache(1 << 20, exact_values=2000 * 8 - 1).indexed(bank, segments) == segments[:2]
    assert GrowingCache(1 << 20, exact_values=7000 * 8).indexed(bank, segments) == []
    assert GrowingCache(1 << 20, exact_values=0).indexed(bank, segments) == segments
    assert GrowingCache(0, exact_values=7000 * 8).indexed(bank, segments) == segments  # nothing may be held


def test_held_sealed_items_come_and_go_with_the_segments_held(service, api):
    """The items of sealed segments held join the growing ones; when a compaction makes a segment too big
    to hold, its items are let go and it is searched by index."""
    rng = np.random.default_rng(8)
    bank = make_bank(api, dim=8, merge_threshold=100_000)
    url = f"/v1/memory-banks/{bank['id']}"
    for _ in range(3):
        write(api, bank["id"], rng.standard_normal((50, 8)).astype(np.float32))
        assert api.post(f"{url}/merge").json()["merged"]
    write(api, bank["id"], rng.standard_normal((20, 8)).astype(np.float32))
    cache = GrowingCache(1 << 20, exact_values=100 * 8)
    with psycopg.connect(service.database_url) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        sealed = sealed_segments(conn, bank["id"])
        held = cache.growing(conn, bank_by_id(conn, bank["id"]), cache.indexed(bank_by_id(conn, bank["id"]), sealed))
        assert len(held) == 120 and set(held.versions.tolist()) == {2, 3, 4}  # two segments of 50, and 20 growing
        conn.rollback()
        full = api.post(f"{url}/merge", params={"full": "true"}).json()  # the growing items too: (0, 4]
        assert full["segments"] == [{"lo": 0, "hi": 4, "rows": 170}]
        write(api, bank["id"], rng.standard_normal((20, 8)).astype(np.float32))
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        bank_now = bank_by_id(conn, bank["id"])
        assert bank_now is not None
        assert cache.indexed(bank_now, sealed_segments(conn, bank["id"])) == [Segment(0, 4, 170)]
        held = cache.growing(conn, bank_now, [Segment(0, 4, 170)])
        assert len(held) == 20 and set(held.versions.tolist()) == {5}
        conn.rollback()
    assert (cache.reads, cache.catch_ups) == (1, 1)  # the floor rose: what was held was cut, not read again


def test_a_gap_between_sealed_segments_is_searched_with_or_without_held_items(service, api):
    """Items no sealed segment holds, gaps included (a merge leaves none, but search must not count on it),
    are what a search scans exactly, whether the service holds them or reads them per search."""
    rng = np.random.default_rng(11)
    bank = make_bank(api, dim=8, merge_threshold=100_000)
    for _ in range(4):  # versions 1..4, 10 items each
        write(api, bank["id"], rng.standard_normal((10, 8)).astype(np.float32))
    with_gap = [Segment(0, 1, 10), Segment(2, 3, 10)]  # versions 2 and 4 are in no segment
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        bank_row = bank_by_id(conn, bank["id"])
        assert bank_row is not None
        for cache in (GrowingCache(0), GrowingCache(1 << 20)):
            items = cache.growing(conn, bank_row, with_gap)
            assert len(items) == 20 and set(items.versions.tolist()) == {2, 4}


def brute_force(metric: str, queries: np.ndarray, keys: np.ndarray, ids: np.ndarray, k: int) -> list[list[int]]:
    """Every distance in float64, ordered by distance (NaN last), then id."""
    full = distances(metric, queries, keys)
    return [np.lexsort((ids, np.where(np.isnan(row), np.inf, row)))[:k].tolist() for row in full]


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_screening_in_float32_ranks_as_float64_does_ties_by_id_and_zero_keys_last(metric):
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((3000, 32)).astype(np.float32)
    keys[100:160] = keys[7]  # 61 equal keys: a tie far wider than k
    keys[2000:2003] = 0.0  # a zero key is at distance NaN under cosine (pgvector's), ranked last
    ids = rng.permutation(10_000)[:3000].astype(np.int64)  # ids in no particular order
    queries = np.vstack([keys[7] + 1e-3 * rng.standard_normal(32), rng.standard_normal((20, 32))]).astype(np.float32)
    for k in (1, 10, 100):
        found = nearest_positions(metric, queries, keys, ids, k)
        assert [positions.tolist() for positions, _ in found] == brute_force(metric, queries, keys, ids, k)
        for (positions, got), query in zip(found, queries):
            np.testing.assert_allclose(got, distances(metric, query[None, :], keys[positions])[0], rtol=1e-12)
    few = nearest_positions(metric, queries, keys[1998:2003], ids[1998:2003], 10)  # k above the keys held
    assert [positions.tolist() for positions, _ in few] == brute_force(
        metric, queries, keys[1998:2003], ids[1998:2003], 10
    )


def test_overlapping_scans_leave_numpys_blas_threads_as_they_found_them():
    """The scan holds BLAS at one thread (a process-wide limit) while it runs; scans on several threads at
    once must not leave it held."""

    def blas_threads() -> list[int]:
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    rng = np.random.default_rng(9)
    keys, queries = rng.standard_normal((4000, 16)).astype(np.float32), rng.standard_normal((8, 16))
    ids = np.arange(4000)
    within: list[list[int]] = []

    def scan(_: int) -> None:
        for _ in range(20):
            nearest_positions("l2", queries, keys, ids, 5)
            within.append(blas_threads())

    run_concurrently(scan, 4)
    assert len(within) == 80 and all(threads == [1] * len(before) or threads == before for threads in within)
    assert blas_threads() == before
