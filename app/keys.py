"""Projects and API keys: a key is shown once, stored as a hash, and scoped to one project."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import IntEnum

import psycopg

from app.database import one_row
from eidetic.errors import Forbidden, InvalidInput, Unauthenticated

KEY_PREFIX = "eid"
DEFAULT_PROJECT = "default"


class Scope(IntEnum):
    """Scopes are ordered: a write key can read, an admin key can do everything."""

    read = 1
    write = 2
    admin = 3


@dataclass(frozen=True)
class Principal:
    """Who is calling: the project the key belongs to and what it may do there."""

    project_id: int
    project_name: str
    scope: Scope

    def require(self, needed: Scope) -> None:
        if self.scope < needed:
            raise Forbidden(f"this key's scope is {self.scope.name}; {needed.name} is needed")


def hash_key(key: str) -> bytes:
    # Keys carry 256 random bits, so one SHA-256 suffices (no slow KDF needed as for passwords).
    return hashlib.sha256(key.encode()).digest()


def ensure_project(conn: psycopg.Connection, name: str) -> int:
    if not name or len(name) > 200:
        raise InvalidInput("a project name has 1 to 200 characters", field="project")
    row = one_row(
        conn.execute(
            "INSERT INTO projects (name) VALUES (%s) "
            "ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            (name,),
        )
    )
    return int(row[0])


def create_key(conn: psycopg.Connection, project: str, scope: Scope | str) -> str:
    """Creates a key for the project (made if needed) and returns it: the only time it is seen."""
    scope = Scope[scope] if isinstance(scope, str) else scope
    prefix = secrets.token_hex(4)
    key = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    with conn.transaction():
        project_id = ensure_project(conn, project)
        conn.execute(
            "INSERT INTO api_keys (project_id, key_prefix, key_hash, scope) VALUES (%s, %s, %s, %s)",
            (project_id, prefix, hash_key(key), scope.name),
        )
    return key


def list_keys(conn: psycopg.Connection, project: str | None = None) -> list[dict]:
    rows = conn.execute(
        "SELECT k.key_prefix, p.name, k.scope, k.created_at, k.revoked_at FROM api_keys k "
        "JOIN projects p ON p.id = k.project_id WHERE %s::text IS NULL OR p.name = %s ORDER BY k.id",
        (project, project),
    ).fetchall()
    keys = ("prefix", "project", "scope", "created_at", "revoked_at")
    return [dict(zip(keys, row)) for row in rows]


def revoke_key(conn: psycopg.Connection, prefix: str) -> bool:
    cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_prefix = %s AND revoked_at IS NULL", (prefix,))
    return cur.rowcount > 0


def authenticate(conn: psycopg.Connection, key: str) -> Principal:
    row = conn.execute(
        "SELECT p.id, p.name, k.scope FROM api_keys k JOIN projects p ON p.id = k.project_id "
        "WHERE k.key_hash = %s AND k.revoked_at IS NULL",
        (hash_key(key),),
    ).fetchone()
    if row is None:
        raise Unauthenticated("the API key is unknown or revoked", field="Authorization")
    return Principal(project_id=int(row[0]), project_name=row[1], scope=Scope[row[2]])


def open_principal(conn: psycopg.Connection) -> Principal:
    """The caller when auth is off (loopback only): an admin of the default project."""
    return Principal(project_id=ensure_project(conn, DEFAULT_PROJECT), project_name=DEFAULT_PROJECT, scope=Scope.admin)
