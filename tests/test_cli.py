"""The `eidetic` console script: `up` on the embedded database, keys, migrate, loopback-only --no-auth."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app import migrate
from tests.conftest import free_port

EIDETIC = [sys.executable, "-m", "app.cli"]


def embedded_env() -> dict:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    return env


def wait_ready(base_url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"eidetic up exited early:\n{process.stdout.read()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("eidetic up never became ready")


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(attrs=["name", "cmdline"]):
        if process.info["name"] == "postgres" and str(data_dir) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")), reason="exercises the embedded server, which DATABASE_URL replaces"
)
def test_up_serves_on_the_embedded_database_and_stops_cleanly_on_ctrl_c(tmp_path):
    data_dir = tmp_path / "pg"
    key = subprocess.run(
        [*EIDETIC, "keys", "create", "--data-dir", str(data_dir), "--project", "demo", "--scope", "write"],
        capture_output=True,
        text=True,
        env=embedded_env(),
        timeout=120,
        check=True,
    ).stdout.strip()
    assert key.startswith("eid_")
    port = free_port()
    process = subprocess.Popen(
        [*EIDETIC, "up", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=embedded_env(),
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process)
        assert httpx.get(f"{base_url}/v1/runs").status_code == 401
        headers = {"Authorization": f"Bearer {key}"}
        created = httpx.post(f"{base_url}/v1/runs", json={"name": "cli"}, headers=headers)
        assert created.status_code == 201
        assert postgres_processes(data_dir), "the embedded server should be running"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 20
    while postgres_processes(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not postgres_processes(data_dir), "Ctrl-C should stop the embedded server too"
    # the data outlives the process: a second start sees the run
    process = subprocess.Popen(
        [*EIDETIC, "up", "--port", str(port), "--data-dir", str(data_dir), "--no-auth"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=embedded_env(),
    )
    try:
        wait_ready(base_url, process)
        assert httpx.get(f"{base_url}/v1/runs").json()["runs"] == []  # --no-auth acts in project 'default'
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    assert "AUTHENTICATION IS OFF" in output


def test_no_auth_is_refused_off_loopback(tmp_path):
    result = subprocess.run(
        [*EIDETIC, "up", "--host", "0.0.0.0", "--no-auth", "--data-dir", str(tmp_path / "pg")],
        capture_output=True,
        text=True,
        env=embedded_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "only on a loopback address" in result.stderr
    assert not (tmp_path / "pg").exists(), "nothing should start when the flags are refused"


def test_migrate_up_and_down_through_the_cli(empty_database_url):
    env = {**os.environ, "DATABASE_URL": empty_database_url}
    up = subprocess.run([*EIDETIC, "migrate"], capture_output=True, text=True, env=env, timeout=120)
    assert up.returncode == 0 and f"schema at {migrate.head_revision()}" in up.stdout
    down = subprocess.run(
        [*EIDETIC, "migrate", "--downgrade", "base"], capture_output=True, text=True, env=env, timeout=120
    )
    assert down.returncode == 0 and "schema at base" in down.stdout


def test_serve_without_database_url_explains_itself():
    result = subprocess.run([*EIDETIC, "serve"], capture_output=True, text=True, env=embedded_env(), timeout=60)
    assert result.returncode == 2 and "needs DATABASE_URL" in result.stderr


@pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")), reason="exercises the embedded server, which DATABASE_URL replaces"
)
def test_data_dir_flag_and_environment_name_the_same_directory(tmp_path):
    data_dir = tmp_path / "pg"
    made = subprocess.run(
        [*EIDETIC, "keys", "create", "--project", "demo", "--scope", "read"],
        capture_output=True,
        text=True,
        env={**embedded_env(), "EIDETIC_DATA_DIR": str(data_dir)},
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    assert (data_dir / "PG_VERSION").exists(), "EIDETIC_DATA_DIR names the server's own data directory"
    listed = subprocess.run(
        [*EIDETIC, "keys", "list", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        env=embedded_env(),
        timeout=120,
    )
    assert listed.returncode == 0 and made.stdout.strip().split("_")[1] in listed.stdout


def test_a_server_in_the_earlier_layout_is_still_found(tmp_path):
    from app.cli import embedded_data_dir
    from app.settings import Settings

    (tmp_path / "pgdata").mkdir()
    (tmp_path / "pgdata" / "PG_VERSION").write_text("18\n")
    assert embedded_data_dir(Settings(data_dir=tmp_path), None) == tmp_path / "pgdata"
    assert embedded_data_dir(Settings(), tmp_path / "fresh") == tmp_path / "fresh"
