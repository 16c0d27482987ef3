"""Alembic environment and revisions: the only way Eidetic's schema changes."""
