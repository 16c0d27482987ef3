"""The training side of Eidetic: clients of the store that run inside PyTorch training jobs.

Nothing here is imported by the service (app/), and nothing imports torch at module
import time unless the module is about a model, so the writer also runs in slim workers.
"""
