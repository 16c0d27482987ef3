"""A request's deadline: its running statement is cancelled, so a write answered 503 is not committed later."""

from __future__ import annotations

import time

import psycopg

from tests.conftest import start_service, stop_service
from tests.helpers import error_of, make_layer, post_arrow, random_rows, stored_batches


def test_an_ingest_past_its_deadline_is_cancelled_not_committed_afterwards(database_url, settings, service, api):
    """The layer's table is locked, so the COPY waits; at the deadline the statement is cancelled and
    the transaction rolled back: when the lock goes, nothing of the batch is left to commit."""
    run_id, layer_id = make_layer(api, dim=4)
    rows = random_rows(10, 4)
    impatient = settings.model_copy(update={"request_timeout_s": 1.0, "cancel_grace_s": 0.4})
    server, thread, base_url = start_service(impatient, database_url)
    try:
        with psycopg.connect(database_url) as locker:
            locker.execute(f"LOCK TABLE activations_r{run_id}_l{layer_id} IN ACCESS EXCLUSIVE MODE")
            with service.client() as client:
                client.base_url = base_url
                started = time.monotonic()
                answer = post_arrow(client, run_id, layer_id, rows, batch_id="late")
                seconds = time.monotonic() - started
            locker.rollback()
        assert answer.status_code == 503 and error_of(answer)["code"] == "deadline_exceeded"
        assert answer.headers["retry-after"] == "1"
        assert seconds < 1.5
        time.sleep(0.5)  # a write still waiting on the lock would commit now
        assert stored_batches(database_url, layer_id) == 0

        retried = post_arrow(api, run_id, layer_id, rows, batch_id="late")
        assert retried.status_code == 201 and retried.json()["duplicate"] is False
    finally:
        stop_service(server, thread)
