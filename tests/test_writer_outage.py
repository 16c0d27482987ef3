"""ActivationWriter through an outage: a training job keeps its rows while the store is away.

The store is made unreachable for real (the REST service stopped and started again on the
same port) or by a switch in front of a real transport: while it is down a send fails
before it reaches the store, as an unreachable service's does, or (ack_lost) after the store
committed, as when the answer is lost. The database itself is never replaced.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import uvicorn

from app.main import create_app
from eidetic.client import EideticClient, IngestReceipt
from eidetic.config import ClientSettings, default_spill_dir
from eidetic.transports import RestTransport, TransientError, Transport
from eidetic.wire.formats import rows_from_arrow, rows_to_arrow
from eidetic.wire.rows import ActivationRows
from eidetic.writer import ActivationWriter, StoreUnavailable, open_writer, replay_spill
from tests.conftest import start_service, stop_service
from tests.test_writer import ledger, matrix, new_layer, read_back, real_transport, stored_row_count

QUICK_RETRIES = {"backoff_s": 0.02, "max_backoff_s": 0.1}


@pytest.fixture(params=["rest", "direct"])
def transport_kind(request) -> str:
    return request.param


class Outage:
    """A real transport behind a switch: while `down`, every send fails (see the module docstring)."""

    def __init__(self, inner: Transport, *, down: bool = True, ack_lost: bool = False) -> None:
        self.inner = inner
        self.down = down
        self.ack_lost = ack_lost
        self.lock = threading.Lock()  # the writer sends from several lanes
        self.failures = 0
        self.acknowledged: list[str] = []

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt:
        if self.down and not self.ack_lost:
            self._failed()
            raise TransientError("service unreachable (injected outage)")
        receipt = self.inner.send(batch_id, rows)
        if self.down:
            self._failed()
            raise TransientError("connection reset after the store committed (injected outage)")
        with self.lock:
            self.acknowledged.append(batch_id)
        return receipt

    def _failed(self) -> None:
        with self.lock:
            self.failures += 1

    def wait_for_failures(self, count: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.failures < count:
            assert time.monotonic() < deadline, "the writer never tried the store"
            time.sleep(0.01)

    def close(self) -> None:
        self.inner.close()


def ledger_in_commit_order(database_url: str, layer_id: int) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT batch_id FROM ingest_batches WHERE layer_id = %s ORDER BY id", (layer_id,))
        return [batch_id for (batch_id,) in rows.fetchall()]


def spill_files(path: Path | None) -> list[Path]:
    return sorted(path.glob("*.arrow")) if path is not None and path.exists() else []


def wait_until_settled(writer: ActivationWriter, quiet_s: float = 0.3, timeout: float = 5) -> None:
    """Until the writer has stopped moving rows to the spill (everything written is placed)."""
    deadline = time.monotonic() + timeout
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        spilled = writer.stats().rows_spilled
        if spilled != last:
            last, quiet_since = spilled, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.02)
    raise AssertionError("the writer kept spilling")


def serve_on(port: int, settings, database_url: str) -> tuple[uvicorn.Server, threading.Thread]:
    """The service again on a port it used before: a restart, as the training job sees it."""
    config = uvicorn.Config(create_app(settings, database_url), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not come back"
        time.sleep(0.01)
    return server, thread


# ---------------------------------------------------------------- riding out an outage


def test_a_service_restart_costs_the_training_job_no_rows(service, settings, tmp_path: Path) -> None:
    run_id, layer_id = new_layer(service)
    server, thread, base_url = start_service(settings, service.database_url)
    port = int(base_url.rsplit(":", 1)[1])
    transport = RestTransport(EideticClient(base_url, service.write_key, timeout=5), run_id, layer_id)
    writer = ActivationWriter(
        transport,
        batch_rows=100,
        linger_s=0.01,
        retry_budget_s=60,
        memory_backlog_bytes=8_000,
        spill_dir=tmp_path,
        **QUICK_RETRIES,
    )
    writer.write(matrix(300), sample_id=np.arange(300))
    writer.flush()

    stop_service(server, thread)  # the API goes away mid-training
    started = time.monotonic()
    for start in range(300, 1300, 100):  # the training loop goes on, a minibatch every 0.1 s
        writer.write(matrix(100, seed=start), sample_id=np.arange(start, start + 100))
        time.sleep(0.1)
    assert time.monotonic() - started < 2.0, "write() held the training loop during the outage"
    during = writer.stats()
    assert during.retries > 0 and during.rows_sent == 300 and writer.error is None
    assert during.rows_spilled > 0 and spill_files(writer.spill_path)

    server, thread = serve_on(port, settings, service.database_url)  # the restart
    try:
        stats = writer.close()
    finally:
        stop_service(server, thread)

    assert stored_row_count(service.database_url, layer_id) == 1300
    assert sorted(ledger(service.database_url, layer_id)) == sorted(f"{writer.writer_id}-{seq}" for seq in range(13))
    assert (stats.rows_sent, stats.rows_failed, stats.rows_in_spill) == (1300, 0, 0)
    assert stats.outage_seconds >= 1.0
    assert list(tmp_path.iterdir()) == []  # every spilled batch delivered, the files and the directory gone


def test_no_store_unavailable_before_the_retry_budget_runs_out_and_then_it_is_raised(service, tmp_path: Path) -> None:
    run_id, layer_id = new_layer(service)
    down = Outage(real_transport("rest", service, run_id, layer_id))
    writer = ActivationWriter(down, retry_budget_s=1.5, spill_dir=tmp_path, **QUICK_RETRIES)
    writer.write(matrix(10))
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # a second in, the writer is still trying, not failed
        writer.flush(timeout=1.0)
    assert writer.error is None and down.failures > 3

    with pytest.raises(StoreUnavailable) as caught:
        writer.flush()
    failed_after = time.monotonic() - started
    assert 1.5 <= failed_after < 3.0
    error = caught.value
    assert error.outage_s >= 1.5 and error.batch_id == f"{writer.writer_id}-0"
    assert error.spill_path is not None and str(error.spill_path) in str(error)
    stats = writer.stats()
    assert 1.5 <= stats.outage_seconds < 3.0 and stats.retries == down.failures - 1
    writer.close()


def test_a_store_that_answers_again_resets_the_outage_clock(service, tmp_path: Path) -> None:
    """Two outages of 0.7 s each against a budget of 1 s: neither is given up, though together they last longer."""
    run_id, layer_id = new_layer(service)
    flaky = Outage(real_transport("rest", service, run_id, layer_id))
    writer = ActivationWriter(flaky, retry_budget_s=1.0, linger_s=0.01, spill_dir=tmp_path, **QUICK_RETRIES)
    for outage in range(2):
        flaky.down = True
        writer.write(matrix(10, seed=outage))
        flaky.wait_for_failures(flaky.failures + 1)
        time.sleep(0.7)
        flaky.down = False
        writer.flush()
    stats = writer.close()
    assert stats.rows_sent == 20 and writer.error is None
    assert stats.outage_seconds > 1.0  # more than the budget in all, so only a reset clock explains the success
    assert stored_row_count(service.database_url, layer_id) == 20


# ---------------------------------------------------------------- memory, then the spill


def test_an_outage_longer_than_memory_spills_and_replays_in_order_under_the_same_ids(
    service, api, transport_kind: str, tmp_path: Path
) -> None:
    run_id, layer_id = new_layer(service)
    down = Outage(real_transport(transport_kind, service, run_id, layer_id))
    writer = ActivationWriter(
        down,
        batch_rows=50,
        linger_s=0.01,
        in_flight=1,
        memory_backlog_bytes=8_000,
        spill_dir=tmp_path,
        **QUICK_RETRIES,
    )
    for start in range(0, 1000, 50):  # twenty batches while the store is down
        writer.write(matrix(50, seed=start), sample_id=np.arange(start, start + 50))
    wait_until_settled(writer)

    during = writer.stats()
    assert during.seconds_blocked < 0.2  # memory, then disk, took the rows: write() did not wait
    assert 0 < during.batches_spilled < 20
    assert during.rows_in_spill == during.rows_spilled == 50 * during.batches_spilled
    files = spill_files(writer.spill_path)
    assert writer.spill_path.parent == tmp_path and len(files) == during.batches_spilled
    held = [rows_from_arrow(path.read_bytes()) for path in files]
    first_spilled = 20 - during.batches_spilled  # the newest batches went to disk
    assert [batch_id for _, batch_id in held] == [f"{writer.writer_id}-{seq}" for seq in range(first_spilled, 20)]
    assert held[0][0].sample_id.data.tolist() == list(range(50 * first_spilled, 50 * first_spilled + 50))

    down.down = False
    stats = writer.close()

    expected_ids = [f"{writer.writer_id}-{seq}" for seq in range(20)]
    assert ledger_in_commit_order(service.database_url, layer_id) == expected_ids  # in order, under the same ids
    assert down.acknowledged == expected_ids
    assert sorted(row["sample_id"] for row in read_back(api, run_id, layer_id)) == list(range(1000))  # once each
    assert (stats.rows_sent, stats.batches_sent, stats.duplicates, stats.rows_in_spill) == (1000, 20, 0, 0)
    assert stats.batches_spilled == during.batches_spilled
    assert not any(path.exists() for path in files) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spill", ["off", "full"])
def test_write_blocks_when_memory_is_full_and_the_spill_is_off_or_full(service, tmp_path: Path, spill: str) -> None:
    run_id, layer_id = new_layer(service)
    down = Outage(real_transport("rest", service, run_id, layer_id))
    one_spilled_batch = len(rows_to_arrow(ActivationRows.build(matrix(10)), "0" * 16 + "-1"))  # room for exactly one
    writer = ActivationWriter(
        down,
        batch_rows=10,
        queue_size=1,
        in_flight=1,
        memory_backlog_bytes=0,
        writer_id="0" * 16,
        spill_dir=tmp_path,
        spill_max_bytes=0 if spill == "off" else one_spilled_batch,
        **QUICK_RETRIES,
    )
    writer.write(matrix(10, seed=0))  # the lane takes it to the store, which is down
    down.wait_for_failures(1)
    accepted = 1
    if spill == "full":
        writer.write(matrix(10, seed=accepted))  # fills the spill
        accepted += 1
    writer.write(matrix(10, seed=accepted))  # the sender takes it and finds no room anywhere
    accepted += 1
    deadline = time.monotonic() + 5
    while not writer._queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.write(matrix(10, seed=accepted))  # waits in the queue (size 1)
    accepted += 1

    blocked_done = threading.Event()

    def blocked_write() -> None:
        writer.write(matrix(10, seed=accepted))
        blocked_done.set()

    blocked = threading.Thread(target=blocked_write)
    blocked.start()
    assert not blocked_done.wait(0.5), "write() returned although memory and the spill were full"
    assert writer.stats().batches_spilled == (0 if spill == "off" else 1) and writer.error is None

    down.down = False
    assert blocked_done.wait(10)
    blocked.join()
    stats = writer.close()
    assert stored_row_count(service.database_url, layer_id) == 10 * (accepted + 1) == stats.rows_sent
    assert stats.seconds_blocked >= 0.4 and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- past the budget: the rows wait for a replay


def test_close_in_an_outage_past_the_budget_keeps_every_row_for_replay_spill(
    service, transport_kind: str, tmp_path: Path
) -> None:
    run_id, layer_id = new_layer(service)
    down = Outage(real_transport(transport_kind, service, run_id, layer_id))
    writer = ActivationWriter(
        down, batch_rows=100, retry_budget_s=0.5, in_flight=2, spill_dir=tmp_path, **QUICK_RETRIES
    )
    writer.write(matrix(450), sample_id=np.arange(450))  # five batches, all still in memory
    with pytest.raises(StoreUnavailable) as caught:
        writer.close()
    spill_path = caught.value.spill_path
    assert spill_path == writer.spill_path and spill_path.parent == tmp_path
    stats = writer.stats()
    assert (stats.rows_sent, stats.rows_failed, stats.rows_in_spill, stats.rows_pending) == (0, 450, 450, 0)
    assert len(spill_files(spill_path)) == 5 and stored_row_count(service.database_url, layer_id) == 0

    replayed = replay_spill(spill_path, real_transport(transport_kind, service, run_id, layer_id), in_flight=1)

    expected_ids = [f"{writer.writer_id}-{seq}" for seq in range(5)]
    assert ledger_in_commit_order(service.database_url, layer_id) == expected_ids
    assert stored_row_count(service.database_url, layer_id) == 450
    assert (replayed.rows_sent, replayed.batches_sent, replayed.duplicates, replayed.rows_in_spill) == (450, 5, 0, 0)
    assert not spill_path.exists()


def test_replaying_batches_that_had_landed_stores_nothing_twice(service, transport_kind: str, tmp_path: Path) -> None:
    """The store committed the batches it was sent, but no answer came back: those are duplicates in the replay."""
    run_id, layer_id = new_layer(service)
    lost_answers = Outage(real_transport(transport_kind, service, run_id, layer_id), ack_lost=True)
    writer = ActivationWriter(
        lost_answers, batch_rows=100, in_flight=2, retry_budget_s=0.3, spill_dir=tmp_path, **QUICK_RETRIES
    )
    writer.write(matrix(250))  # batches 0 and 1 reach the store; the writer gives up before it sends 2
    with pytest.raises(StoreUnavailable) as caught:
        writer.close()
    assert stored_row_count(service.database_url, layer_id) == 200 and writer.stats().rows_in_spill == 250

    replayed = replay_spill(caught.value.spill_path, real_transport(transport_kind, service, run_id, layer_id))
    assert (replayed.rows_sent, replayed.batches_sent, replayed.duplicates) == (250, 3, 2)
    assert stored_row_count(service.database_url, layer_id) == 250 and len(ledger(service.database_url, layer_id)) == 3
    assert not caught.value.spill_path.exists()


def test_replay_spill_in_an_outage_leaves_the_files_for_the_next_try(service, tmp_path: Path) -> None:
    run_id, layer_id = new_layer(service)
    down = Outage(real_transport("rest", service, run_id, layer_id))
    writer = ActivationWriter(down, batch_rows=100, retry_budget_s=0.2, spill_dir=tmp_path, **QUICK_RETRIES)
    writer.write(matrix(200))
    with pytest.raises(StoreUnavailable) as caught:
        writer.close()
    files = spill_files(caught.value.spill_path)
    with pytest.raises(ValueError, match="one writer's directory"):  # the parent, not the writer's own
        replay_spill(tmp_path, real_transport("rest", service, run_id, layer_id))

    still_down = Outage(real_transport("rest", service, run_id, layer_id))  # a replay closes its transport
    with pytest.raises(StoreUnavailable) as again:
        replay_spill(caught.value.spill_path, still_down, retry_budget_s=0.2, **QUICK_RETRIES)
    assert again.value.spill_path == caught.value.spill_path and spill_files(caught.value.spill_path) == files

    replayed = replay_spill(caught.value.spill_path, real_transport("rest", service, run_id, layer_id))
    assert replayed.rows_sent == 200 and stored_row_count(service.database_url, layer_id) == 200
    assert not caught.value.spill_path.exists()


# ---------------------------------------------------------------- settings


OUTAGE_VARIABLES = (
    "EIDETIC_WRITER_RETRY_BUDGET_S",
    "EIDETIC_WRITER_MAX_BACKOFF_S",
    "EIDETIC_WRITER_MAX_ATTEMPTS",
    "EIDETIC_WRITER_MEMORY_BACKLOG_BYTES",
    "EIDETIC_WRITER_SPILL_DIR",
    "EIDETIC_WRITER_SPILL_MAX_BYTES",
)


def test_outage_settings_default_to_ten_minutes_and_a_spill_in_the_user_cache(monkeypatch, tmp_path: Path) -> None:
    for name in OUTAGE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    settings = ClientSettings()
    assert settings.writer_retry_budget_s == 600 and settings.writer_max_attempts is None
    assert settings.writer_spill_dir == default_spill_dir() and settings.writer_spill_max_bytes == 4 * 1024**3
    assert settings.writer_memory_backlog_bytes == 64 * 1024**2


def test_open_writer_takes_the_outage_settings_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    values = {
        "EIDETIC_WRITER_RETRY_BUDGET_S": "120",
        "EIDETIC_WRITER_MAX_BACKOFF_S": "2.5",
        "EIDETIC_WRITER_MAX_ATTEMPTS": "40",
        "EIDETIC_WRITER_MEMORY_BACKLOG_BYTES": "1024",
        "EIDETIC_WRITER_SPILL_DIR": str(tmp_path / "spill"),
        "EIDETIC_WRITER_SPILL_MAX_BYTES": "0",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    writer = open_writer(1, 1, ClientSettings(eidetic_transport="rest"))
    try:
        assert (writer.retry_budget_s, writer.max_backoff_s, writer.max_attempts) == (120, 2.5, 40)
        assert writer.memory_backlog_bytes == 1024
        assert writer._spill.parent == tmp_path / "spill" and not writer._spill.enabled
    finally:
        writer.close()
