"""Segmented banks: items land in a growing segment searched exactly, a merge seals them into HNSW segments
built in bulk, and search, policies, versions and the change feed are those of an unsegmented bank throughout:
under four writers, across merges, and across a merge killed half-way (PostgreSQL or the API process)."""

from __future__ import annotations

import importlib
import threading
import time

import httpx
import numpy as np
import psycopg
import pyarrow as pa
import pytest

from app import keys
from app.settings import Settings
from eidetic.wire.bank_policy import similarity_matrix
from tests import fault_kit
from tests.conftest import start_service, stop_service
from tests.helpers import error_of


@pytest.fixture
def settings() -> Settings:
    """The background merger looks often, so that merges run while the tests write; every sealed segment is
    searched through its index (none held with the growing items: tests/test_bank_growing.py)."""
    return Settings(
        database_url=None, no_auth=False, max_body_bytes=8 * 1024 * 1024, merge_interval_s=0.2, exact_scan_values=0
    )


def make_bank(client, **overrides) -> dict:
    body = {"name": "bank", "dim": 8, "capacity": 1000, "policy": "none", "similarity_threshold": 0.999, **overrides}
    response = client.post("/v1/memory-banks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def write(client, bank_id: int, keys: np.ndarray, labels=None) -> dict:
    labels = [None] * len(keys) if labels is None else labels
    items = [{"key": k.tolist(), "label": None if label is None else int(label)} for k, label in zip(keys, labels)]
    response = client.post(f"/v1/memory-banks/{bank_id}/items", json={"items": items})
    assert response.status_code == 200, response.text
    return response.json()


def snapshot(client, bank_id: int) -> pa.Table:
    response = client.get(f"/v1/memory-banks/{bank_id}/snapshot")
    assert response.status_code == 200
    return pa.ipc.open_stream(response.content).read_all()


def segments(client, bank_id: int) -> dict:
    response = client.get(f"/v1/memory-banks/{bank_id}/segments")
    assert response.status_code == 200, response.text
    return response.json()


def replay_feed(client, bank_id: int) -> dict[int, tuple[int, list[float]]]:
    """The bank as a cache that follows the change feed from version 0 sees it: id -> (version, key)."""
    items: dict[int, tuple[int, list[float]]] = {}
    since: int | None = 0
    while since is not None:
        page = client.get(f"/v1/memory-banks/{bank_id}/changes", params={"since": since, "limit": 500}).json()
        for item in page["items"]:
            items[item["id"]] = (item["version"], item["key"])
        for tombstone in page["tombstones"]:
            items.pop(tombstone["id"], None)
        since = page["next_since"]
    return items


def assert_search_is_right(client, bank_id: int, metric: str = "cosine", k: int = 10) -> None:
    """Exact search is the true top k of what the bank holds; HNSW search agrees with it (recall >= 0.9)
    and is never short, with or without a label filter."""
    table = snapshot(client, bank_id).to_pylist()
    ids = np.array([row["id"] for row in table])
    keys = np.array([row["key"] for row in table], dtype=np.float32)
    labels = np.array([-1 if row["label"] is None else row["label"] for row in table])
    queries = np.random.default_rng(99).standard_normal((20, keys.shape[1])).astype(np.float32)
    url = f"/v1/memory-banks/{bank_id}/search"
    exact = client.post(url, json={"queries": queries.tolist(), "k": k, "exact": True}).json()["results"]
    for query, result in zip(queries, exact):
        expected = np.argsort(-similarity_matrix(metric, query, keys)[0], kind="stable")[:k]
        assert set(result["ids"]) == set(ids[expected].tolist())
    approx = client.post(url, json={"queries": queries.tolist(), "k": k, "ef_search": 64}).json()["results"]
    assert all(len(a["ids"]) == min(k, len(ids)) for a in approx)
    recall = np.mean([len(set(a["ids"]) & set(e["ids"])) / k for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall
    rare = int(labels[0])
    if rare < 0:  # the bank's items carry no labels
        return
    filtered = client.post(url, json={"queries": queries.tolist(), "k": 30, "ef_search": 10, "labels": [rare]})
    want = min(30, int((labels == rare).sum()))
    assert all(len(r["ids"]) == want and set(r["labels"]) == {rare} for r in filtered.json()["results"])


def segment_indexes(database_url: str, bank_id: int) -> dict[str, bool]:
    """The segment indexes on the bank's partition: name -> valid."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = to_regclass(%s)",
            (f"memory_items_b{bank_id}",),
        ).fetchall()
    return {name: valid for name, valid in rows if name.startswith(f"memory_items_b{bank_id}_v")}


def assert_segments_tile(state: dict, version: int) -> None:
    """Sealed segments cover (0, hi] without gap or overlap."""
    edge = 0
    for segment in state["segments"]:
        assert segment["lo"] == edge
        edge = segment["hi"]
    assert edge <= version


# ------------------------------------------------------------------ sealing and search


def test_a_merge_seals_the_growing_items_into_an_indexed_segment_and_search_answers_from_both(service, api):
    rng = np.random.default_rng(1)
    bank = make_bank(api, dim=16, merge_threshold=100_000)  # never due: the test merges
    keys = rng.standard_normal((900, 16)).astype(np.float32)
    labels = np.where(np.arange(900) % 90 == 0, 7, np.arange(900) % 3)
    write(api, bank["id"], keys[:600], labels[:600])
    assert segments(api, bank["id"]) == {
        "merged": False,
        "sealed_rows": 0,
        "compacted_segments": 0,
        "segments": [],
        "growing_rows": 600,
    }
    assert_search_is_right(api, bank["id"])

    merged = api.post(f"/v1/memory-banks/{bank['id']}/merge").json()
    assert merged["merged"] and merged["sealed_rows"] == 600 and merged["growing_rows"] == 0
    assert merged["segments"] == [{"lo": 0, "hi": 1, "rows": 600}]
    assert segment_indexes(service.database_url, bank["id"]) == {f"memory_items_b{bank['id']}_v0_1": True}
    write(api, bank["id"], keys[600:], labels[600:])  # the growing segment again, beside the sealed one
    assert segments(api, bank["id"])["growing_rows"] == 300
    assert_search_is_right(api, bank["id"])

    with psycopg.connect(service.database_url) as conn:  # a sealed segment is searched through its index
        conn.execute("SET enable_seqscan = off")  # (900 rows would be scanned: the planner is told to prefer indexes)
        conn.execute("SET enable_bitmapscan = off")
        query = "[" + ",".join(["0.5"] * 16) + "]"
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                f"EXPLAIN SELECT id FROM memory_items_b{bank['id']} WHERE bank_id = {bank['id']} "
                f"AND version > 0 AND version <= 1 ORDER BY key::vector(16) <=> '{query}'::vector(16) LIMIT 10"
            )
        )
    assert f"memory_items_b{bank['id']}_v0_1" in plan, plan


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_growing_and_sealed_items_are_ranked_as_the_exact_scan_ranks_them(api, metric, monkeypatch):
    """The growing items are compared with the queries in the service (a few queries at a time here), the
    sealed ones in PostgreSQL: one ranking, the same scores as the exact scan's, labels filtered, metas read."""
    monkeypatch.setattr(importlib.import_module("app.banks.search"), "_DISTANCE_BLOCK", 500)
    rng = np.random.default_rng(10)
    bank = make_bank(api, dim=12, metric=metric, merge_threshold=100_000)
    keys = rng.standard_normal((400, 12)).astype(np.float32)
    items = [{"key": k.tolist(), "label": i % 4, "meta": {"i": i}} for i, k in enumerate(keys)]
    for start in (0, 200):
        assert api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items[start : start + 200]}).is_success
        if start == 0:
            api.post(f"/v1/memory-banks/{bank['id']}/merge")
    queries = rng.standard_normal((16, 12)).tolist()
    url = f"/v1/memory-banks/{bank['id']}/search"
    for labels in (None, [2]):
        body = {"queries": queries, "k": 8, "labels": labels, "with_meta": True}
        exact = api.post(url, json={**body, "exact": True}).json()["results"]
        mixed = api.post(url, json={**body, "ef_search": 400}).json()["results"]
        for e, m in zip(exact, mixed):
            assert m["ids"] == e["ids"] and m["labels"] == e["labels"] and m["metas"] == e["metas"]
            np.testing.assert_allclose(m["scores"], e["scores"], rtol=1e-5, atol=1e-5)


def test_sealed_segments_of_one_tier_are_compacted_into_one(service, api):
    rng = np.random.default_rng(2)
    bank = make_bank(api, merge_threshold=100_000, merge_factor=3)
    for _ in range(3):
        write(api, bank["id"], rng.standard_normal((50, 8)).astype(np.float32))
        merged = api.post(f"/v1/memory-banks/{bank['id']}/merge").json()
    assert merged["compacted_segments"] == 3
    assert merged["segments"] == [{"lo": 0, "hi": 3, "rows": 150}]
    assert segment_indexes(service.database_url, bank["id"]) == {f"memory_items_b{bank['id']}_v0_3": True}
    assert_search_is_right(api, bank["id"])


def test_a_full_merge_compacts_every_sealed_segment_into_one(service, api):
    rng = np.random.default_rng(6)
    bank = make_bank(api, merge_threshold=100_000)
    for _ in range(3):
        write(api, bank["id"], rng.standard_normal((40, 8)).astype(np.float32))
        api.post(f"/v1/memory-banks/{bank['id']}/merge")
    write(api, bank["id"], rng.standard_normal((40, 8)).astype(np.float32))
    merged = api.post(f"/v1/memory-banks/{bank['id']}/merge", params={"full": "true"}).json()
    assert merged["segments"] == [{"lo": 0, "hi": 4, "rows": 160}] and merged["compacted_segments"] == 4
    assert segment_indexes(service.database_url, bank["id"]) == {f"memory_items_b{bank['id']}_v0_4": True}
    assert_search_is_right(api, bank["id"])


def test_a_merge_asked_not_to_wait_answers_202_at_once_and_seals_in_the_background(service, api):
    rng = np.random.default_rng(7)
    bank = make_bank(api, merge_threshold=100_000)  # never due: only the request merges
    write(api, bank["id"], rng.standard_normal((300, 8)).astype(np.float32))
    started = api.post(f"/v1/memory-banks/{bank['id']}/merge", params={"wait": "false", "full": "true"})
    assert started.status_code == 202, started.text
    assert set(started.json()) >= {"segments", "growing_rows"}  # the bank's segments when it was asked
    deadline = time.monotonic() + 30
    while segments(api, bank["id"])["segments"] != [{"lo": 0, "hi": 1, "rows": 300}]:
        assert time.monotonic() < deadline, segments(api, bank["id"])
        time.sleep(0.1)
    assert segments(api, bank["id"])["growing_rows"] == 0
    assert_search_is_right(api, bank["id"])


def test_the_background_merger_compacts_a_bank_left_idle_into_one_segment(database_url):
    settings = Settings(database_url=None, no_auth=False, merge_interval_s=0.2, merge_idle_s=1.0)
    server, thread, base_url = start_service(settings, database_url)
    try:
        with psycopg.connect(database_url) as conn:
            key = keys.create_key(conn, "alpha", "write")
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            bank = make_bank(client, merge_threshold=50)
            rng = np.random.default_rng(7)
            for _ in range(3):  # each write is due a merge of its own: three segments, or fewer
                write(client, bank["id"], rng.standard_normal((60, 8)).astype(np.float32))
            write(client, bank["id"], rng.standard_normal((10, 8)).astype(np.float32))  # under the threshold
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                state = segments(client, bank["id"])
                if state["segments"] == [{"lo": 0, "hi": 4, "rows": 190}] and state["growing_rows"] == 0:
                    break
                time.sleep(0.2)
            assert state["segments"] == [{"lo": 0, "hi": 4, "rows": 190}] and state["growing_rows"] == 0
            assert_search_is_right(client, bank["id"])
    finally:
        stop_service(server, thread)


def test_a_replaced_or_deleted_item_leaves_its_sealed_segment(api):
    bank = make_bank(api, capacity=100, policy="fifo", merge_threshold=100_000)
    rng = np.random.default_rng(3)
    first = write(api, bank["id"], rng.standard_normal((100, 8)).astype(np.float32))
    api.post(f"/v1/memory-banks/{bank['id']}/merge")
    replacement = rng.standard_normal((10, 8)).astype(np.float32)
    replaced = write(api, bank["id"], replacement)
    assert replaced["ids"] == first["ids"][:10] and replaced["replaced"] == 10  # fifo: the oldest, same ids
    deleted = api.delete(f"/v1/memory-banks/{bank['id']}/items/{first['ids'][50]}").json()["version"]
    assert segments(api, bank["id"])["growing_rows"] == 10  # the replaced items, at their new version
    for key, item_id in zip(replacement, replaced["ids"]):  # found by their new keys, HNSW path included
        answer = api.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [key.tolist()], "k": 1}).json()
        assert answer["results"][0]["ids"] == [item_id]
    feed = replay_feed(api, bank["id"])
    assert len(feed) == 99 and first["ids"][50] not in feed and deleted == 3
    assert_search_is_right(api, bank["id"])


# ------------------------------------------------------------------ concurrency across merges


def test_fifo_versions_and_the_feed_hold_under_four_writers_while_merges_run(service, api):
    bank = make_bank(api, capacity=200, policy="fifo", merge_threshold=30, merge_factor=2)
    written: dict[int, np.ndarray] = {}  # version -> the keys of that write, in order
    versions: list[list[int]] = [[] for _ in range(4)]
    failures: list[str] = []
    done = threading.Event()

    def writer(index: int) -> None:
        rng = np.random.default_rng(100 + index)
        with service.client() as client:
            for _ in range(10):
                keys = rng.standard_normal((12, 8)).astype(np.float32)
                response = client.post(
                    f"/v1/memory-banks/{bank['id']}/items",
                    json={"items": [{"key": k.tolist(), "label": index} for k in keys]},
                )
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                versions[index].append(response.json()["version"])
                written[response.json()["version"]] = keys

    def merger() -> None:  # forced merges on top of the background merger's
        with service.client() as client:
            while not done.is_set():
                response = client.post(f"/v1/memory-banks/{bank['id']}/merge")
                if response.status_code != 200:
                    failures.append(response.text)
                time.sleep(0.05)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    forcing = threading.Thread(target=merger)
    forcing.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    forcing.join()
    assert failures == []
    for mine in versions:
        assert mine == sorted(mine)
    assert sorted(v for mine in versions for v in mine) == list(range(1, 41))

    # fifo over novel keys keeps the last 200 items written, in (version, place in the write) order
    order = [key for version in sorted(written) for key in written[version]]
    table = snapshot(api, bank["id"])
    stored = np.stack(table.column("key").to_numpy(zero_copy_only=False))
    assert len(stored) == 200 == api.get(f"/v1/memory-banks/{bank['id']}").json()["size"]
    assert sorted(map(tuple, np.round(stored, 5))) == sorted(map(tuple, np.round(np.stack(order[-200:]), 5)))
    assert len(set(table.column("id").to_pylist())) == 200
    feed = replay_feed(api, bank["id"])
    assert {i: v for i, (v, _) in feed.items()} == dict(
        zip(table.column("id").to_pylist(), table.column("version").to_pylist())
    )
    state = api.post(f"/v1/memory-banks/{bank['id']}/merge").json()
    assert state["growing_rows"] == 0 and len(state["segments"]) >= 1
    assert_segments_tile(state, 40)
    assert_search_is_right(api, bank["id"])


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"merge_threshold": -1}, "merge_threshold"),
        ({"merge_threshold": 2_000_000}, "merge_threshold"),
        ({"merge_factor": 1}, "merge_factor"),
        ({"merge_factor": 100}, "merge_factor"),
    ],
)
def test_bad_segment_settings_are_refused_by_name(api, overrides, field):
    body = {"name": "b", "dim": 3, "capacity": 10, **overrides}
    response = api.post("/v1/memory-banks", json=body)
    assert response.status_code == 422 and error_of(response)["field"] == field


def test_segment_settings_default_and_an_unsegmented_bank_keeps_one_live_index(service, api):
    default = make_bank(api, name="default")
    assert (default["merge_threshold"], default["merge_factor"]) == (5000, 4)
    live = make_bank(api, name="live", merge_threshold=0)
    write(api, live["id"], np.random.default_rng(4).standard_normal((50, 8)).astype(np.float32))
    response = api.post(f"/v1/memory-banks/{live['id']}/merge")
    assert response.status_code == 409 and error_of(response)["field"] == "bank_id"
    assert segments(api, live["id"]) == {
        "merged": False,
        "sealed_rows": 0,
        "compacted_segments": 0,
        "segments": [],
        "growing_rows": 0,
    }
    with psycopg.connect(service.database_url) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = %s", (f"memory_items_b{live['id']}",)
            )
        ]
    assert f"memory_items_b{live['id']}_hnsw" in names
    assert_search_is_right(api, live["id"])


def test_deleting_a_bank_cancels_its_merge(service, api):
    rng = np.random.default_rng(8)
    bank = make_bank(api, dim=32, capacity=10_000, merge_threshold=100_000, hnsw_ef_construction=400)
    write(api, bank["id"], rng.standard_normal((4000, 32)).astype(np.float32))
    answers: list[int] = []
    merging = threading.Thread(
        target=lambda: answers.append(api.post(f"/v1/memory-banks/{bank['id']}/merge").status_code)
    )
    with service.client() as other:
        merging.start()
        _wait_for_build(service.database_url)
        assert other.delete(f"/v1/memory-banks/{bank['id']}").status_code == 204
    merging.join()
    assert answers[0] in (200, 503)  # cancelled (or done just before)
    assert api.get(f"/v1/memory-banks/{bank['id']}").status_code == 404
    with psycopg.connect(service.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM memory_segments").fetchone() == (0,)
        assert conn.execute("SELECT to_regclass(%s)", (f"memory_items_b{bank['id']}",)).fetchone() == (None,)


# ------------------------------------------------------------------ a merge killed half-way


def _wait_for_build(database_url: str, timeout: float = 60) -> None:
    """Until a segment's index build is running."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            found = conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE query ILIKE 'CREATE INDEX CONCURRENTLY%memory_items_b%'"
            ).fetchone()
            if found:
                return
            time.sleep(0.01)
    raise AssertionError("no merge started")


@pytest.mark.parametrize("victim", ["postgres", "api"])
def test_a_merge_killed_half_way_loses_nothing_and_the_next_merge_recovers(victim):
    """SIGKILL to PostgreSQL (a crash: recovery leaves the half-built index invalid) or to the API process
    (its backend finishes a build no segment names) in the middle of a background merge."""
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((6000, 32)).astype(np.float32)
    with fault_kit.fault_bed({"merge_interval_s": "0.2"}) as bed, bed.api.client(timeout=120) as client:
        bank = make_bank(client, dim=32, capacity=10_000, merge_threshold=5000, hnsw_ef_construction=400)
        for start in range(0, 6000, 2000):
            write(client, bank["id"], keys[start : start + 2000], np.arange(start, start + 2000) % 5)
        _wait_for_build(bed.api.database_url)
        (bed.postgres if victim == "postgres" else bed.api).kill()
        bed.ensure_running()
        fault_kit.wait_for_answer(lambda: client.get(f"/v1/memory-banks/{bank['id']}"), 60)

        table = snapshot(client, bank["id"])  # nothing lost, nothing twice
        assert table.num_rows == 6000 and len(set(table.column("id").to_pylist())) == 6000
        assert client.get(f"/v1/memory-banks/{bank['id']}").json()["version"] == 3
        assert len(replay_feed(client, bank["id"])) == 6000
        assert_search_is_right(client, bank["id"])  # whatever the merge left, search is right

        deadline = time.monotonic() + 120  # the background merger repairs and seals again
        while segments(client, bank["id"])["growing_rows"] and time.monotonic() < deadline:
            time.sleep(0.2)
        state = segments(client, bank["id"])
        assert state["segments"] == [{"lo": 0, "hi": 3, "rows": 6000}] and state["growing_rows"] == 0
        assert segment_indexes(bed.api.database_url, bank["id"]) == {f"memory_items_b{bank['id']}_v0_3": True}
        assert_search_is_right(client, bank["id"])
