"""Experiments: one module each, run as `python -m model.experiments.NAME` with USE_DB on or off.

Each is seeded, shows a progress bar, writes its metrics as JSON under --out-dir, and,
with USE_DB on, records its run and what it measured in the store.
"""
