"""What the benchmark scripts share: a fresh database, the service in a thread of the script, activations
shaped like a trained layer's, and the machine facts a run records."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psycopg
import uvicorn

from app import keys, migrate
from app.embedded import EmbeddedPostgres
from app.main import create_app
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]


class Repeats:
    """Best and median of the timed repeats in `seconds` (a subclass's dataclass field)."""

    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class BenchDatabase:
    """A fresh embedded PostgreSQL in a temporary directory, its schema at head."""

    workdir: Path
    server: EmbeddedPostgres
    url: str
    postgres: str  # "PostgreSQL 18.x"
    pgvector: str  # the extension's version


@contextlib.contextmanager
def fresh_database(name: str) -> Iterator[BenchDatabase]:
    """A new server and database for one benchmark run; stopped and its data directory removed at the end."""
    workdir = Path(tempfile.mkdtemp(prefix=f"eidetic-bench-{name}-"))
    server = None
    try:
        server = EmbeddedPostgres(workdir / "pgdata", cleanup="delete")
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE eidetic_bench")
            postgres = "PostgreSQL " + conn.execute("SHOW server_version").fetchone()[0]
        url = server.url("eidetic_bench")
        migrate.upgrade(url)
        with psycopg.connect(url) as conn:
            pgvector = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        yield BenchDatabase(workdir, server, url, postgres, pgvector)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def activations(n_rows: int, dim: int, seed: int) -> np.ndarray:
    """A mixture like a trained network's: per-unit shifts and scales, half the units post-ReLU
    (a point mass of exact zeros: ties), a quarter log-normal (heavy right tail), the rest gaussian."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n_rows, dim), dtype=np.float32)
    values *= rng.uniform(0.25, 2.0, dim).astype(np.float32)
    values += rng.uniform(-1.0, 1.0, dim).astype(np.float32)
    units = np.arange(dim)
    for unit in units[units % 2 == 0]:
        np.maximum(values[:, unit], 0, out=values[:, unit])
    for unit in units[units % 4 == 1]:
        np.exp(values[:, unit], out=values[:, unit])
    return values


@dataclass
class Service:
    """The API over HTTP on loopback (uvicorn in a thread of this process) and a write key."""

    client: httpx.Client
    server: uvicorn.Server
    thread: threading.Thread
    base_url: str
    database_url: str
    project_id: int
    write_key: str

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_service(database_url: str, settings: Settings) -> Service:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, database_url), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the service did not start")
        time.sleep(0.01)
    with psycopg.connect(database_url, autocommit=True) as conn:
        key = keys.create_key(conn, "bench", "write")
        project_id = keys.ensure_project(conn, "bench")
    base_url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    return Service(client, server, thread, base_url, database_url, project_id, key)


def load_words(before: float, after: float) -> str:
    """The 1-minute load average at the start and end of a run, and whether other work shared the CPUs."""
    cpus = os.cpu_count() or 1
    shared = max(before, after) > cpus / 2 + 0.5  # our own run keeps about one CPU busy
    return f"load average {before:.1f} at the start, {after:.1f} at the end" + (
        f": other work shared the {cpus} CPUs" if shared else f", on {cpus} CPUs: no other work to speak of"
    )


def machine_facts(command: str, software: str) -> dict[str, str]:
    """The date, machine and exact command a run was measured with."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    memory = f"{int(match.group(1)) / 1024**2:.1f} GiB" if match else "unknown"
    return {
        "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "software": software,
        "command": command,
    }
