"""What the benchmark scripts share: the service in a thread of the script, and their section of RESULTS.md."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import uvicorn

from app import keys
from app.main import create_app
from app.settings import Settings


@dataclass
class Service:
    """The API over HTTP on loopback (uvicorn in a thread of this process) and a write key."""

    client: httpx.Client
    server: uvicorn.Server
    thread: threading.Thread

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
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=600)
    return Service(client, server, thread)


def write_section(path: Path, heading: str, section: str) -> None:
    """Replaces the section under `heading` in RESULTS.md (or appends it), keeping every other section.

    Other benchmarks write their own sections of the same file, so it is read right before writing.
    """
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    after = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + after if after else ""))
