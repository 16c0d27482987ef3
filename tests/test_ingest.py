"""Ingest: three formats, exactly-once per batch id, all-or-nothing, concurrent writers."""

import io
import threading

import httpx
import numpy as np
import psycopg
import pyarrow as pa

from app.ingest import ingest
from app.runs import find_layer
from eidetic.wire.formats import ARROW_STREAM, NPY
from tests.helpers import (
    activations_path,
    error_of,
    make_layer,
    post_arrow,
    random_rows,
    stored_batches,
    stored_rows,
)


def read_all(api, run_id, layer_id, **params) -> list[dict]:
    rows, cursor = [], None
    while True:
        page = api.get(
            activations_path(run_id, layer_id),
            params={**params, "limit": 1000, **({"cursor": cursor} if cursor else {})},
        ).json()
        rows += page["rows"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows


def test_arrow_batch_is_stored_with_its_metadata(service, api):
    run_id, layer_id = make_layer(api, dim=5)
    rows = random_rows(64, 5, sample_id=np.arange(100, 164), step=7, epoch=1, label=np.arange(64) % 3, task="B")
    response = post_arrow(api, run_id, layer_id, rows, batch_id="w0-1")
    assert response.status_code == 201
    assert response.json() == {"batch_id": "w0-1", "rows": 64, "duplicate": False}
    stored = read_all(api, run_id, layer_id)
    assert [r["sample_id"] for r in stored] == list(range(100, 164))
    assert {r["step"] for r in stored} == {7} and {r["task"] for r in stored} == {"B"}
    assert [r["label"] for r in stored] == [i % 3 for i in range(64)]
    np.testing.assert_array_equal(np.array([r["values"] for r in stored], dtype=np.float32), rows.values)


def test_json_batch_with_nulls_and_generated_batch_id(api):
    run_id, layer_id = make_layer(api, dim=3)
    body = {"rows": [{"values": [1, 2, 3], "label": 4, "task": "A"}, {"values": [0.5, 0.25, 0.125]}]}
    response = api.post(activations_path(run_id, layer_id), json=body)
    assert response.status_code == 201
    assert len(response.json()["batch_id"]) == 32
    stored = read_all(api, run_id, layer_id)
    assert stored[0]["label"] == 4 and stored[0]["task"] == "A"
    assert stored[1]["label"] is None and stored[1]["task"] is None and stored[1]["sample_id"] is None
    assert stored[1]["values"] == [0.5, 0.25, 0.125]


def test_npy_matrix_takes_metadata_from_query_parameters(api):
    run_id, layer_id = make_layer(api, dim=4)
    matrix = np.arange(40, dtype=np.float32).reshape(10, 4)
    buffer = io.BytesIO()
    np.save(buffer, matrix)
    params = {"batch_id": "npy-1", "step": 3, "epoch": 2, "label": 9, "task": "A", "sample_id_start": 50}
    response = api.post(
        activations_path(run_id, layer_id), content=buffer.getvalue(), params=params, headers={"content-type": NPY}
    )
    assert response.status_code == 201, response.text
    stored = read_all(api, run_id, layer_id)
    assert [r["sample_id"] for r in stored] == list(range(50, 60))
    assert {(r["step"], r["epoch"], r["label"], r["task"]) for r in stored} == {(3, 2, 9, "A")}
    np.testing.assert_array_equal(np.array([r["values"] for r in stored]), matrix)


def test_structured_npy_carries_per_row_metadata(api):
    run_id, layer_id = make_layer(api, dim=2)
    records = np.zeros(3, dtype=[("values", "<f4", (2,)), ("label", "<i4"), ("sample_id", "<i8")])
    records["values"] = [[1, 2], [3, 4], [5, 6]]
    records["label"] = [7, 8, 9]
    records["sample_id"] = [10, 11, 12]
    buffer = io.BytesIO()
    np.save(buffer, records)
    response = api.post(activations_path(run_id, layer_id), content=buffer.getvalue(), headers={"content-type": NPY})
    assert response.status_code == 201, response.text
    stored = read_all(api, run_id, layer_id)
    assert [(r["label"], r["sample_id"], r["values"]) for r in stored] == [
        (7, 10, [1, 2]),
        (8, 11, [3, 4]),
        (9, 12, [5, 6]),
    ]


def test_a_retried_batch_is_acknowledged_and_stored_once(service, api):
    run_id, layer_id = make_layer(api, dim=8)
    rows = random_rows(200, 8)
    first = post_arrow(api, run_id, layer_id, rows, batch_id="w0-17")
    retry = post_arrow(api, run_id, layer_id, rows, batch_id="w0-17")
    assert first.status_code == 201 and retry.status_code == 200
    assert retry.json() == {"batch_id": "w0-17", "rows": 200, "duplicate": True}
    assert stored_rows(service.database_url, layer_id) == 200
    assert stored_batches(service.database_url, layer_id) == 1


def test_a_batch_id_reused_for_different_rows_is_a_conflict(service, api):
    run_id, layer_id = make_layer(api, dim=8)
    assert post_arrow(api, run_id, layer_id, random_rows(10, 8), batch_id="b").status_code == 201
    response = post_arrow(api, run_id, layer_id, random_rows(11, 8), batch_id="b")
    assert response.status_code == 409
    assert error_of(response)["code"] == "batch_id_conflict"
    assert stored_rows(service.database_url, layer_id) == 10


def test_a_batch_that_fails_midway_leaves_nothing_behind(service, api):
    """The ledger row and the rows commit together: a COPY that fails rolls back the ledger too."""
    run_id, layer_id = make_layer(api, dim=4)
    with psycopg.connect(service.database_url) as conn:
        layer = find_layer(conn, layer_id)
        conn.execute("ALTER TABLE activations ADD CONSTRAINT label_small CHECK (label IS NULL OR label < 100)")
        conn.commit()
        labels = np.arange(500)  # rows past 99 violate the constraint deep inside the COPY
        try:
            ingest(conn, layer, "half", random_rows(500, 4, label=labels))
        except psycopg.errors.CheckViolation:
            conn.rollback()
        else:
            raise AssertionError("the COPY should have failed")
    assert stored_rows(service.database_url, layer_id) == 0
    assert stored_batches(service.database_url, layer_id) == 0
    # the same batch id is free again: a retry after the fix stores the batch once
    assert post_arrow(api, run_id, layer_id, random_rows(50, 4), batch_id="half").status_code == 201
    assert stored_rows(service.database_url, layer_id) == 50


def test_two_writers_ingest_into_one_layer_at_once(service, api):
    run_id, layer_id = make_layer(api, dim=16)
    errors: list[str] = []

    def worker(name: str) -> None:
        with service.client() as client:
            for i in range(10):
                rows = random_rows(300, 16, seed=i, sample_id=np.arange(300) + 1000 * i, task=name)
                response = post_arrow(client, run_id, layer_id, rows, batch_id=f"{name}-{i}")
                if response.status_code != 201:
                    errors.append(response.text)
                # every batch is also retried once, racing the other writer
                if post_arrow(client, run_id, layer_id, rows, batch_id=f"{name}-{i}").status_code != 200:
                    errors.append("retry not acknowledged as duplicate")

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("w0", "w1")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stored_rows(service.database_url, layer_id) == 2 * 10 * 300
    assert stored_batches(service.database_url, layer_id) == 20
    assert len(read_all(api, run_id, layer_id, task="w1")) == 3000


def test_the_same_batch_raced_by_two_writers_is_stored_once(service, api):
    run_id, layer_id = make_layer(api, dim=16)
    rows = random_rows(5000, 16)
    answers: list[int] = []

    def send() -> None:
        with service.client() as client:
            answers.append(post_arrow(client, run_id, layer_id, rows, batch_id="shared").status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [200, 200, 200, 201]
    assert stored_rows(service.database_url, layer_id) == 5000


def test_arrow_with_variable_lists_and_dictionary_tasks_is_accepted(api):
    run_id, layer_id = make_layer(api, dim=3)
    table = pa.table(
        {
            "values": pa.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], type=pa.list_(pa.float64())),
            "task": pa.array(["A", "B"]).dictionary_encode(),
            "label": pa.array([1, None], type=pa.int64()),
        }
    )
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    response = api.post(
        activations_path(run_id, layer_id), content=sink.getvalue(), headers={"content-type": ARROW_STREAM}
    )
    assert response.status_code == 201, response.text
    stored = read_all(api, run_id, layer_id)
    assert [(r["task"], r["label"]) for r in stored] == [("A", 1), ("B", None)]


def test_metrics_count_requests_and_ingested_rows(service, api):
    run_id, layer_id = make_layer(api, dim=4)
    rows = random_rows(25, 4)
    post_arrow(api, run_id, layer_id, rows, batch_id="m")
    post_arrow(api, run_id, layer_id, rows, batch_id="m")

    text = httpx.get(f"{service.base_url}/metrics").text
    assert "eidetic_ingested_rows_total 25.0" in text
    assert 'eidetic_ingested_batches_total{duplicate="true"} 1.0' in text
    assert 'route="/v1/runs/{run_id}/layers/{layer_id}/activations",status="201"' in text


def test_a_single_row_arrow_batch_is_stored_and_sketched(service, api):
    run_id, layer_id = make_layer(api, dim=3)
    response = post_arrow(api, run_id, layer_id, random_rows(1, 3, task="A"))
    assert response.status_code == 201, response.text
    sketch = api.post(
        f"/v1/runs/{run_id}/layers/{layer_id}/quantiles", json={"n_quantiles": 2, "method": "sketch", "wait_for": 10}
    )
    assert sketch.status_code == 201 and sketch.json()["rows"] == 1
