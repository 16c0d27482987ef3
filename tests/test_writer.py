"""ActivationWriter: rows streamed from a training loop land in the store exactly once.

Every test runs against the real service and database of the fixtures. Faults are
injected by wrapping a real transport (the batch really is stored, then the writer is
told it was not), never by replacing the database.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pydantic import ValidationError

from eidetic.client import EideticAPIError, EideticClient, IngestReceipt
from eidetic.config import ClientSettings
from eidetic.direct import DirectTransport
from eidetic.transports import RestTransport, TransientError, Transport
from eidetic.wire.rows import ActivationRows
from eidetic.writer import (
    ActivationWriter,
    BatchRejected,
    StoreUnavailable,
    WriterClosed,
    WriterStats,
    open_writer,
)

DIM = 8
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def new_layer(service, dim: int = DIM, run_name: str = "writer-test") -> tuple[int, int]:
    with EideticClient(service.base_url, service.write_key) as client:
        run = client.create_run(run_name, {"purpose": "test"})
        layer = client.create_layer(run.id, "penultimate", dim)
    return run.id, layer.id


def stored_row_count(database_url: str, layer_id: int) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM activations WHERE layer_id = %s", (layer_id,)).fetchone()[0]


def ledger(database_url: str, layer_id: int) -> dict[str, int]:
    """Batch id -> row count, as the store's ingest ledger holds them."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT batch_id, row_count FROM ingest_batches WHERE layer_id = %s", (layer_id,)
        ).fetchall()
    return dict(rows)


def read_back(api, run_id: int, layer_id: int) -> list[dict]:
    answer = api.get(f"/v1/runs/{run_id}/layers/{layer_id}/activations", params={"limit": 10_000})
    assert answer.status_code == 200, answer.text
    return answer.json()["rows"]


def real_transport(kind: str, service, run_id: int, layer_id: int) -> Transport:
    if kind == "rest":
        return RestTransport(EideticClient(service.base_url, service.write_key), run_id, layer_id)
    return DirectTransport(service.database_url, run_id, layer_id)


def matrix(n_rows: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_rows, dim)).astype(np.float32)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["rest", "direct"])
def transport_kind(request) -> str:
    return request.param


# ---------------------------------------------------------------- fault injectors over real transports


class LoseAcknowledgement:
    """Stores the batch through the real transport, then reports a lost connection (the first `times` calls)."""

    def __init__(self, inner: Transport, times: int = 1) -> None:
        self.inner = inner
        self.times = times
        self.calls: list[str] = []
        self.lost: list[str] = []
        self.lock = threading.Lock()  # the writer sends from several threads

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt:
        with self.lock:
            self.calls.append(batch_id)
        receipt = self.inner.send(batch_id, rows)
        with self.lock:
            if self.times > 0:
                self.times -= 1
                self.lost.append(batch_id)
                raise TransientError("connection reset after the store committed (injected)")
        return receipt

    def close(self) -> None:
        self.inner.close()


class FailBeforeSending:
    """The store is unreachable for the first `times` calls, then reachable."""

    def __init__(self, inner: Transport, times: int) -> None:
        self.inner = inner
        self.times = times
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt:
        with self.lock:
            self.calls.append(batch_id)
            unreachable = self.times > 0
            self.times -= unreachable
        if unreachable:
            raise TransientError("service unreachable (injected)")
        return self.inner.send(batch_id, rows)

    def close(self) -> None:
        self.inner.close()


class Gated:
    """Holds every send until the gate opens: a store that has fallen behind. Counts sends at the gate."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.waiting = 0
        self.most_waiting = 0

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt:
        with self.lock:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            assert self.gate.wait(10), "the test never opened the gate"
        finally:
            with self.lock:
                self.waiting -= 1
        return self.inner.send(batch_id, rows)

    def wait_for_senders(self, count: int, timeout: float = 5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.waiting >= count:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------- exactly once


def test_rows_land_exactly_once_in_batches_of_batch_rows(service, api, transport_kind: str) -> None:
    run_id, layer_id = new_layer(service)
    values = matrix(1300)
    transport = real_transport(transport_kind, service, run_id, layer_id)
    with ActivationWriter(transport, batch_rows=500, linger_s=60) as writer:
        for start in range(0, 1300, 100):  # thirteen minibatches of 100 rows
            stop = start + 100
            writer.write(
                values[start:stop],
                sample_id=np.arange(start, stop),
                step=start // 100,
                epoch=0,
                label=np.arange(start, stop) % 10,
                task="A" if start < 600 else "B",
            )
    stats = writer.stats()

    assert stored_row_count(service.database_url, layer_id) == 1300
    batches = ledger(service.database_url, layer_id)
    assert sorted(batches.values()) == [300, 500, 500]  # full batches, then the rest on close
    assert set(batches) == {f"{writer.writer_id}-{seq}" for seq in range(3)}
    assert stats == WriterStats(rows_queued=1300, rows_sent=1300, batches_sent=3, seconds_blocked=stats.seconds_blocked)
    assert stats.rows_pending == 0

    stored = read_back(api, run_id, layer_id)
    assert sorted(row["sample_id"] for row in stored) == list(range(1300))
    by_sample = {row["sample_id"]: row for row in stored}
    assert by_sample[1299]["step"] == 12 and by_sample[1299]["label"] == 9 and by_sample[1299]["task"] == "B"
    assert by_sample[5]["task"] == "A" and by_sample[5]["epoch"] == 0
    np.testing.assert_allclose(by_sample[777]["values"], values[777], rtol=1e-6)


def test_one_large_write_is_cut_into_batches(service, transport_kind: str) -> None:
    run_id, layer_id = new_layer(service)
    with ActivationWriter(real_transport(transport_kind, service, run_id, layer_id), batch_rows=1000) as writer:
        writer.write(matrix(2500), sample_id=np.arange(2500))
    assert sorted(ledger(service.database_url, layer_id).values()) == [500, 1000, 1000]
    assert stored_row_count(service.database_url, layer_id) == 2500


def test_wide_rows_are_cut_by_bytes_as_well(service) -> None:
    run_id, layer_id = new_layer(service)
    transport = real_transport("rest", service, run_id, layer_id)
    with ActivationWriter(transport, batch_rows=10_000, max_batch_bytes=100 * DIM * 4) as writer:
        writer.write(matrix(250))
    assert sorted(ledger(service.database_url, layer_id).values()) == [50, 100, 100]


def test_a_retry_after_the_store_committed_reuses_the_batch_id(service, transport_kind: str) -> None:
    run_id, layer_id = new_layer(service)
    flaky = LoseAcknowledgement(real_transport(transport_kind, service, run_id, layer_id))
    with ActivationWriter(flaky, batch_rows=200, backoff_s=0.01) as writer:
        writer.write(matrix(400), sample_id=np.arange(400))

    ids = {f"{writer.writer_id}-0", f"{writer.writer_id}-1"}
    assert sorted(flaky.calls) == sorted([*ids, *flaky.lost]) and len(flaky.lost) == 1  # the retry carried the same id
    assert set(flaky.calls) == ids
    assert stored_row_count(service.database_url, layer_id) == 400  # ... so nothing was stored twice
    assert len(ledger(service.database_url, layer_id)) == 2
    stats = writer.stats()
    assert (stats.retries, stats.duplicates, stats.batches_sent, stats.rows_sent) == (1, 1, 2, 400)


def test_an_unreachable_store_is_retried_until_it_answers(service, transport_kind: str) -> None:
    run_id, layer_id = new_layer(service)
    down = FailBeforeSending(real_transport(transport_kind, service, run_id, layer_id), times=3)
    with ActivationWriter(down, backoff_s=0.01) as writer:
        writer.write(matrix(50))
        writer.flush()
    assert len(set(down.calls)) == 1 and len(down.calls) == 4
    assert stored_row_count(service.database_url, layer_id) == 50
    assert (writer.stats().retries, writer.stats().duplicates) == (3, 0)


def test_a_store_that_never_answers_fails_after_max_attempts_if_they_are_capped(tmp_path: Path) -> None:
    client = EideticClient(f"http://127.0.0.1:{unused_port()}", "no-key", timeout=2)
    writer = ActivationWriter(RestTransport(client, 1, 1), max_attempts=3, backoff_s=0.01, spill_dir=tmp_path)
    writer.write(matrix(10))
    with pytest.raises(StoreUnavailable) as caught:
        writer.flush()
    assert caught.value.attempts == 3
    assert caught.value.spill_path is not None and caught.value.spill_path.parent == tmp_path
    stats = writer.stats()
    assert (stats.retries, stats.rows_sent, stats.rows_failed, stats.rows_pending) == (2, 0, 10, 0)
    assert stats.rows_in_spill == 10  # not delivered, but kept for replay_spill
    writer.close()  # the failure was already raised by flush: close does not raise it twice


# ---------------------------------------------------------------- backpressure


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_full_queue_blocks_the_writer_instead_of_dropping_rows(service, in_flight: int) -> None:
    """What a slow store (answering, not failing) lets the writer hold with no memory backlog:
    in_flight batches at the store, one waiting for a free lane, queue_size writes in the queue;
    the next write blocks. No outage, so nothing is spilled."""
    run_id, layer_id = new_layer(service)
    slow = Gated(real_transport("rest", service, run_id, layer_id))
    writer = ActivationWriter(slow, batch_rows=10, queue_size=1, in_flight=in_flight, memory_backlog_bytes=0)
    for seed in range(in_flight):
        writer.write(matrix(10, seed=seed))  # each a full batch, taken to the store, which holds it
    assert slow.wait_for_senders(in_flight)
    accepted = in_flight
    writer.write(matrix(10, seed=accepted))  # the sender takes it and waits for a free lane
    accepted += 1
    deadline = time.monotonic() + 5
    while not writer._queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.write(matrix(10, seed=accepted))  # fills the queue (size 1)
    accepted += 1

    blocked_done = threading.Event()

    def blocked_write() -> None:
        writer.write(matrix(10, seed=accepted))
        blocked_done.set()

    blocked = threading.Thread(target=blocked_write)
    blocked.start()
    assert not blocked_done.wait(0.3), "write() returned although the queue was full"
    assert writer.stats().rows_queued == 10 * (accepted + 1) and writer.stats().rows_sent == 0
    assert slow.most_waiting == in_flight

    slow.gate.set()
    assert blocked_done.wait(10)
    blocked.join()
    stats = writer.close()
    assert stored_row_count(service.database_url, layer_id) == 10 * (accepted + 1)
    assert stats.rows_sent == 10 * (accepted + 1) and stats.seconds_blocked >= 0.25
    assert stats.rows_spilled == 0 and writer.spill_path is None


@pytest.mark.parametrize("in_flight", [1, 3])
def test_at_most_in_flight_batches_are_sent_at_once(service, transport_kind: str, in_flight: int) -> None:
    run_id, layer_id = new_layer(service)
    slow = Gated(real_transport(transport_kind, service, run_id, layer_id))
    with ActivationWriter(slow, batch_rows=100, in_flight=in_flight) as writer:
        writer.write(matrix(700), sample_id=np.arange(700))  # seven batches
        assert slow.wait_for_senders(in_flight)
        time.sleep(0.2)  # time enough for a wrongly dispatched extra batch to arrive at the gate
        assert slow.waiting == in_flight
        slow.gate.set()
    assert slow.most_waiting == in_flight
    assert sorted(ledger(service.database_url, layer_id)) == sorted(f"{writer.writer_id}-{seq}" for seq in range(7))
    assert stored_row_count(service.database_url, layer_id) == 700 and writer.stats().rows_sent == 700


# ---------------------------------------------------------------- permanent failures


def test_a_wrong_dimension_surfaces_as_a_typed_error_with_the_field(service, transport_kind: str) -> None:
    run_id, layer_id = new_layer(service, dim=4)
    writer = ActivationWriter(real_transport(transport_kind, service, run_id, layer_id), backoff_s=0.01)
    writer.write(matrix(20, dim=5))
    with pytest.raises(BatchRejected) as caught:
        writer.flush()
    error = caught.value
    assert isinstance(error, EideticAPIError)
    assert (error.status, error.code, error.field) == (422, "dimension_mismatch", "rows[0].values")
    assert "dimension 4" in error.message and error.batch_id == f"{writer.writer_id}-0"
    assert writer.stats().retries == 0  # a 4xx is never retried
    with pytest.raises(BatchRejected):  # the writer stays failed: later writes say so too
        writer.write(matrix(20, dim=5))
    writer.close()
    assert stored_row_count(service.database_url, layer_id) == 0
    assert writer.stats().rows_failed == 20


class RejectOne:
    """Refuses one batch for good (as a 4xx would); the others reach the real store."""

    def __init__(self, inner: Transport, suffix: str) -> None:
        self.inner = inner
        self.suffix = suffix

    def send(self, batch_id: str, rows: ActivationRows) -> IngestReceipt:
        if batch_id.endswith(self.suffix):
            raise EideticAPIError(422, "invalid_value", "refused (injected)", "rows")
        return self.inner.send(batch_id, rows)

    def close(self) -> None:
        self.inner.close()


def test_a_batch_refused_while_others_are_in_flight_stops_the_writer_and_the_counts_add_up(
    service, transport_kind: str
) -> None:
    run_id, layer_id = new_layer(service)
    refusing = RejectOne(real_transport(transport_kind, service, run_id, layer_id), suffix="-2")
    writer = ActivationWriter(refusing, batch_rows=100, in_flight=2)
    writer.write(matrix(1000))
    with pytest.raises(BatchRejected) as caught:
        writer.close()
    assert caught.value.batch_id == f"{writer.writer_id}-2"
    stats = writer.stats()
    stored = stored_row_count(service.database_url, layer_id)
    assert stats.rows_sent == stored == 100 * len(ledger(service.database_url, layer_id))
    assert stats.rows_sent + stats.rows_failed == stats.rows_queued == 1000 and stats.rows_pending == 0
    assert f"{writer.writer_id}-2" not in ledger(service.database_url, layer_id)


def test_an_unreported_failure_is_raised_by_close(service) -> None:
    run_id, layer_id = new_layer(service, dim=4)
    with pytest.raises(BatchRejected) as caught:
        with ActivationWriter(real_transport("rest", service, run_id, layer_id)) as writer:
            writer.write(matrix(3, dim=5))
    assert caught.value.code == "dimension_mismatch"


def test_a_missing_layer_is_a_typed_not_found(service, transport_kind: str) -> None:
    run_id, _ = new_layer(service)
    writer = ActivationWriter(real_transport(transport_kind, service, run_id, 999_999))
    writer.write(matrix(2))
    with pytest.raises(BatchRejected) as caught:
        writer.close()
    assert (caught.value.status, caught.value.code, caught.value.field) == (404, "not_found", "layer_id")


def test_rows_of_another_dimension_are_refused_at_write(service) -> None:
    run_id, layer_id = new_layer(service)
    with ActivationWriter(real_transport("rest", service, run_id, layer_id)) as writer:
        writer.write(matrix(2))
        with pytest.raises(ValueError, match="8 values"):
            writer.write(matrix(2, dim=3))
        with pytest.raises(ValueError, match="2-D"):
            writer.write(np.zeros(DIM, dtype=np.float32))
    assert stored_row_count(service.database_url, layer_id) == 2


# ---------------------------------------------------------------- flush and close


def test_flush_waits_for_acknowledgement_and_the_writer_goes_on(service) -> None:
    run_id, layer_id = new_layer(service)
    writer = ActivationWriter(real_transport("rest", service, run_id, layer_id), batch_rows=10_000, linger_s=60)
    assert writer.flush().rows_sent == 0  # nothing queued: returns at once
    writer.write(matrix(70))
    stats = writer.flush()
    assert stats.rows_sent == 70 and stats.rows_pending == 0  # a partial batch is sent, not kept back
    assert stored_row_count(service.database_url, layer_id) == 70

    writer.write(matrix(30, seed=1))
    final = writer.close()
    assert stored_row_count(service.database_url, layer_id) == 100
    assert (final.rows_queued, final.rows_sent, final.batches_sent) == (100, 100, 2)

    assert writer.close() == final  # closing twice is a no-op
    with pytest.raises(WriterClosed):
        writer.write(matrix(1))


def test_a_writer_left_open_delivers_its_rows_when_the_process_exits(service, transport_kind: str) -> None:
    """The training script forgets close(): the writer still sends everything, in flight included."""
    run_id, layer_id = new_layer(service)
    transport = (
        f"RestTransport(EideticClient({service.base_url!r}, {service.write_key!r}), {run_id}, {layer_id})"
        if transport_kind == "rest"
        else f"DirectTransport({service.database_url!r}, {run_id}, {layer_id})"
    )
    script = (
        "import numpy as np\n"
        "from eidetic.client import EideticClient\n"
        "from eidetic.writer import ActivationWriter\n"
        "from eidetic.direct import DirectTransport\n"
        "from eidetic.transports import RestTransport\n"
        f"writer = ActivationWriter({transport}, batch_rows=100, linger_s=60, in_flight=2)\n"
        f"writer.write(np.ones((1050, {DIM}), dtype=np.float32))\n"
        "print('exiting without close', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exiting without close" in done.stdout
    assert stored_row_count(service.database_url, layer_id) == 1050
    assert sorted(ledger(service.database_url, layer_id).values()) == [50] + [100] * 10


def test_a_lingering_partial_batch_is_sent_without_flush(service) -> None:
    run_id, layer_id = new_layer(service)
    writer = ActivationWriter(real_transport("rest", service, run_id, layer_id), batch_rows=10_000, linger_s=0.05)
    writer.write(matrix(5))
    deadline = time.monotonic() + 5
    while writer.stats().rows_sent < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stored_row_count(service.database_url, layer_id) == 5
    writer.close()


def test_open_writer_picks_the_transport_from_settings(service, transport_kind: str) -> None:
    run_id, layer_id = new_layer(service)
    settings = ClientSettings(
        _env_file=None,
        eidetic_url=service.base_url,
        eidetic_api_key=service.write_key,
        database_url=service.database_url,
        eidetic_transport=transport_kind,
        writer_batch_rows=64,
    )
    with open_writer(run_id, layer_id, settings) as writer:
        expected = RestTransport if transport_kind == "rest" else DirectTransport
        assert isinstance(writer._transport, expected)
        assert writer.batch_rows == 64
        writer.write(matrix(100))
    assert sorted(ledger(service.database_url, layer_id).values()) == [36, 64]


def test_open_writer_direct_needs_a_database_url() -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        open_writer(1, 1, ClientSettings(_env_file=None, database_url=None), transport="direct")


# ---------------------------------------------------------------- torch input


def test_torch_tensors_are_detached_and_copied(service, api) -> None:
    torch = pytest.importorskip("torch", reason="torch (the [train] extra) is not installed")
    run_id, layer_id = new_layer(service)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, DIM)
    inputs = torch.randn(16, 4)
    with ActivationWriter(real_transport("rest", service, run_id, layer_id)) as writer:
        outputs = layer(inputs)  # requires grad
        expected = outputs.detach().numpy().copy()
        writer.write(
            outputs,
            sample_id=torch.arange(16),
            step=torch.tensor(3),
            label=torch.arange(16) % 2,
            task="torch",
        )
        outputs.data.zero_()  # the caller reuses its buffer at once: the queued rows must not change
        writer.write(layer(inputs).to(torch.bfloat16), sample_id=torch.arange(16, 32))
    stored = {row["sample_id"]: row for row in read_back(api, run_id, layer_id)}
    assert len(stored) == 32
    np.testing.assert_allclose(stored[7]["values"], expected[7], rtol=1e-6)
    assert stored[7]["step"] == 3 and stored[7]["label"] == 1 and stored[7]["task"] == "torch"
    np.testing.assert_allclose(stored[23]["values"], expected[7], rtol=1e-2, atol=1e-2)  # bfloat16 precision


# ---------------------------------------------------------------- settings


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No USE_DB or EIDETIC_* from the outer environment, and a working directory without a .env."""
    for name in ("USE_DB", "EIDETIC_URL", "EIDETIC_API_KEY", "DATABASE_URL", "EIDETIC_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("text", ["true", "1", "yes", "on", "TRUE", "On"])
def test_use_db_accepts_the_usual_spellings_of_on(clean_env, monkeypatch, text: str) -> None:
    monkeypatch.setenv("USE_DB", text)
    assert ClientSettings().use_db is True


@pytest.mark.parametrize("text", ["false", "0", "no", "off"])
def test_use_db_accepts_the_usual_spellings_of_off(clean_env, monkeypatch, text: str) -> None:
    monkeypatch.setenv("USE_DB", text)
    assert ClientSettings().use_db is False


def test_settings_defaults_without_environment(clean_env) -> None:
    settings = ClientSettings()
    assert settings.use_db is False
    assert settings.eidetic_url == "http://127.0.0.1:8000"
    assert settings.api_key() is None and settings.database_url is None
    assert settings.eidetic_transport == "rest"


def test_use_db_nonsense_is_an_error(clean_env, monkeypatch) -> None:
    monkeypatch.setenv("USE_DB", "maybe")
    with pytest.raises(ValidationError):
        ClientSettings()


def test_settings_read_a_dotenv_file_and_the_environment_wins(clean_env, monkeypatch) -> None:
    (clean_env / ".env").write_text(
        "USE_DB=yes\nEIDETIC_URL=http://store.example:9000\nEIDETIC_API_KEY=secret\nEIDETIC_PORT=1234\n"
    )
    settings = ClientSettings()
    assert settings.use_db is True
    assert settings.eidetic_url == "http://store.example:9000"
    assert settings.api_key() == "secret" and "secret" not in repr(settings)

    monkeypatch.setenv("USE_DB", "off")
    assert ClientSettings().use_db is False


# ---------------------------------------------------------------- the REST client's errors


def test_client_errors_carry_the_service_error(service) -> None:
    with EideticClient(service.base_url, service.write_key) as client:
        run = client.create_run("duplicate-name")
        with pytest.raises(EideticAPIError) as caught:
            client.create_run("duplicate-name")
        assert (caught.value.status, caught.value.code, caught.value.field) == (409, "conflict", "name")
        with pytest.raises(EideticAPIError) as caught:
            client.create_layer(run.id, "too-wide", 0)
        assert caught.value.status == 422 and caught.value.code == "invalid_input" and not caught.value.retryable
    with EideticClient(service.base_url, "not-a-key") as stranger:
        with pytest.raises(EideticAPIError) as caught:
            stranger.get_run(run.id)
        assert caught.value.status == 401 and caught.value.code == "unauthenticated"


def test_client_reads_a_layer_summary(service) -> None:
    run_id, layer_id = new_layer(service, dim=3)
    values = np.array([[1, 2, 3], [3, 2, 1]], dtype=np.float32)
    with ActivationWriter(real_transport("rest", service, run_id, layer_id)) as writer:
        writer.write(values, task="A")
    with EideticClient(service.base_url, service.write_key) as client:
        summary = client.layer_summary(run_id, layer_id)
        assert summary.rows == 2
        np.testing.assert_allclose(summary.mean, [2, 2, 2])
        np.testing.assert_allclose(summary.max, [3, 2, 3])
        assert client.layer_summary(run_id, layer_id, task="B").rows == 0
