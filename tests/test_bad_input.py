"""Bad input gets a 4xx JSON error naming the field, and leaves the store exactly as it was."""

import io

import numpy as np
import psycopg
import pytest

from eidetic.wire.formats import ARROW_STREAM, NPY
from tests.conftest import start_service, stop_service
from tests.helpers import activations_path, error_of, make_layer, post_arrow, random_rows, stored_batches, stored_rows


@pytest.fixture
def layer(service, api):
    """A layer of dimension 4 that already holds one batch of 10 rows."""
    run_id, layer_id = make_layer(api, dim=4)
    assert post_arrow(api, run_id, layer_id, random_rows(10, 4), batch_id="kept").status_code == 201
    yield run_id, layer_id
    assert stored_rows(service.database_url, layer_id) == 10, "a refused batch changed the store"
    assert stored_batches(service.database_url, layer_id) == 1


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def send(api, run_id, layer_id, content, content_type, **params):
    return api.post(
        activations_path(run_id, layer_id), content=content, headers={"content-type": content_type}, params=params
    )


def test_wrong_dimension(api, layer):
    response = post_arrow(api, *layer, random_rows(5, 7))
    assert response.status_code == 422
    assert error_of(response)["code"] == "dimension_mismatch"
    assert error_of(response)["field"] == "rows[0].values"


def test_rows_of_unequal_length_in_json(api, layer):
    body = {"rows": [{"values": [1, 2, 3, 4]}, {"values": [1, 2]}]}
    response = api.post(activations_path(*layer), json=body)
    assert response.status_code == 422 and error_of(response)["field"] == "rows[1].values"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(api, layer, bad):
    rows = random_rows(6, 4)
    rows.values[3, 2] = bad
    response = post_arrow(api, *layer, rows)
    assert response.status_code == 422
    assert error_of(response) == {
        "code": "non_finite_value",
        "message": "row 3 holds NaN, Inf or a value beyond float32's range",
        "field": "rows[3].values",
    }


def test_nan_literal_in_json_is_rejected(api, layer):
    body = b'{"rows": [{"values": [1, 2, 3, 4]}, {"values": [1, NaN, 3, 4]}]}'
    response = api.post(activations_path(*layer), content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and error_of(response)["field"] == "rows[1].values"


@pytest.mark.parametrize(
    "content, content_type, code",
    [
        (b"\x00garbage", ARROW_STREAM, "malformed_body"),
        (b"not numpy", NPY, "malformed_body"),
        (b"{not json", "application/json", "malformed_body"),
        (b'{"rows": "nope"}', "application/json", "invalid_input"),
        (b'{"rows": []}', "application/json", "invalid_input"),
        (b'{"rows": [{"values": [1, 2, 3, "x"]}]}', "application/json", "invalid_input"),
        (b'{"rows": [{"values": [1, 2, 3, 4], "label": 1.5}]}', "application/json", "invalid_input"),
        (b'{"rows": [{"values": [1, 2, 3, 4], "label": 99999999999}]}', "application/json", "invalid_input"),
        (b"a,b,c", "text/csv", "unsupported_media_type"),
    ],
)
def test_malformed_bodies(api, layer, content, content_type, code):
    response = send(api, *layer, content, content_type)
    assert 400 <= response.status_code < 500
    assert error_of(response)["code"] == code


def test_npy_that_is_not_a_float_matrix(api, layer):
    response = send(api, *layer, npy_bytes(np.arange(8)), NPY)
    assert response.status_code == 422 and error_of(response)["field"] == "values"
    response = send(api, *layer, npy_bytes(np.array(["a", "b"])), NPY)
    assert response.status_code == 422


def test_pickled_npy_is_refused(api, layer):
    response = send(api, *layer, npy_bytes(np.array([{"a": 1}], dtype=object)), NPY)
    assert response.status_code == 400 and error_of(response)["code"] == "malformed_body"


def test_body_over_the_size_limit(api, layer, settings):
    big = random_rows(settings.max_body_bytes // 16 + 10, 4)
    response = post_arrow(api, *layer, big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "payload_too_large"


def test_a_chunked_body_without_length_is_also_capped(api, layer, settings):
    def chunks():
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b"x" * 65536

    response = api.post(activations_path(*layer), content=chunks(), headers={"content-type": ARROW_STREAM})
    assert response.status_code == 413


def test_too_many_rows(api, layer, settings):
    response = post_arrow(api, *layer, random_rows(settings.max_rows_per_batch + 1, 4))
    assert response.status_code == 413 and error_of(response)["field"] == "rows"


def test_unknown_run_or_layer(api, layer):
    run_id, layer_id = layer
    response = post_arrow(api, 987654, layer_id, random_rows(2, 4))
    assert response.status_code == 404 and error_of(response)["field"] == "run_id"
    response = post_arrow(api, run_id, 987654, random_rows(2, 4))
    assert response.status_code == 404 and error_of(response)["field"] == "layer_id"


def test_a_layer_of_another_run_is_not_found(api, layer):
    other_run, _ = make_layer(api, dim=4, run="other")
    assert post_arrow(api, other_run, layer[1], random_rows(2, 4)).status_code == 404


def test_an_absurd_batch_id(api, layer):
    response = post_arrow(api, *layer, random_rows(2, 4), batch_id="x" * 500)
    assert response.status_code == 422 and error_of(response)["field"] == "batch_id"


def test_unknown_routes_answer_in_the_same_shape(api):
    response = api.get("/v1/nothing-here")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_every_connection_runs_under_a_statement_timeout(database_url, settings):
    from app.database import open_pool

    pool = open_pool(database_url, settings.model_copy(update={"statement_timeout_ms": 1234}))
    try:
        with pool.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
    finally:
        pool.close()


def test_a_query_past_the_statement_timeout_answers_503(database_url, settings, service, api):
    """A table locked by another session makes the read wait; the timeout turns that into a 503."""
    run_id, layer_id = make_layer(api, dim=4)
    quick = settings.model_copy(update={"statement_timeout_ms": 300})
    server, thread, base_url = start_service(quick, database_url)
    try:
        with psycopg.connect(database_url) as locker:
            locker.execute(f"LOCK TABLE activations_r{run_id}_l{layer_id} IN ACCESS EXCLUSIVE MODE")
            with service.client() as client:
                client.base_url = base_url
                response = client.get(f"/v1/runs/{run_id}/layers/{layer_id}/summary")
            locker.rollback()
        assert response.status_code == 503
        assert error_of(response)["code"] == "timeout"
        assert response.headers["retry-after"] == "1"  # every 503 says when to come back
    finally:
        stop_service(server, thread)


def test_a_request_past_its_deadline_answers_503(database_url, settings, service, api):
    """Even when the database never answers in time, the caller hears back by the request deadline."""
    run_id, layer_id = make_layer(api, dim=4)
    impatient = settings.model_copy(update={"statement_timeout_ms": 20_000, "request_timeout_s": 0.5})
    server, thread, base_url = start_service(impatient, database_url)
    try:
        with psycopg.connect(database_url) as locker:
            locker.execute(f"LOCK TABLE activations_r{run_id}_l{layer_id} IN ACCESS EXCLUSIVE MODE")
            with service.client() as client:
                client.base_url = base_url
                response = client.get(f"/v1/runs/{run_id}/layers/{layer_id}/summary")
            locker.rollback()
        assert response.status_code == 503
        assert error_of(response)["code"] == "deadline_exceeded"
    finally:
        stop_service(server, thread)
