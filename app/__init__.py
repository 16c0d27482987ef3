"""Eidetic: a Postgres-backed activation store and indexing service for PyTorch training."""

__version__ = "0.1.0"
