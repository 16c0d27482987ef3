"""Arrow streams (activations with format=arrow, bank snapshots) end verifiably or not at all.

A complete stream ends with an empty record batch whose custom metadata `eidetic.end` counts
the rows sent, then the Arrow end-of-stream marker. A stream that fails after its 200 was sent
(the database dies, a statement times out, the request's deadline passes) is cut off without
them and without the end of its chunked body: the raw HTTP read raises, and the REST client
raises IncompleteStream. It never looks like a shorter, complete answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import psycopg
import pyarrow as pa
import pytest
from psycopg import sql

from app.runs import layer_partition
from app.settings import Settings
from eidetic.client import EideticClient, IncompleteStream, whole_stream
from eidetic.torch.memory_cache import MemoryCache
from tests.conftest import Service, start_service, stop_service
from tests.helpers import activations_path, make_layer, post_arrow, random_rows

WINDOW_ROWS = 256  # rows per statement and record batch: a stream of many batches
TEST_CONNECTION = "streams-test"  # application_name of this file's own connections, never a stream's


def service_settings(**overrides) -> Settings:
    base = dict(database_url=None, max_body_bytes=8 * 1024 * 1024, max_rows_per_batch=50_000)
    return Settings(**{**base, "stream_window_rows": WINDOW_ROWS, **overrides})


@pytest.fixture
def settings() -> Settings:
    return service_settings()


@contextmanager
def service_with(service: Service, **overrides) -> Iterator[str]:
    """A second service over the same database with other settings; yields its base URL."""
    server, thread, base_url = start_service(service_settings(**overrides), service.database_url)
    try:
        yield base_url
    finally:
        stop_service(server, thread)


def admin(service: Service, autocommit: bool = True) -> psycopg.Connection:
    return psycopg.connect(service.database_url, autocommit=autocommit, application_name=TEST_CONNECTION)


def terminate_stream_backend(service: Service, within_s: float = 10.0) -> None:
    """Kills the PostgreSQL backend serving a stream: the one holding a REPEATABLE READ snapshot."""
    with admin(service) as conn:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND application_name <> %s AND backend_xmin IS NOT NULL",
                (TEST_CONNECTION,),
            ).fetchall()
            if killed:
                assert all(ok for (ok,) in killed)
                return
            time.sleep(0.02)
    raise AssertionError("no stream's backend showed up to terminate")


def waiting_statements(service: Service) -> int:
    """Statements of the service's connections waiting for a lock."""
    with admin(service) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE NOT l.granted AND a.datname = current_database() AND a.application_name <> %s",
            (TEST_CONNECTION,),
        ).fetchone()[0]


def open_transactions(service: Service) -> int:
    """Transactions the service's connections hold open (a stream's snapshot holds back vacuum)."""
    with admin(service) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND application_name <> %s AND xact_start IS NOT NULL",
            (TEST_CONNECTION,),
        ).fetchone()[0]


def soon(condition: Callable[[], bool], within_s: float = 3.0) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def partition_locked(service: Service, run_id: int, layer_id: int) -> Iterator[None]:
    """Another transaction holds the layer's partition exclusively (as ALTER TABLE or VACUUM FULL would)."""
    with admin(service, autocommit=False) as conn:
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(layer_partition(run_id, layer_id)))
        yield
        conn.rollback()


def killing_on_stream(service: Service, path_end: str) -> Callable[[httpx.Response], None]:
    """An httpx response hook: once a stream's 200 arrived, and before its body is read, kill its backend."""

    def hook(response: httpx.Response) -> None:
        if response.status_code == 200 and response.request.url.path.endswith(path_end):
            terminate_stream_backend(service)

    return hook


def rest_client(service: Service, base_url: str | None = None, **event_hooks) -> EideticClient:
    http = httpx.Client(
        base_url=base_url or service.base_url,
        headers={"Authorization": f"Bearer {service.write_key}"},
        timeout=60,
        event_hooks={"response": list(event_hooks.values())},
    )
    return EideticClient(service.base_url, http=http)


def read_batches(body: bytes) -> list[tuple[pa.RecordBatch, dict | None]]:
    reader = pa.ipc.open_stream(body)
    batches = []
    while True:
        try:
            batch, metadata = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            return batches
        batches.append((batch, None if metadata is None else dict(metadata)))


def rows_before_the_break(body: bytes) -> int:
    """Rows in the whole record batches of a broken-off body (what a naive reader would have taken)."""
    rows = 0
    try:
        for batch in pa.ipc.open_stream(body):
            rows += batch.num_rows
    except (pa.ArrowInvalid, OSError):
        pass
    return rows


def read_raw(response: httpx.Response, then: Callable[[], None] | None = None) -> bytes:
    """Reads a body chunk by chunk; `then` runs once the first chunk arrived. Whatever arrived is on the error."""
    received = bytearray()
    try:
        for chunk in response.iter_raw():
            received += chunk
            if then is not None:
                then()
                then = None
    except httpx.TransportError as error:
        error.received = bytes(received)
        raise
    return bytes(received)


LAYER_BATCHES, LAYER_BATCH_ROWS, LAYER_DIM = 16, 2500, 256  # 40 MB: far more than loopback socket buffers hold


def big_layer(api: httpx.Client) -> tuple[int, int]:
    """A layer a stream can't hand to the sockets at once, so the server is still reading when a fault hits."""
    run_id, layer_id = make_layer(api, dim=LAYER_DIM)
    for batch in range(LAYER_BATCHES):
        sample_ids = np.arange(LAYER_BATCH_ROWS) + batch * LAYER_BATCH_ROWS
        rows = random_rows(LAYER_BATCH_ROWS, LAYER_DIM, seed=batch, sample_id=sample_ids)
        assert post_arrow(api, run_id, layer_id, rows, batch_id=f"b{batch}").status_code == 201
    return run_id, layer_id


def big_bank(api: httpx.Client) -> int:
    """A bank of 1,500 items with 16 KB values: a 24 MB snapshot."""
    body = {"name": "big", "dim": 2, "metric": "l2", "capacity": 2000, "policy": "none", "value_dim": 4000}
    response = api.post("/v1/memory-banks", json=body)
    assert response.status_code == 201, response.text
    bank_id = response.json()["id"]
    for write in range(6):
        items = [{"key": [float(i), float(write)], "label": i % 5, "value": [float(i % 7)] * 4000} for i in range(250)]
        assert api.post(f"/v1/memory-banks/{bank_id}/items", json={"items": items}).status_code == 200
    return bank_id


# ------------------------------------------------------------------ a complete stream


def test_a_complete_stream_ends_with_its_row_count_and_the_client_accepts_it(api, service):
    run_id, layer_id = make_layer(api, dim=4)
    for batch in range(3):
        rows = random_rows(1000, 4, seed=batch, sample_id=np.arange(1000) + 1000 * batch)
        assert post_arrow(api, run_id, layer_id, rows, batch_id=f"b{batch}").status_code == 201

    response = api.get(activations_path(run_id, layer_id), params={"format": "arrow"})
    assert response.status_code == 200
    batches = read_batches(response.content)
    *rows, (end, end_metadata) = batches
    assert end.num_rows == 0 and end_metadata == {b"eidetic.end": b"3000"}
    assert len(rows) > 3 and all(metadata is None for _, metadata in rows)  # a record batch a window
    assert sum(batch.num_rows for batch, _ in rows) == 3000

    with rest_client(service) as client:
        table = client.read_activations(run_id, layer_id)
        assert table.column("sample_id").to_pylist() == list(range(3000))
        assert client.read_activations(run_id, layer_id, limit=300).num_rows == 300
        nothing = client.read_activations(run_id, layer_id, label=99)
        assert nothing.num_rows == 0 and nothing.schema.field("values").type == pa.list_(pa.float32(), 4)


def test_a_complete_snapshot_ends_with_its_row_count_and_the_client_accepts_it(api, service):
    body = {"name": "small", "dim": 2, "capacity": 1000, "policy": "none"}
    bank_id = api.post("/v1/memory-banks", json=body).json()["id"]
    items = [{"key": [float(i), 1.0], "label": i % 3} for i in range(600)]
    assert api.post(f"/v1/memory-banks/{bank_id}/items", json={"items": items}).status_code == 200

    batches = read_batches(api.get(f"/v1/memory-banks/{bank_id}/snapshot").content)
    assert batches[-1][1] == {b"eidetic.end": b"600"} and batches[-1][0].num_rows == 0
    with rest_client(service) as client:
        table = client.snapshot_table(bank_id)
        assert table.num_rows == 600 and table.schema.metadata[b"bank_version"] == b"1"
        assert whole_stream(client.snapshot(bank_id)).num_rows == 600


def without_end_record(body: bytes) -> bytes:
    """The same rows as a valid Arrow stream with its end-of-stream marker but no end record (a short stream)."""
    sink = pa.BufferOutputStream()
    reader = pa.ipc.open_stream(body)
    with pa.ipc.new_stream(sink, reader.schema) as writer:
        for batch, metadata in read_batches(body):
            if metadata is None:
                writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize(
    "damage, complaint",
    [
        (without_end_record, "without its end record"),
        (lambda body: body[: len(body) // 2], "not a whole Arrow stream"),  # broken off inside a record batch
        (lambda body: body[: body.rindex(b"3000")] + b"2999" + body[body.rindex(b"3000") + 4 :], "counts 2999 rows"),
    ],
)
def test_the_client_refuses_a_stream_without_a_true_end(api, damage, complaint):
    run_id, layer_id = make_layer(api, dim=4)
    assert post_arrow(api, run_id, layer_id, random_rows(3000, 4), batch_id="b").status_code == 201
    body = api.get(activations_path(run_id, layer_id), params={"format": "arrow"}).content
    assert whole_stream(body).num_rows == 3000
    with pytest.raises(IncompleteStream, match=complaint) as raised:
        whole_stream(damage(body))
    assert raised.value.code == "incomplete_stream" and raised.value.retryable


# ------------------------------------------------------------------ the database fails midway


def test_a_stream_whose_backend_is_killed_midway_breaks_off_instead_of_ending(api, service):
    run_id, layer_id = big_layer(api)
    with api.stream("GET", activations_path(run_id, layer_id), params={"format": "arrow"}) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read") as raised:
            read_raw(response, then=lambda: terminate_stream_backend(service))
    received = raised.value.received
    assert 0 < rows_before_the_break(received) < LAYER_BATCHES * LAYER_BATCH_ROWS  # it broke midway
    with pytest.raises(IncompleteStream):
        whole_stream(received)

    with rest_client(service, kill=killing_on_stream(service, "/activations")) as client:
        with pytest.raises(IncompleteStream, match="broke off"):
            client.read_activations(run_id, layer_id)
    with rest_client(service) as client:  # and the service streams whole again afterwards
        assert client.read_activations(run_id, layer_id).num_rows == LAYER_BATCHES * LAYER_BATCH_ROWS


def test_a_snapshot_whose_backend_is_killed_midway_breaks_off_instead_of_ending(api, service):
    bank_id = big_bank(api)
    with api.stream("GET", f"/v1/memory-banks/{bank_id}/snapshot") as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read") as raised:
            read_raw(response, then=lambda: terminate_stream_backend(service))
    assert 0 < rows_before_the_break(raised.value.received) < 1500

    with rest_client(service, kill=killing_on_stream(service, "/snapshot")) as client:
        with pytest.raises(IncompleteStream):
            client.snapshot_table(bank_id)
        with pytest.raises(IncompleteStream):  # a cache never warms from part of a bank
            MemoryCache.from_service(client, bank_id)
    with rest_client(service) as client:
        assert client.snapshot_table(bank_id).num_rows == 1500


def test_a_statement_timeout_after_the_200_breaks_the_stream_off(api, service):
    run_id, layer_id = make_layer(api, dim=4)
    assert post_arrow(api, run_id, layer_id, random_rows(3000, 4), batch_id="b").status_code == 201
    with service_with(service, statement_timeout_ms=300) as base_url, partition_locked(service, run_id, layer_id):
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {service.write_key}"}) as raw:
            with raw.stream("GET", activations_path(run_id, layer_id), params={"format": "arrow"}) as response:
                assert response.status_code == 200  # sent before the rows are read
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                    read_raw(response)
        with rest_client(service, base_url) as client, pytest.raises(IncompleteStream):
            client.read_activations(run_id, layer_id)
    with rest_client(service) as client:
        assert client.read_activations(run_id, layer_id).num_rows == 3000


# ------------------------------------------------------------------ the request's deadline


def test_a_stream_blocked_in_the_database_aborts_at_the_deadline_and_its_statement_stops(api, service):
    run_id, layer_id = make_layer(api, dim=4)
    assert post_arrow(api, run_id, layer_id, random_rows(3000, 4), batch_id="b").status_code == 201
    with service_with(service, request_timeout_s=2.0) as base_url, partition_locked(service, run_id, layer_id):
        with rest_client(service, base_url) as client:
            started = time.monotonic()
            with pytest.raises(IncompleteStream):
                client.read_activations(run_id, layer_id)
            elapsed = time.monotonic() - started
        assert 1.5 < elapsed < 3.5, elapsed  # the statement timeout (30 s) would have been far later
        assert soon(lambda: waiting_statements(service) == 0, within_s=1.0)  # cancelled, not left to wait on
        assert soon(lambda: open_transactions(service) == 0)


def test_a_stream_its_reader_stalls_past_the_deadline_is_broken_off_not_resumed(api, service):
    run_id, layer_id = big_layer(api)
    with service_with(service, request_timeout_s=2.0) as base_url:
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {service.write_key}"}) as raw:
            with raw.stream("GET", activations_path(run_id, layer_id), params={"format": "arrow"}) as response:
                assert response.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read") as raised:
                    read_raw(response, then=lambda: time.sleep(3.0))  # then reads as fast as it can
        assert soon(lambda: open_transactions(service) == 0)  # the stream's snapshot is let go
    assert 0 < rows_before_the_break(raised.value.received) < LAYER_BATCHES * LAYER_BATCH_ROWS
