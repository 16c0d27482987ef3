"""Crashes and freezes of PostgreSQL and of the API under concurrent writers and readers.

PostgreSQL and the API run as this module's own child processes (tests/fault_kit.py),
apart from the session's server, so they can be killed with SIGKILL, frozen with
SIGSTOP and restarted on the same data directory and port. A few trials each here;
bench/reliability.py runs many more.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.fault_kit import (
    FaultBed,
    fault_bed,
    fill_layer,
    ingest_trial,
    read_arrow_in_flight,
    read_pages_in_flight,
    wait_for_answer,
)

DEADLINE_S = 2.0
SETTINGS = {"request_timeout_s": str(DEADLINE_S), "cancel_grace_s": "0.5"}
RECOVERY_S = 1.5  # "within a second" of the database's return, with room for a loaded 2-core machine
TRIALS = 2


@pytest.fixture(scope="module")
def bed() -> Iterator[FaultBed]:
    with fault_bed(SETTINGS) as bed:
        yield bed


@pytest.fixture
def running(bed: FaultBed) -> Iterator[FaultBed]:
    """The bed with both processes up, before and after the test (a failed trial leaves none down)."""
    bed.ensure_running()
    yield bed
    bed.ensure_running()


@pytest.mark.parametrize("trial_no", range(TRIALS))
def test_a_postgres_crash_mid_ingest_loses_no_acknowledged_batch(running: FaultBed, trial_no: int):
    trial = ingest_trial(running, "postgres_kill", outage_s=0.5)

    assert trial.during.acknowledged >= 20 and trial.resent > 0, "the crash struck while writers were writing"
    assert not (trial.during.lost or trial.during.partial or trial.during.duplicated), trial.during
    assert trial.after.sound and trial.after.stored == trial.after.sent, trial.after
    assert trial.recovery_s < RECOVERY_S
    while_down = [a for a in trial.answers if a.status == 503 and trial.struck < a.started < trial.back]
    assert while_down, "requests were refused while the database was down"
    assert all(a.retry_after for a in while_down)
    assert max(a.seconds for a in while_down) < 1.0


@pytest.mark.parametrize("trial_no", range(TRIALS))
def test_an_api_crash_mid_ingest_loses_no_acknowledged_batch(running: FaultBed, trial_no: int):
    trial = ingest_trial(running, "api_kill")

    assert trial.during.acknowledged >= 20 and trial.resent > 0, "the crash struck while writers were writing"
    assert not (trial.during.lost or trial.during.partial or trial.during.duplicated), trial.during
    assert trial.after.sound and trial.after.stored == trial.after.sent, trial.after
    assert trial.recovery_s < RECOVERY_S


def test_a_frozen_database_answers_503_by_the_deadline_and_recovers_without_restart(running: FaultBed):
    api_pid = running.api.process.pid
    trial = ingest_trial(running, "postgres_freeze", freeze_s=3.0)

    frozen = [a for a in trial.answers if trial.struck <= a.started + a.seconds and a.started < trial.back]
    assert frozen and all(a.status == 503 for a in frozen if a.started >= trial.struck)
    assert max(a.seconds for a in frozen) < DEADLINE_S + 0.5
    assert all(a.retry_after for a in frozen if a.status == 503)
    late = [a for a in frozen if a.started > trial.struck + DEADLINE_S + 0.2]  # the heartbeat has seen it by then
    assert late and max(a.seconds for a in late) < 1.0, "once known down, refused at once"
    assert trial.recovery_s < RECOVERY_S
    assert running.api.process.pid == api_pid, "the service was not restarted"
    assert not (trial.during.lost or trial.during.partial or trial.during.duplicated), trial.during
    assert trial.after.sound and trial.after.stored == trial.after.sent, trial.after


def test_while_postgres_is_down_requests_get_503_with_retry_after_at_once(running: FaultBed):
    run_id, _ = running.new_layer(4, "down-and-up")
    with running.api.client(timeout=30) as client:
        running.postgres.kill()
        wait_for_refusal = time.monotonic() + 5
        while client.get(f"/v1/runs/{run_id}").status_code != 503:
            assert time.monotonic() < wait_for_refusal
        for _ in range(5):
            started = time.monotonic()
            answer = client.get(f"/v1/runs/{run_id}")
            assert time.monotonic() - started < 1.0
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["code"] == "unavailable"
        started = time.monotonic()
        assert client.get("/readyz").status_code == 503  # a load balancer hears it at once too
        assert time.monotonic() - started < 1.0

        back = running.postgres.start()
        wait_for_answer(lambda: client.get(f"/v1/runs/{run_id}"), timeout=10)
        assert time.monotonic() - back < RECOVERY_S
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "reader, fault",
    [
        ("json_pages", "postgres_kill"),
        ("json_pages", "api_kill"),
        ("arrow_stream", "postgres_kill"),
        ("arrow_stream", "api_kill"),
    ],
)
def test_a_reader_in_flight_gets_every_row_or_an_error(running: FaultBed, reader: str, fault: str):
    run_id, layer_id = running.new_layer(64, f"{reader}-{fault}")
    total = fill_layer(running.api, run_id, layer_id, n_batches=20, rows=2000, dim=64)
    victim = running.postgres if fault == "postgres_kill" else running.api
    read = read_pages_in_flight if reader == "json_pages" else read_arrow_in_flight

    outcome, rows = read(running.api, run_id, layer_id, fault=victim.kill)

    assert outcome == "error" or rows == total, (outcome, rows, total)
