"""The schema changes only through alembic, and every revision goes down as well as up."""

import psycopg

from app import migrate


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows}


def test_upgrade_creates_the_store_and_records_head(empty_database_url):
    migrate.upgrade(empty_database_url)
    assert {"projects", "api_keys", "runs", "layers", "ingest_batches", "activations"} <= tables(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()


def test_every_revision_downgrades_and_upgrades_again(empty_database_url):
    migrate.upgrade(empty_database_url)
    revisions = migrate.all_revisions()
    for revision in reversed(revisions):
        migrate.downgrade(empty_database_url, "-1")
        with psycopg.connect(empty_database_url) as conn:
            now = migrate.current_revision(conn)
        position = revisions.index(revision)
        assert now == (revisions[position - 1] if position else None)
    assert tables(empty_database_url) <= {"alembic_version"}
    migrate.upgrade(empty_database_url)
    assert "activations" in tables(empty_database_url)


def test_a_fresh_database_is_not_at_head(empty_database_url):
    with psycopg.connect(empty_database_url) as conn:
        assert migrate.current_revision(conn) is None
