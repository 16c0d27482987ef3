"""The `eidetic` console script: up (embedded database + API), serve, migrate, keys."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from app import distribute, keys, migrate
from app.settings import Settings, get_settings

log = logging.getLogger("eidetic")


def embedded_data_dir(settings: Settings, flag: Path | None) -> Path:
    """The embedded server's data directory: `--data-dir` or EIDETIC_DATA_DIR, which mean the same.

    Earlier versions put the server under EIDETIC_DATA_DIR/pgdata; such a directory is
    still found there (with a warning), so an upgrade never starts an empty database.
    """
    chosen = Path(flag if flag is not None else settings.data_dir).expanduser()
    earlier = chosen / "pgdata"
    if not (chosen / "PG_VERSION").exists() and (earlier / "PG_VERSION").exists():
        log.warning("using the server found in %s (the earlier layout); point EIDETIC_DATA_DIR there", earlier)
        return earlier
    return chosen


@contextmanager
def database(settings: Settings, data_dir: Path | None = None) -> Iterator[str]:
    """The database URL: DATABASE_URL when set, else the embedded server (stopped on exit)."""
    if settings.database_url:
        yield settings.database_url
        return
    from app.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(embedded_data_dir(settings, data_dir), cleanup="stop")
    try:
        yield server.url()
    finally:
        server.stop()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings, database_url: str) -> None:
    import uvicorn

    from app.main import create_app

    migrate.upgrade(database_url)
    uvicorn.run(create_app(settings, database_url), host=settings.host, port=settings.port, log_level="info")


def _with_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over EIDETIC_HOST / EIDETIC_PORT / EIDETIC_NO_AUTH."""
    flags = {name: getattr(args, name, None) for name in ("host", "port", "no_auth")}
    return settings.model_copy(update={name: value for name, value in flags.items() if value is not None})


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    settings = _with_flags(settings, args)
    if settings.no_auth and not is_loopback(settings.host):
        log.error("--no-auth is allowed only on a loopback address, not %s", settings.host)
        return 2
    if settings.no_auth:
        log.warning("*" * 72)
        log.warning(
            "AUTHENTICATION IS OFF: every caller on %s is an admin of project %r", settings.host, keys.DEFAULT_PROJECT
        )
        log.warning("*" * 72)
    data_dir = Path(args.data_dir) if args.data_dir else None
    with database(settings, data_dir) as url:
        serve(settings, url)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    database_url = settings.database_url
    if not database_url:
        log.error("`eidetic serve` needs DATABASE_URL; use `eidetic up` for the embedded database")
        return 2
    serve(_with_flags(settings, args), database_url)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with database(settings, Path(args.data_dir) if args.data_dir else None) as url:
        if args.downgrade is not None:
            migrate.downgrade(url, args.downgrade)
        else:
            migrate.upgrade(url, args.revision)
        if args.distribute:
            with psycopg.connect(url, autocommit=True) as conn:
                if not distribute.distribute(conn):
                    log.error("--distribute needs the citus extension in this database (CREATE EXTENSION citus)")
                    return 2
                print("distributed layout in place")
        with psycopg.connect(url) as conn:
            print(f"schema at {migrate.current_revision(conn) or 'base'} (head {migrate.head_revision()})")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    with database(settings, Path(args.data_dir) if args.data_dir else None) as url:
        migrate.upgrade(url)
        with psycopg.connect(url) as conn:
            if args.keys_command == "create":
                key = keys.create_key(conn, args.project, args.scope)
                print(key)
                print(f"(a {args.scope} key for project {args.project!r}; it is shown only this once)", file=sys.stderr)
            elif args.keys_command == "list":
                for row in keys.list_keys(conn, args.project):
                    state = "revoked" if row["revoked_at"] else "active"
                    print(f"{row['prefix']}  {row['project']}  {row['scope']}  {state}  {row['created_at']:%Y-%m-%d}")
            elif args.keys_command == "revoke" and not keys.revoke_key(conn, args.prefix):
                print(f"no active key with prefix {args.prefix}", file=sys.stderr)
                return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eidetic", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the embedded database (or use DATABASE_URL), migrate, serve")
    up.add_argument("--host", help="address to listen on (default EIDETIC_HOST or 127.0.0.1)")
    up.add_argument("--port", type=int, help="port (default EIDETIC_PORT or 8000)")
    up.add_argument("--data-dir", help="where the embedded server keeps its data")
    up.add_argument("--no-auth", action="store_true", default=None, help="no API keys (loopback addresses only)")
    up.set_defaults(handler=cmd_up)

    serve_parser = commands.add_parser("serve", help="serve the API over DATABASE_URL (migrating first)")
    serve_parser.add_argument("--host", help="address to listen on (default EIDETIC_HOST)")
    serve_parser.add_argument("--port", type=int, help="port (default EIDETIC_PORT or 8000)")
    serve_parser.set_defaults(handler=cmd_serve)

    migrate_parser = commands.add_parser("migrate", help="upgrade the schema (or --downgrade)")
    migrate_parser.add_argument("revision", nargs="?", default="head")
    migrate_parser.add_argument("--downgrade", nargs="?", const="-1", help="revision to go down to (default: one)")
    migrate_parser.add_argument("--data-dir")
    migrate_parser.add_argument(
        "--distribute", action="store_true", help="then lay the schema out over a Citus cluster (idempotent)"
    )
    migrate_parser.set_defaults(handler=cmd_migrate)

    keys_parser = commands.add_parser("keys", help="create, list and revoke API keys")
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", help="the embedded server's data (when DATABASE_URL is unset)")
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", parents=[data_dir])
    create.add_argument("--project", required=True)
    create.add_argument("--scope", choices=[scope.name for scope in keys.Scope], default="write")
    listing = keys_commands.add_parser("list", parents=[data_dir])
    listing.add_argument("--project")
    revoke = keys_commands.add_parser("revoke", parents=[data_dir])
    revoke.add_argument("prefix")
    keys_parser.set_defaults(handler=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.handler(args, get_settings())


if __name__ == "__main__":
    sys.exit(main())
