"""Schema migrations through alembic, configured in code so the installed console script finds them."""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

import migrations
from app.database import one_row


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "-1") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("unused"))
    head = script.get_current_head()
    if head is None:
        raise RuntimeError("the migrations have no head revision")
    return head


def all_revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("unused"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def current_revision(conn: psycopg.Connection) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    exists = one_row(conn.execute("SELECT to_regclass('alembic_version') IS NOT NULL"))[0]
    if not exists:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None
