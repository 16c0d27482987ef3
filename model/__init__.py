"""The models and experiments of Eidetic's design notes: clients of the store through `eidetic`.

Nothing here is imported by the service (app/), and nothing here imports the service: the
models reach the store only through `eidetic` (tests/test_layout.py holds both rules).
"""
