"""A real PostgreSQL + pgvector for the suite: one server per session, a fresh database per test.

Order of preference: DATABASE_URL (any server with pgvector), testcontainers with the
pgvector image when a Docker engine answers, else the embedded server from the wheel.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import uvicorn
from psycopg import sql
from psycopg.conninfo import make_conninfo

from app import keys, migrate
from app.main import create_app
from app.settings import Settings


def _docker_engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """An admin URL of a PostgreSQL server with pgvector."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    if _docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("pgvector/pgvector:pg17", driver=None) as container:
            yield container.get_connection_url()
        return
    from app.embedded import EmbeddedPostgres

    data_dir = tempfile.mkdtemp(prefix="eidetic-test-pg-")
    server = EmbeddedPostgres(os.path.join(data_dir, "pgdata"), cleanup="delete")
    yield server.url()
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def database_url_for(server_url: str, name: str) -> str:
    return make_conninfo(server_url, dbname=name)


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """A database migrated to head once; every test copies it (much faster than migrating)."""
    name = f"eidetic_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate.upgrade(database_url_for(server_url, name))
    yield name
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(server_url: str, template_database: str) -> Iterator[str]:
    """A fresh database at the head revision, dropped after the test."""
    name = f"eidetic_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template_database))
        )
    yield database_url_for(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"eidetic_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield database_url_for(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """A running API over HTTP on loopback, with a write key of project 'alpha'."""

    base_url: str
    database_url: str
    write_key: str

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.write_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def new_key(self, project: str = "alpha", scope: str = "write") -> str:
        with psycopg.connect(self.database_url) as conn:
            return keys.create_key(conn, project, scope)


def start_service(settings: Settings, database_url: str) -> tuple[uvicorn.Server, threading.Thread, str]:
    """Runs uvicorn in a thread on a free loopback port and waits until it accepts requests."""
    port = free_port()
    config = uvicorn.Config(create_app(settings, database_url), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test service did not start")
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def stop_service(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=20)


@pytest.fixture
def settings() -> Settings:
    return Settings(database_url=None, no_auth=False, max_body_bytes=8 * 1024 * 1024, max_rows_per_batch=50_000)


@pytest.fixture
def service(database_url: str, settings: Settings) -> Iterator[Service]:
    server, thread, base_url = start_service(settings, database_url)
    with psycopg.connect(database_url) as conn:
        write_key = keys.create_key(conn, "alpha", "write")
    yield Service(base_url=base_url, database_url=database_url, write_key=write_key)
    stop_service(server, thread)


@pytest.fixture
def api(service: Service) -> Iterator[httpx.Client]:
    """An HTTP client of the service holding a write key of project 'alpha'."""
    with service.client() as client:
        yield client


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on two fighting over a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def citus_cluster():
    """A Citus coordinator and 2 workers on loopback, children of this session (built once, cached).

    Skipped where the vendored Citus sources are absent (a user's checkout without shared/).
    """
    from tests import citus_kit

    if citus_kit.tarball() is None:
        pytest.skip(f"Citus sources ({citus_kit.TARBALL_NAME}) not found: set EIDETIC_CITUS_TARBALL to run these")
    with citus_kit.cluster(workers=2) as cluster:
        yield cluster
