"""Item meta: a bounded JSON object written with an item, answered by search when asked, carried by the change feed
and the snapshot, replaced with its item; bad meta is refused naming the field, and nothing is stored."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from eidetic.wire.meta import MAX_META_BYTES
from tests.helpers import error_of

E1, E2, E3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
PART = {"sample": 7, "level": 2, "bbox": [0, 1, 3, 4], "mask": "AAE=", "parent": None, "note": "stroke é"}


def make_bank(api, **overrides) -> dict:
    body = {"name": "parts", "dim": 3, "capacity": 10, "policy": "none", **overrides}
    response = api.post("/v1/memory-banks", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def write(api, bank_id: int, items: list[dict]) -> dict:
    response = api.post(f"/v1/memory-banks/{bank_id}/items", json={"items": items})
    assert response.status_code == 200, response.text
    return response.json()


def test_meta_is_answered_by_search_when_asked_and_by_the_feed_and_the_snapshot(api):
    bank = make_bank(api)
    ids = write(api, bank["id"], [{"key": E1, "label": 1, "meta": PART}, {"key": E2, "label": 2}])["ids"]

    plain = api.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [E1], "k": 2, "exact": True})
    assert "metas" not in plain.json()["results"][0]  # the answer is as before unless asked
    asked = api.post(
        f"/v1/memory-banks/{bank['id']}/search", json={"queries": [E1], "k": 2, "exact": True, "with_meta": True}
    ).json()["results"][0]
    assert asked["ids"] == ids and asked["metas"] == [PART, None]
    hnsw = api.post(f"/v1/memory-banks/{bank['id']}/search", json={"queries": [E2], "k": 1, "with_meta": True})
    assert hnsw.json()["results"][0]["metas"] == [None]

    feed = api.get(f"/v1/memory-banks/{bank['id']}/changes", params={"since": 0}).json()
    assert [item["meta"] for item in feed["items"]] == [PART, None]

    table = pa.ipc.open_stream(api.get(f"/v1/memory-banks/{bank['id']}/snapshot").content).read_all()
    assert table.schema.field("meta").metadata == {b"encoding": b"json"}
    assert [None if text is None else json.loads(text) for text in table.column("meta").to_pylist()] == [PART, None]


def test_a_replaced_item_takes_the_meta_of_the_item_replacing_it(api):
    bank = make_bank(api, capacity=1, policy="fifo", similarity_threshold=0.5)
    (first,) = write(api, bank["id"], [{"key": E1, "meta": {"sample": 1}}])["ids"]
    result = write(api, bank["id"], [{"key": E3, "meta": {"sample": 2}}])
    assert result["replaced"] == 1 and result["ids"] == [first]
    answer = api.post(
        f"/v1/memory-banks/{bank['id']}/search", json={"queries": [E3], "k": 1, "exact": True, "with_meta": True}
    )
    assert answer.json()["results"][0]["metas"] == [{"sample": 2}]


@pytest.mark.parametrize(
    "meta, why",
    [
        ([1, 2], "dictionary"),
        ("sample 7", "dictionary"),
        (3, "dictionary"),
        ({"blob": "x" * MAX_META_BYTES}, "bytes"),
        ({"deep": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}, "deep"),
        ({"text": "a\x00b"}, "NUL"),
        ({"a\x00": 1}, "NUL"),
    ],
)
def test_bad_meta_is_refused_naming_the_field_and_nothing_is_stored(api, meta, why):
    bank = make_bank(api)
    items = [{"key": E1}, {"key": E2, "meta": meta}]
    response = api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == "items.1.meta" and why in error["message"]
    assert api.get(f"/v1/memory-banks/{bank['id']}").json()["size"] == 0


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_meta_with_a_number_that_is_not_finite_is_refused(api, number):
    bank = make_bank(api)
    body = '{"items": [{"key": [1.0, 0.0, 0.0], "meta": {"score": NUMBER}}]}'.replace("NUMBER", number)
    response = api.post(
        f"/v1/memory-banks/{bank['id']}/items", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == "items.0.meta" and "finite" in error_of(response)["message"]


def test_meta_at_the_size_limit_is_stored(api):
    bank = make_bank(api)
    meta = {"blob": "x" * (MAX_META_BYTES - len('{"blob":""}'))}
    write(api, bank["id"], [{"key": E1, "meta": meta}])
    feed = api.get(f"/v1/memory-banks/{bank['id']}/changes", params={"since": 0}).json()
    assert feed["items"][0]["meta"] == meta
