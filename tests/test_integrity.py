"""Integrity under bad input: one validation path for every format, never a 5xx, never a silent change.

Each test names the defect it guards: a value refused in one format is refused in all,
text that PostgreSQL cannot store is refused up front, a batch id names its content,
and a typo in a field or a parameter is an error rather than a default.
"""

from __future__ import annotations

import io
import json

import numpy as np
import psycopg
import pyarrow as pa
import pytest

from eidetic.wire.formats import ARROW_STREAM, NPY, rows_to_arrow
from tests.helpers import activations_path, error_of, make_layer, post_arrow, random_rows, stored_batches, stored_rows

DIM = 4
INT64_MAX = 2**63 - 1


@pytest.fixture
def layer(service, api):
    """A layer of dimension 4 holding one batch of 10 rows, which no refused request may change."""
    run_id, layer_id = make_layer(api, dim=DIM)
    assert post_arrow(api, run_id, layer_id, random_rows(10, DIM), batch_id="kept").status_code == 201
    yield run_id, layer_id
    assert stored_rows(service.database_url, layer_id) == 10, "a refused batch changed the store"
    assert stored_batches(service.database_url, layer_id) == 1


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def send(api, layer, content: bytes, content_type: str, **params):
    return api.post(activations_path(*layer), content=content, headers={"content-type": content_type}, params=params)


def structured(n: int, **fields: tuple[str, object]) -> np.ndarray:
    """A structured .npy batch of n rows: float32 values plus the given (dtype, value) fields."""
    dtype = [("values", np.float32, (DIM,))] + [(name, kind) for name, (kind, _) in fields.items()]
    array = np.zeros(n, dtype=dtype)
    array["values"] = np.random.default_rng(1).standard_normal((n, DIM))
    for name, (_, value) in fields.items():
        array[name] = value
    return array


def arrow_body(rows: int = 2, metadata: dict[bytes, bytes] | None = None, **columns: pa.Array) -> bytes:
    """An Arrow IPC stream of `rows` rows of ones, with extra columns and schema metadata as given."""
    values = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(rows * DIM, dtype=np.float32)), DIM)
    table = pa.table({"values": values, **columns}).replace_schema_metadata(metadata)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


# ---------------------------------------------------------------- 1. integers are never cast silently


@pytest.mark.parametrize(
    "name, kind, value, field",
    [
        ("label", np.int64, 2**40 + 3, "rows[0].label"),
        ("epoch", np.int64, -(2**31) - 1, "rows[0].epoch"),
        ("sample_id", np.uint64, 2**64 - 1, "rows[0].sample_id"),
        ("step", np.uint64, 2**63, "rows[0].step"),
        ("label", np.float64, 3.0, "label"),  # a column of the wrong type is named as a column
        ("label", np.bool_, True, "label"),
    ],
)
def test_npy_integer_fields_are_range_and_type_checked(api, layer, name, kind, value, field):
    response = send(api, layer, npy_bytes(structured(3, **{name: (kind, value)})), NPY)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field


def test_sample_id_start_may_not_run_past_int64(service, api, layer):
    response = send(api, layer, npy_bytes(random_rows(3, DIM).values), NPY, sample_id_start=INT64_MAX - 1)
    assert response.status_code == 422 and error_of(response)["field"] == "sample_id_start"
    ok = send(api, layer, npy_bytes(random_rows(2, DIM).values), NPY, sample_id_start=INT64_MAX - 1, batch_id="edge")
    assert ok.status_code == 201
    with psycopg.connect(service.database_url) as conn:
        ids = conn.execute(
            "SELECT array_agg(sample_id ORDER BY sample_id) FROM activations a JOIN ingest_batches b "
            "ON a.batch_seq = b.id WHERE b.batch_id = 'edge'"
        ).fetchone()[0]
        assert ids == [INT64_MAX - 1, INT64_MAX]
        conn.execute(
            "DELETE FROM activations WHERE batch_seq = (SELECT id FROM ingest_batches WHERE batch_id = 'edge')"
        )
        conn.execute("DELETE FROM ingest_batches WHERE batch_id = 'edge'")


@pytest.mark.parametrize(
    "row, field",
    [
        ({"values": [1, 2, 3, 4], "label": 2**40 + 3}, "rows[0].label"),
        ({"values": [1, 2, 3, 4], "label": "3"}, "rows[0].label"),
        ({"values": [1, 2, 3, 4], "label": True}, "rows[0].label"),
        ({"values": [1, 2, 3, 4], "step": 1.0}, "rows[0].step"),
        ({"values": [1, 2, "3.5", 4]}, "rows[0].values"),
        ({"values": [1, 2, True, 4]}, "rows[0].values"),
        ({"values": [1, 2, None, 4]}, "rows[0].values"),
        ({"values": [[1, 2], [3, 4]]}, "rows[0].values"),
        ({"values": [1, 2, 3, [4]]}, "rows[0].values"),
    ],
)
def test_json_numbers_are_strict(api, layer, row, field):
    response = api.post(activations_path(*layer), json={"rows": [row]})
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field


@pytest.mark.parametrize(
    "column, field",
    [
        (pa.array([2**40 + 3, 1], type=pa.int64()), "rows[0].label"),
        (pa.array([1, 2**31], type=pa.uint64()), "rows[1].label"),
        (pa.array([1.0, 2.0], type=pa.float64()), "label"),
        (pa.array([True, False]), "label"),
    ],
)
def test_arrow_integer_columns_are_range_and_type_checked(api, layer, column, field):
    response = send(api, layer, arrow_body(label=column), ARROW_STREAM)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field


def test_the_same_out_of_range_value_is_refused_in_every_format(api, layer):
    """One validation path: the same error, field and message whatever the format."""
    big = 2**40 + 3
    as_json = api.post(activations_path(*layer), json={"rows": [{"values": [1, 2, 3, 4], "label": big}]})
    as_npy = send(api, layer, npy_bytes(structured(1, label=(np.int64, big))), NPY)
    as_arrow = send(api, layer, arrow_body(label=pa.array([big, big], type=pa.int64())), ARROW_STREAM)
    errors = [error_of(response) for response in (as_json, as_npy, as_arrow)]
    assert {response.status_code for response in (as_json, as_npy, as_arrow)} == {422}
    assert errors[0] == errors[1] == errors[2], errors


# ---------------------------------------------------------------- 2. no input makes a 5xx


def test_lone_surrogates_in_json_text_are_refused(api, layer):
    body = b'{"batch_id": "b-\\ud800", "rows": [{"values": [1, 2, 3, 4]}]}'
    response = send(api, layer, body, "application/json")
    assert response.status_code == 422 and error_of(response)["field"] == "batch_id"
    body = b'{"rows": [{"values": [1, 2, 3, 4], "task": "A\\udfff"}]}'
    response = send(api, layer, body, "application/json")
    assert response.status_code == 422 and error_of(response)["field"] == "rows[0].task"


def test_lone_surrogates_in_pydantic_bodies_are_refused(api):
    response = api.post("/v1/runs", content=b'{"name": "r\\ud800"}', headers={"content-type": "application/json"})
    assert response.status_code == 422 and error_of(response)["field"] == "name"


def test_invalid_utf8_in_an_arrow_string_column_is_refused(api, layer):
    task = pa.array([b"ok", b"\xff\xfe"], type=pa.binary()).view(pa.string())
    response = send(api, layer, arrow_body(task=task), ARROW_STREAM)
    assert 400 <= response.status_code < 500, response.text
    assert error_of(response)["field"] in {"task", "body"}


def test_invalid_utf8_in_the_arrow_batch_id_is_refused(api, layer):
    response = send(api, layer, arrow_body(1, {b"batch_id": b"\xff\xfe"}), ARROW_STREAM)
    assert response.status_code == 422 and error_of(response)["field"] == "batch_id"


@pytest.mark.parametrize("path", ["activations", "runs"])
def test_deeply_nested_json_is_refused(api, layer, path):
    body = b'{"rows": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    url = activations_path(*layer) if path == "activations" else "/v1/runs"
    response = api.post(url, content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert error_of(response)["code"] in {"malformed_body", "invalid_input"}


@pytest.fixture
def cosine_bank(api):
    response = api.post("/v1/memory-banks", json={"name": "cos", "dim": 3, "metric": "cosine", "capacity": 10})
    assert response.status_code == 201, response.text
    bank_id = response.json()["id"]
    written = api.post(f"/v1/memory-banks/{bank_id}/items", json={"items": [{"key": [1, 0, 0], "label": 1}]})
    assert written.status_code == 200, written.text
    return bank_id


def test_a_zero_key_is_refused_by_a_cosine_bank(api, cosine_bank):
    response = api.post(
        f"/v1/memory-banks/{cosine_bank}/items", json={"items": [{"key": [1, 1, 1]}, {"key": [0, 0, 0]}]}
    )
    assert response.status_code == 422
    assert error_of(response)["code"] == "zero_vector" and error_of(response)["field"] == "items[1].key"
    assert api.get(f"/v1/memory-banks/{cosine_bank}").json()["size"] == 1


@pytest.mark.parametrize("exact", [True, False])
def test_a_zero_query_is_refused_by_a_cosine_bank(api, cosine_bank, exact):
    response = api.post(
        f"/v1/memory-banks/{cosine_bank}/search", json={"queries": [[1, 0, 0], [0, 0, 0]], "exact": exact}
    )
    assert response.status_code == 422
    assert error_of(response)["code"] == "zero_vector" and error_of(response)["field"] == "queries[1]"


@pytest.mark.parametrize("exact", [True, False])
def test_a_zero_key_already_stored_cannot_break_search(service, api, cosine_bank, exact):
    """Rows written before zero keys were refused: cosine similarity with them is defined as 0."""
    with psycopg.connect(service.database_url) as conn:
        conn.execute(
            f"INSERT INTO memory_items_b{cosine_bank} (bank_id, key, label, version, inserted_version) "
            "VALUES (%s, '[0,0,0]', 2, 1, 1)",
            (cosine_bank,),
        )
        conn.execute("UPDATE memory_banks SET size = size + 1 WHERE id = %s", (cosine_bank,))
    response = api.post(f"/v1/memory-banks/{cosine_bank}/search", json={"queries": [[1, 0, 0]], "k": 2, "exact": exact})
    assert response.status_code == 200, response.text
    scores = response.json()["results"][0]["scores"]
    assert scores[0] == pytest.approx(1.0) and scores[-1] == 0.0


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_vectors_too_large_to_compare_are_refused(api, metric):
    bank = api.post("/v1/memory-banks", json={"name": metric, "dim": 2, "metric": metric, "capacity": 4}).json()["id"]
    response = api.post(f"/v1/memory-banks/{bank}/items", json={"items": [{"key": [3e38, 3e38]}]})
    assert response.status_code == 422 and error_of(response)["field"] == "items[0].key"
    response = api.post(f"/v1/memory-banks/{bank}/search", json={"queries": [[3e38, -3e38]]})
    assert response.status_code == 422 and error_of(response)["field"] == "queries[0]"


# ---------------------------------------------------------------- 3. a batch id names its content


@pytest.mark.parametrize("transport", ["arrow", "json", "npy"])
def test_same_batch_id_other_content_is_a_conflict(service, api, layer, transport):
    first = random_rows(5, DIM, seed=1)
    other = random_rows(5, DIM, seed=2)  # same row count, other values

    def post(rows):
        if transport == "arrow":
            return post_arrow(api, *layer, rows, batch_id="b1")
        if transport == "npy":
            return send(api, layer, npy_bytes(rows.values), NPY, batch_id="b1")
        body = {"batch_id": "b1", "rows": [{"values": row} for row in rows.values.tolist()]}
        return api.post(activations_path(*layer), json=body)

    assert post(first).status_code == 201
    assert post(first).status_code == 200 and post(first).json()["duplicate"] is True
    response = post(other)
    assert response.status_code == 409 and error_of(response)["code"] == "batch_id_conflict"
    with psycopg.connect(service.database_url) as conn:
        stored = conn.execute(
            "SELECT array_agg(values::real[] ORDER BY row_no) FROM activations a JOIN ingest_batches b "
            "ON a.batch_seq = b.id WHERE b.batch_id = 'b1'"
        ).fetchone()[0]
    np.testing.assert_array_equal(np.array(stored, dtype=np.float32), first.values)
    # cleanup for the fixture's check: the extra batch is legitimate
    with psycopg.connect(service.database_url) as conn:
        conn.execute("DELETE FROM activations WHERE batch_seq = (SELECT id FROM ingest_batches WHERE batch_id = 'b1')")
        conn.execute("DELETE FROM ingest_batches WHERE batch_id = 'b1'")


def test_metadata_is_part_of_the_content(api, layer, service):
    rows = random_rows(3, DIM, seed=4, label=1)
    relabelled = random_rows(3, DIM, seed=4, label=2)
    assert post_arrow(api, *layer, rows, batch_id="m1").status_code == 201
    response = post_arrow(api, *layer, relabelled, batch_id="m1")
    assert response.status_code == 409 and error_of(response)["code"] == "batch_id_conflict"
    with psycopg.connect(service.database_url) as conn:
        conn.execute("DELETE FROM activations WHERE batch_seq = (SELECT id FROM ingest_batches WHERE batch_id = 'm1')")
        conn.execute("DELETE FROM ingest_batches WHERE batch_id = 'm1'")


def test_a_retry_in_another_format_is_a_duplicate(api, layer, service):
    rows = random_rows(3, DIM, seed=5, label=[1, None, 3], task="A", step=7)
    assert post_arrow(api, *layer, rows, batch_id="x1").status_code == 201
    body = {
        "batch_id": "x1",
        "rows": [
            {"values": v, "label": label, "task": "A", "step": 7}
            for v, label in zip(rows.values.tolist(), [1, None, 3])
        ],
    }
    response = api.post(activations_path(*layer), json=body)
    assert response.status_code == 200 and response.json()["duplicate"] is True
    with psycopg.connect(service.database_url) as conn:
        conn.execute("DELETE FROM activations WHERE batch_seq = (SELECT id FROM ingest_batches WHERE batch_id = 'x1')")
        conn.execute("DELETE FROM ingest_batches WHERE batch_id = 'x1'")


def test_an_empty_batch_id_is_refused(api, layer):
    response = api.post(activations_path(*layer), json={"batch_id": "", "rows": [{"values": [1, 2, 3, 4]}]})
    assert response.status_code == 422 and error_of(response)["field"] == "batch_id"
    response = send(api, layer, arrow_body(1, {b"batch_id": b""}), ARROW_STREAM)
    assert response.status_code == 422 and error_of(response)["field"] == "batch_id"


def test_two_different_batch_ids_in_one_request_are_refused(api, layer):
    response = api.post(
        activations_path(*layer), params={"batch_id": "a"}, json={"batch_id": "b", "rows": [{"values": [1, 2, 3, 4]}]}
    )
    assert response.status_code == 422 and error_of(response)["field"] == "batch_id"


# ---------------------------------------------------------------- 4. typos are errors, not defaults


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/memory-banks", {"name": "b", "dim": 2, "capacity": 3, "polcy": "fifo"}, "polcy"),
        ("/v1/runs", {"name": "r", "confg": {}}, "confg"),
    ],
)
def test_unknown_body_fields_are_refused(api, path, body, field):
    response = api.post(path, json=body)
    assert response.status_code == 422 and error_of(response)["field"] == field


def test_unknown_quantile_fields_are_refused(api, layer):
    response = api.post(f"/v1/runs/{layer[0]}/layers/{layer[1]}/quantiles", json={"n_quantiles": 4, "mehtod": "sketch"})
    assert response.status_code == 422 and error_of(response)["field"] == "mehtod"


@pytest.mark.parametrize("row, field", [({"lable": 3}, "rows[0].lable"), ({"batchid": "x"}, "batchid")])
def test_unknown_fields_of_json_ingest_are_refused(api, layer, row, field):
    if field == "batchid":
        body = {"batchid": "x", "rows": [{"values": [1, 2, 3, 4]}]}
    else:
        body = {"rows": [{"values": [1, 2, 3, 4], **row}]}
    response = api.post(activations_path(*layer), json=body)
    assert response.status_code == 422 and error_of(response)["field"] == field


def test_unknown_arrow_columns_and_npy_fields_are_refused(api, layer):
    response = send(api, layer, arrow_body(lable=pa.array([1, 2], type=pa.int32())), ARROW_STREAM)
    assert response.status_code == 422 and error_of(response)["field"] == "lable"
    response = send(api, layer, npy_bytes(structured(2, lable=(np.int32, 3))), NPY)
    assert response.status_code == 422 and error_of(response)["field"] == "lable"


@pytest.mark.parametrize(
    "method, path, params",
    [
        ("get", "activations", {"tsk": "A"}),
        ("get", "summary", {"lable": 1}),
        ("post", "activations", {"bathc_id": "x"}),
        ("get", "/v1/runs", {"limt": 3}),
    ],
)
def test_unknown_query_parameters_are_refused(api, layer, method, path, params):
    url = path if path.startswith("/") else f"/v1/runs/{layer[0]}/layers/{layer[1]}/{path}"
    if method == "get":
        response = api.get(url, params=params)
    else:
        response = send(api, layer, rows_to_arrow(random_rows(1, DIM)), ARROW_STREAM, **params)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == next(iter(params))


# ---------------------------------------------------------------- 8. who you are before what you sent


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-key"}])
def test_malformed_bodies_without_a_valid_key_get_401(service, layer, headers):
    import httpx

    with httpx.Client(base_url=service.base_url, headers=headers) as anonymous:
        for body, kind in [(b"{not json", "application/json"), (b"\x00garbage", ARROW_STREAM)]:
            response = anonymous.post(activations_path(*layer), content=body, headers={"content-type": kind})
            assert response.status_code == 401, response.text
        response = anonymous.post("/v1/runs", content=b"{broken", headers={"content-type": "application/json"})
        assert response.status_code == 401


# ---------------------------------------------------------------- 9. the schema tells the truth


def test_the_openapi_schema_documents_the_real_error_envelope(api):
    schema = api.get("/openapi.json").json()
    text = json.dumps(schema)
    for ref in set(part.split('"')[0] for part in text.split('"$ref": "')[1:]):
        node = schema
        for key in ref.removeprefix("#/").split("/"):
            assert key in node, f"unresolved $ref {ref}"
            node = node[key]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorOut", (path, method, status)
            if path.startswith("/v1"):
                assert "401" in operation["responses"], (path, method)


# ---------------------------------------------------------------- 10. expected events are not errors


def test_a_client_gone_mid_upload_is_logged_at_info_without_a_traceback(service, layer, caplog):
    import logging
    import socket
    import time
    from urllib.parse import urlsplit

    host, port = urlsplit(service.base_url).hostname, urlsplit(service.base_url).port
    path = activations_path(*layer)
    with caplog.at_level(logging.INFO):
        with socket.create_connection((host, port)) as sock:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {service.write_key}\r\n"
                f"Content-Type: {ARROW_STREAM}\r\nContent-Length: 1000000\r\n\r\n"
            )
            sock.sendall(head.encode() + b"x" * 1000)
            time.sleep(0.3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("disconnected" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    assert any("disconnected" in record.getMessage() for record in caplog.records), caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text
