"""Bank writes with an Arrow IPC stream body: the same items, versions and change feed as the same JSON
write, the same refusals of bad input (naming the problem, changing nothing), and capacity and versions
held under concurrent Arrow writers (through the client, which sends Arrow for numpy keys)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from eidetic.client import EideticClient, _items_arrow
from eidetic.wire.bank_items import items_to_arrow
from tests.helpers import assert_versions_rise_per_writer, error_of, run_concurrently

ARROW = {"content-type": "application/vnd.apache.arrow.stream"}
DIM = 8


def make_bank(api, **overrides) -> dict:
    body = {"name": "arrow", "dim": DIM, "capacity": 12, "policy": "none", **overrides}
    response = api.post("/v1/memory-banks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def post_arrow(api, bank_id: int, body: bytes):
    return api.post(f"/v1/memory-banks/{bank_id}/items", content=body, headers=ARROW)


def batches(seed: int = 0) -> list[dict]:
    """Three batches with every optional column, some items lacking them, and a repeated key (skipped when full)."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(3):
        keys = rng.standard_normal((7, DIM)).astype(np.float32)
        if b == 2:
            keys[3] = keys[1]  # not novel once the bank is full: the batch sees its own items
        out.append(
            {
                "keys": keys,
                "labels": [int(i % 3) if i != 2 else None for i in range(7)],
                "values": [None if i % 4 == 0 else rng.standard_normal(2).astype(np.float32) for i in range(7)],
                "confidences": [None if i == 5 else float(np.float32(rng.random())) for i in range(7)],
                "metas": [{"batch": b, "i": i} if i % 2 else None for i in range(7)],
            }
        )
    return out


def as_json(batch: dict) -> dict:
    items = []
    for i, key in enumerate(batch["keys"]):
        item: dict = {"key": key.tolist(), "label": batch["labels"][i], "confidence": batch["confidences"][i]}
        if batch["values"][i] is not None:
            item["value"] = batch["values"][i].tolist()
        if batch["metas"][i] is not None:
            item["meta"] = batch["metas"][i]
        items.append(item)
    return {"items": items}


def renumbered(answers: list[dict], feed: dict) -> tuple[list, list]:
    """Answers and feed with item ids replaced by their order of first appearance (the two banks' ids differ)."""
    numbers: dict[int, int] = {}

    def number(item_id: int | None) -> int | None:
        return None if item_id is None else numbers.setdefault(item_id, len(numbers))

    written = [{**a, "ids": [number(i) for i in a["ids"]]} for a in answers]
    items = [{**item, "id": number(item["id"]), "bank_id": None} for item in feed["items"]]
    return written, items


@pytest.mark.parametrize("policy", ["fifo", "least_confident"])
def test_an_arrow_write_stores_what_the_same_json_write_stores(api, policy):
    options = {"policy": policy, "similarity_threshold": 0.9, "value_dim": 2}
    by_json, by_arrow = make_bank(api, **options), make_bank(api, **{**options, "name": "arrow-2"})
    json_answers, arrow_answers = [], []
    for batch in batches():
        response = api.post(f"/v1/memory-banks/{by_json['id']}/items", json=as_json(batch))
        assert response.status_code == 200, response.text
        json_answers.append(response.json())
        response = post_arrow(api, by_arrow["id"], items_to_arrow(**batch))
        assert response.status_code == 200, response.text
        arrow_answers.append(response.json())
    assert sum(a["replaced"] for a in json_answers) > 0 and sum(a["skipped"] for a in json_answers) > 0
    feeds = [api.get(f"/v1/memory-banks/{b['id']}/changes", params={"since": 0}).json() for b in (by_json, by_arrow)]
    assert renumbered(json_answers, feeds[0]) == renumbered(arrow_answers, feeds[1])
    assert feeds[0]["version"] == feeds[1]["version"] == 3
    banks = [api.get(f"/v1/memory-banks/{b['id']}").json() for b in (by_json, by_arrow)]
    assert banks[0]["size"] == banks[1]["size"] == 12


def _keys(n: int = 2) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[:n] + 0.5


def _table_body(columns: dict) -> bytes:
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _key_column(keys: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1)), keys.shape[1])


def _with(row: int, column: int, value: float) -> np.ndarray:
    keys = _keys()
    keys[row, column] = value
    return keys


BAD = [
    ("NaN key", items_to_arrow(_with(1, 2, np.nan)), 422, "items[1].key"),
    ("inf key", items_to_arrow(_with(0, 0, np.inf)), 422, "items[0].key"),
    ("wrong dim", items_to_arrow(np.ones((2, DIM + 1), dtype=np.float32)), 422, "items[0].key"),
    ("too many items", items_to_arrow(np.ones((10_001, DIM), dtype=np.float32)), 422, "items"),
    ("unknown column", _table_body({"key": _key_column(_keys()), "lable": [1, 2]}), 422, "items.lable"),
    ("no key column", _table_body({"label": [1, 2]}), 422, "items.key"),
    ("null key", _table_body({"key": pa.array([[1.0] * DIM, None], pa.list_(pa.float32()))}), 422, "items.key"),
    (
        "ragged keys",
        _table_body({"key": pa.array([[1.0] * DIM, [1.0] * 3], pa.list_(pa.float32()))}),
        422,
        "items[1].key",
    ),
    ("string keys", _table_body({"key": pa.array([["a"] * DIM], pa.list_(pa.string()))}), 422, "items.key"),
    ("label of text", _table_body({"key": _key_column(_keys()), "label": ["a", "b"]}), 422, "items.label"),
    ("label past int32", _table_body({"key": _key_column(_keys()), "label": [1, 2**40]}), 422, "items[1].label"),
    ("NaN confidence", items_to_arrow(_keys(), confidences=[0.5, float("nan")]), 422, "items[1].confidence"),
    ("value, no value_dim", items_to_arrow(_keys(), values=[None, np.ones(2)]), 422, "items[1].value"),
    ("meta not an object", _table_body({"key": _key_column(_keys()), "meta": [None, "[1, 2]"]}), 422, "items[1].meta"),
    ("meta not JSON", _table_body({"key": _key_column(_keys()), "meta": ["{", None]}), 422, "items[0].meta"),
    ("not Arrow", b"\x00\x01 not an arrow stream", 400, "body"),
]


@pytest.mark.parametrize("case, body, status, field", BAD, ids=[case[0] for case in BAD])
def test_bad_arrow_bodies_are_named_and_change_nothing(api, case, body, status, field):
    bank = make_bank(api)
    assert post_arrow(api, bank["id"], items_to_arrow(_keys(1) * 3)).status_code == 200
    response = post_arrow(api, bank["id"], body)
    assert response.status_code == status, response.text
    assert error_of(response)["field"] == field
    current = api.get(f"/v1/memory-banks/{bank['id']}").json()
    assert (current["version"], current["size"]) == (1, 1)


def test_another_media_type_is_refused_with_415(api):
    bank = make_bank(api)
    response = api.post(f"/v1/memory-banks/{bank['id']}/items", content=b"1,2", headers={"content-type": "text/csv"})
    assert response.status_code == 415 and error_of(response)["field"] == "Content-Type"
    assert api.get(f"/v1/memory-banks/{bank['id']}").json()["version"] == 0


def test_capacity_and_versions_hold_under_four_concurrent_arrow_writers(service, api):
    bank = make_bank(api, capacity=50, policy="fifo", similarity_threshold=0.999)
    answers: list[list[dict]] = [[] for _ in range(4)]
    failures: list[str] = []

    def writer(index: int) -> None:
        rng = np.random.default_rng(index)
        with EideticClient(service.base_url, service.write_key) as client:
            for _ in range(10):
                items = [{"key": k, "label": index} for k in rng.standard_normal((12, DIM)).astype(np.float32)]
                assert _items_arrow(items) is not None  # numpy keys: the client sends Arrow
                try:
                    answers[index].append(client.write_items(bank["id"], items))
                except Exception as error:  # reported below, on the test thread
                    failures.append(repr(error))

    run_concurrently(writer, 4)
    assert failures == []
    assert_versions_rise_per_writer(answers)
    assert sorted(a["version"] for mine in answers for a in mine) == list(range(1, 41))
    current = api.get(f"/v1/memory-banks/{bank['id']}").json()
    assert (current["size"], current["version"]) == (50, 40)
    assert sum(a["inserted"] for mine in answers for a in mine) == 50
    feed = api.get(f"/v1/memory-banks/{bank['id']}/changes", params={"since": 0, "limit": 1000}).json()
    assert len(feed["items"]) == 50 and {i["label"] for i in feed["items"]} <= {0, 1, 2, 3}


def test_the_client_sends_json_for_lists_and_the_service_names_an_unknown_field(service, api):
    bank = make_bank(api)
    with EideticClient(service.base_url, service.write_key) as client:
        assert _items_arrow([{"key": [1.0] * DIM}]) is None
        assert client.write_items(bank["id"], [{"key": [1.0] * DIM, "label": 1}])["inserted"] == 1
        assert _items_arrow([{"key": np.ones(DIM), "lable": 1}]) is None  # JSON, so the service names it
        with pytest.raises(Exception, match="lable"):
            client.write_items(bank["id"], [{"key": np.ones(DIM).tolist(), "lable": 1}])
