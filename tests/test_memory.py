"""Memory banks: policies applied atomically, capacity held under concurrent writers, exact and HNSW search,
the change feed and the snapshot."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from eidetic.wire.bank_policy import similarity_matrix
from tests.helpers import assert_versions_rise_per_writer, error_of, run_concurrently


def make_bank(api, **overrides) -> dict:
    body = {
        "name": "bank",
        "dim": 3,
        "metric": "cosine",
        "capacity": 3,
        "policy": "same_class_lowest_similarity",
        "similarity_threshold": 0.9,
        **overrides,
    }
    response = api.post("/v1/memory-banks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def write(api, bank_id, items) -> dict:
    response = api.post(f"/v1/memory-banks/{bank_id}/items", json={"items": items})
    assert response.status_code == 200, response.text
    return response.json()


def snapshot(api, bank_id) -> pa.Table:
    response = api.get(f"/v1/memory-banks/{bank_id}/snapshot")
    assert response.status_code == 200
    return pa.ipc.open_stream(response.content).read_all()


def stored(api, bank_id) -> dict[int, tuple]:
    table = snapshot(api, bank_id).to_pylist()
    return {row["id"]: (row["label"], [round(v, 4) for v in row["key"]], row["confidence"]) for row in table}


# ------------------------------------------------------------------ banks


def test_create_read_list_and_delete_banks(service, api):
    bank = make_bank(api, value_dim=10)
    assert (bank["version"], bank["size"], bank["value_dim"]) == (0, 0, 10)
    assert api.get(f"/v1/memory-banks/{bank['id']}").json() == bank
    assert [b["name"] for b in api.get("/v1/memory-banks").json()["banks"]] == ["bank"]
    assert error_of(api.post("/v1/memory-banks", json={"name": "bank", "dim": 3, "capacity": 2}))["code"] == "conflict"
    with service.client(service.new_key("beta", "admin")) as other:
        assert other.get(f"/v1/memory-banks/{bank['id']}").status_code == 404
        assert other.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [[1, 0, 0]]}).status_code == 404
        assert other.delete(f"/v1/memory-banks/{bank['id']}").status_code == 404
    assert api.delete(f"/v1/memory-banks/{bank['id']}").status_code == 204
    assert api.get(f"/v1/memory-banks/{bank['id']}").status_code == 404


# ------------------------------------------------------------------ policies on hand-made examples

E1, E2, E3 = [1, 0, 0], [0, 1, 0], [0, 0, 1]


def test_insert_until_full_then_none_skips(api):
    bank = make_bank(api, policy="none", capacity=2)
    result = write(api, bank["id"], [{"key": E1, "label": 0}, {"key": E2, "label": 1}, {"key": E3, "label": 2}])
    assert (result["inserted"], result["replaced"], result["skipped"], result["version"]) == (2, 0, 1, 1)
    assert result["ids"][2] is None and None not in result["ids"][:2]
    assert api.get(f"/v1/memory-banks/{bank['id']}").json()["size"] == 2


def test_a_full_bank_skips_items_that_are_not_novel(api):
    bank = make_bank(api, capacity=2)
    write(api, bank["id"], [{"key": E1, "label": 0}, {"key": E2, "label": 1}])
    near_e1 = [1, 0.1, 0]  # cosine 0.995 with E1: not novel
    result = write(api, bank["id"], [{"key": near_e1, "label": 0}])
    assert (result["inserted"], result["replaced"], result["skipped"], result["version"]) == (0, 0, 1, 1)


def test_same_class_lowest_similarity_replaces_within_the_class(api):
    bank = make_bank(api, capacity=3)
    first = write(
        api,
        bank["id"],
        [
            {"key": [1, 0.3, 0], "label": 0},  # class 0, closer to the newcomer
            {"key": [0, 0.2, 1], "label": 0},  # class 0, farther: the victim
            {"key": [1, 0.5, 0.5], "label": 1},  # class 1, would be the overall choice otherwise
        ],
    )
    victim = first["ids"][1]
    result = write(api, bank["id"], [{"key": [0.7, 0.7, 0], "label": 0}])
    assert (result["inserted"], result["replaced"], result["skipped"]) == (0, 1, 0)
    assert result["ids"] == [victim]
    assert stored(api, bank["id"])[victim][:2] == (0, [0.7, 0.7, 0.0])


def test_same_class_falls_back_to_the_lowest_similarity_overall(api):
    bank = make_bank(api, capacity=2)
    first = write(api, bank["id"], [{"key": E1, "label": 0}, {"key": E3, "label": 1}])
    result = write(api, bank["id"], [{"key": [0.8, 0.6, 0], "label": 5}])  # no class 5 stored
    assert result["ids"] == [first["ids"][1]]  # E3 is the least similar to the newcomer


def test_least_confident_replaces_the_least_confident_item(api):
    bank = make_bank(api, capacity=3, policy="least_confident")
    first = write(
        api,
        bank["id"],
        [
            {"key": E1, "label": 0, "confidence": 0.9},
            {"key": E2, "label": 1, "confidence": 0.2},
            {"key": E3, "label": 2, "confidence": 0.5},
        ],
    )
    result = write(api, bank["id"], [{"key": [1, 1, 1], "label": 3, "confidence": 0.7}])
    assert result["ids"] == [first["ids"][1]]
    result = write(api, bank["id"], [{"key": [1, -1, 1], "label": 4, "confidence": 0.1}])
    assert result["ids"] == [first["ids"][2]]  # now 0.5 is the lowest


def test_fifo_replaces_the_oldest(api):
    bank = make_bank(api, capacity=2, policy="fifo", similarity_threshold=0.99)
    first = write(api, bank["id"], [{"key": E1, "label": 0}, {"key": E2, "label": 1}])
    second = write(api, bank["id"], [{"key": E3, "label": 2}, {"key": [1, 1, 0], "label": 3}])
    assert second["ids"] == first["ids"]  # E1 went first, then E2
    third = write(api, bank["id"], [{"key": [0, 1, 1], "label": 4}])
    assert third["ids"] == [first["ids"][0]]  # E3 (in E1's slot) is now the oldest


def test_items_of_one_batch_see_each_other(api):
    bank = make_bank(api, capacity=2)
    result = write(
        api, bank["id"], [{"key": E1, "label": 0}, {"key": E2, "label": 0}, {"key": [1, 0.05, 0], "label": 0}]
    )
    assert (result["inserted"], result["skipped"]) == (2, 1)  # the third is a near copy of the first


# ------------------------------------------------------------------ concurrency


def test_capacity_holds_and_versions_only_grow_under_four_concurrent_writers(service, api):
    bank = make_bank(api, dim=8, capacity=50, policy="fifo", similarity_threshold=0.999)
    answers: list[list[dict]] = [[] for _ in range(4)]
    failures: list[str] = []

    def writer(index: int) -> None:
        rng = np.random.default_rng(index)
        with service.client() as client:
            for _ in range(10):
                keys = rng.standard_normal((12, 8)).tolist()
                response = client.post(
                    f"/v1/memory-banks/{bank['id']}/items", json={"items": [{"key": k, "label": index} for k in keys]}
                )
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    answers[index].append(response.json())

    run_concurrently(writer, 4)
    assert failures == []
    assert_versions_rise_per_writer(answers)
    all_versions = [a["version"] for mine in answers for a in mine]
    assert sorted(all_versions) == list(range(1, 41))  # every write changed the bank: one version each
    current = api.get(f"/v1/memory-banks/{bank['id']}").json()
    assert current["size"] == 50 == snapshot(api, bank["id"]).num_rows
    assert current["version"] == 40
    inserted = sum(a["inserted"] for mine in answers for a in mine)
    assert inserted == 50


# ------------------------------------------------------------------ search


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_exact_search_is_the_true_top_k(api, metric):
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((300, 16)).astype(np.float32)
    bank = make_bank(api, dim=16, capacity=1000, metric=metric, policy="none")
    ids = write(api, bank["id"], [{"key": k.tolist(), "label": i % 7} for i, k in enumerate(keys)])["ids"]
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    response = api.post(
        f"/v1/memory-banks/{bank['id']}/search", json={"queries": queries.tolist(), "k": 5, "exact": True}
    )
    results = response.json()["results"]
    for query, result in zip(queries, results):
        sims = similarity_matrix(metric, query, keys)[0]
        expected = np.argsort(-sims, kind="stable")[:5]
        assert result["ids"] == [ids[i] for i in expected]
        np.testing.assert_allclose(result["scores"], sims[expected], rtol=1e-4, atol=1e-5)
        assert result["labels"] == [int(i % 7) for i in expected]


def test_hnsw_search_agrees_with_exact_and_a_label_filter_never_comes_back_short(api):
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((2000, 32)).astype(np.float32)
    labels = np.where(np.arange(2000) % 100 == 0, 99, np.arange(2000) % 5)  # label 99 is rare (20 items)
    bank = make_bank(api, dim=32, capacity=5000, policy="none")
    write(api, bank["id"], [{"key": k.tolist(), "label": int(label)} for k, label in zip(keys, labels)])
    queries = rng.standard_normal((50, 32)).tolist()
    url = f"/v1/memory-banks/{bank['id']}/search"
    exact = api.post(url, json={"queries": queries, "k": 10, "exact": True}).json()["results"]
    approx = api.post(url, json={"queries": queries, "k": 10, "ef_search": 100}).json()["results"]
    recall = np.mean([len(set(a["ids"]) & set(e["ids"])) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9
    filtered = api.post(url, json={"queries": queries, "k": 30, "ef_search": 10, "labels": [99]}).json()["results"]
    assert all(len(r["ids"]) == 20 and set(r["labels"]) == {99} for r in filtered)


def test_prediction_is_a_similarity_weighted_vote(api):
    bank = make_bank(api, capacity=10, policy="none")
    write(
        api, bank["id"], [{"key": E1, "label": 1}, {"key": [1, 0.2, 0], "label": 2}, {"key": [1, 0.25, 0], "label": 2}]
    )
    result = api.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [E1], "k": 3, "exact": True}).json()
    answer = result["results"][0]
    assert answer["prediction"] == 2  # two close neighbours outvote the single closest
    assert answer["confidence"] == pytest.approx(sum(answer["scores"][1:]) / 3, rel=1e-6)
    one = api.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [E1], "k": 1, "exact": True}).json()
    assert one["results"][0]["prediction"] == 1 and one["results"][0]["confidence"] == pytest.approx(1.0)


def test_search_counts_hits_of_the_nearest_item(api):
    bank = make_bank(api, capacity=10, policy="none")
    ids = write(api, bank["id"], [{"key": E1, "label": 1}, {"key": E2, "label": 2}])["ids"]
    api.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [E1, E1, E2], "k": 1})
    hits = {row["id"]: row["hits"] for row in snapshot(api, bank["id"]).to_pylist()}
    assert hits == {ids[0]: 2, ids[1]: 1}


# ------------------------------------------------------------------ change feed and snapshot


def test_the_change_feed_follows_every_change_in_version_order(api):
    bank = make_bank(api, capacity=2, policy="fifo", similarity_threshold=0.99, value_dim=2)
    first = write(api, bank["id"], [{"key": E1, "label": 0, "value": [1, 0]}, {"key": E2, "label": 1}])
    url = f"/v1/memory-banks/{bank['id']}/changes"
    feed = api.get(url, params={"since": 0}).json()
    assert [i["id"] for i in feed["items"]] == first["ids"] and feed["version"] == 1 and feed["next_since"] is None
    assert feed["items"][0]["value"] == [1, 0] and feed["items"][1]["value"] is None
    replaced = write(api, bank["id"], [{"key": E3, "label": 2}])
    feed = api.get(url, params={"since": 1}).json()
    assert [(i["id"], i["version"], i["label"]) for i in feed["items"]] == [(replaced["ids"][0], 2, 2)]
    deleted = api.delete(f"/v1/memory-banks/{bank['id']}/items/{first['ids'][1]}").json()["version"]
    feed = api.get(url, params={"since": 2}).json()
    assert feed["items"] == [] and feed["tombstones"] == [{"id": first["ids"][1], "version": deleted}]
    assert api.get(url, params={"since": deleted}).json() == {
        "items": [],
        "tombstones": [],
        "version": 3,
        "next_since": None,
    }


def test_the_change_feed_pages_at_version_boundaries(api):
    bank = make_bank(api, capacity=100, policy="none")
    for batch in range(5):
        write(api, bank["id"], [{"key": [1, batch, i], "label": batch} for i in range(4)])
    url = f"/v1/memory-banks/{bank['id']}/changes"
    since, seen, pages = 0, [], 0
    while since is not None:
        page = api.get(url, params={"since": since, "limit": 6}).json()
        seen += [(i["version"], i["id"]) for i in page["items"]]
        since = page["next_since"]
        pages += 1
    assert len(seen) == 20 and seen == sorted(seen) and pages == 5  # 4 items a version, 6 a page: one version each


def test_snapshot_streams_the_whole_bank_with_its_version(api):
    bank = make_bank(api, dim=4, capacity=20000, policy="none")
    keys = np.random.default_rng(1).standard_normal((10000, 4)).astype(np.float32)
    write(api, bank["id"], [{"key": k.tolist(), "label": i % 3} for i, k in enumerate(keys)])
    table = snapshot(api, bank["id"])
    assert table.num_rows == 10000
    assert table.schema.metadata[b"bank_version"] == b"1"
    np.testing.assert_array_equal(np.stack(table.column("key").to_numpy(zero_copy_only=False)), keys)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("items", {"items": [{"key": [1, 2]}]}, "items[0].key"),
        ("items", {"items": [{"key": [1, 2, 3]}, {"key": [1, 2]}]}, "items[1].key"),
        ("items", {"items": []}, "items"),
        ("items", {"items": [{"key": [1, 2, 3], "value": [1]}]}, "items[0].value"),
        ("search", {"queries": [[1, 2]], "k": 1}, "queries[0]"),
        ("search", {"queries": [], "k": 1}, "queries"),
        ("search", {"queries": [[1, 2, 3]], "k": 100000}, "k"),
        ("search", {"queries": [[1, 2, 3]], "k": 0}, "k"),
        ("search", {"queries": [[1, 2, 3]], "ef_search": 5000}, "ef_search"),
    ],
)
def test_bad_bank_input_is_named_and_changes_nothing(api, path, body, field):
    bank = make_bank(api)
    write(api, bank["id"], [{"key": E1, "label": 0}])
    response = api.post(f"/v1/memory-banks/{bank['id']}/{path}", json=body)
    assert 400 <= response.status_code < 500
    assert error_of(response)["field"] == field
    current = api.get(f"/v1/memory-banks/{bank['id']}").json()
    assert (current["version"], current["size"]) == (1, 1)


def test_nan_keys_and_queries_are_refused(api):
    bank = make_bank(api)
    for path, body in (("items", b'{"items": [{"key": [1, NaN, 0]}]}'), ("search", b'{"queries": [[1, 0, Infinity]]}')):
        response = api.post(
            f"/v1/memory-banks/{bank['id']}/{path}", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422 and error_of(response)["code"] == "non_finite_value"
    assert api.get(f"/v1/memory-banks/{bank['id']}").json()["version"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "dim": 0, "capacity": 1},
        {"name": "x", "dim": 3000, "capacity": 1},
        {"name": "x", "dim": 3, "capacity": 0},
        {"name": "x", "dim": 3, "capacity": 1, "metric": "hamming"},
        {"name": "x", "dim": 3, "capacity": 1, "policy": "random"},
    ],
)
def test_bad_bank_definitions(api, body):
    assert api.post("/v1/memory-banks", json=body).status_code == 422


def test_unknown_bank_and_item(api):
    assert api.post("/v1/memory-banks/424242/search", json={"queries": [[1]]}).status_code == 404
    bank = make_bank(api)
    assert error_of(api.delete(f"/v1/memory-banks/{bank['id']}/items/999"))["field"] == "item_id"


def test_exact_search_stays_exact_after_the_statement_is_prepared(api):
    """psycopg prepares a statement after a few runs; the exact path must not inherit the HNSW plan."""
    rng = np.random.default_rng(9)
    keys = rng.standard_normal((3000, 32)).astype(np.float32)
    bank = make_bank(api, dim=32, capacity=5000, policy="none", hnsw_m=4, hnsw_ef_construction=8)
    ids = write(api, bank["id"], [{"key": k.tolist(), "label": 0} for k in keys])["ids"]
    queries = rng.standard_normal((16, 32)).astype(np.float32)
    url = f"/v1/memory-banks/{bank['id']}/search"
    for _ in range(8):  # HNSW searches first, so a cached plan would be the index scan
        api.post(url, json={"queries": queries.tolist(), "k": 10, "ef_search": 10})
    for _ in range(3):
        results = api.post(url, json={"queries": queries.tolist(), "k": 10, "exact": True}).json()["results"]
        for query, result in zip(queries, results):
            expected = np.argsort(-similarity_matrix("cosine", query, keys)[0], kind="stable")[:10]
            assert result["ids"] == [ids[i] for i in expected]
