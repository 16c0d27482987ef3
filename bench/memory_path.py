"""Memory path against network path after the features: what retrieval costs on the device and through the service.

The memory classifier (model/experiments/memory_classifier.py) answers a sample from
memory when its nearest stored item is similar enough, else from the network head. Both
paths share the backbone's features; after them, the memory path retrieves (nearest item
of each query among N keys) and the network path runs the head (one linear layer). This
times, per sample, for a batch of --batch queries of --dim values and a bank of N keys:

1. head: nn.Linear(dim, classes) on the batch (the network path after the features);
2. device cache: MemoryCache.search(queries, k=1), the memory path as the experiment runs it;
3. anchor: the bare device computation the cache cannot beat: unit queries @ unit keys.T, max;
4. service, exact and HNSW (ef_search 40): POST /v1/memory-banks/{id}/search with k=1 over
   HTTP on loopback (uvicorn in this process, a fresh embedded PostgreSQL), i.e. the
   retrieval without a device cache.

Each of --batches batches timed --repeats times, its best run counted (--service-batches
and 3 runs for the service); keys and queries are standard Gaussian
(seed 0), metric cosine, torch on the CPU with --threads threads.

Usage: .venv/bin/python bench/memory_path.py [--sizes 1000,10000 --dim 128 --batch 128 --classes 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.settings import Settings
from bench.common import fresh_database, start_service
from eidetic.client import EideticClient
from eidetic.torch.memory_cache import MemoryCache


def best_per_sample(action, batches: list, repeats: int) -> float:
    """Microseconds per query: each batch's best of `repeats` runs, summed (after one warm-up batch).

    The best of each batch rather than of whole passes, so that other work on a shared
    machine costs a batch its slow runs, not the measurement.
    """
    action(batches[0])
    best = [float("inf")] * len(batches)
    for _ in range(repeats):
        for i, batch in enumerate(batches):
            started = time.perf_counter()
            action(batch)
            best[i] = min(best[i], time.perf_counter() - started)
    return 1e6 * sum(best) / sum(len(batch) for batch in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="bank sizes N, comma-separated")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--service-batches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    queries = [
        torch.from_numpy(rng.standard_normal((args.batch, args.dim)).astype(np.float32)) for _ in range(args.batches)
    ]
    head = nn.Linear(args.dim, args.classes).eval()
    load_before = os.getloadavg()[0]
    service = None
    rows = []
    with fresh_database("memory-path") as database:
        try:
            settings = Settings(database_url=database.url, data_dir=database.workdir, no_auth=False)
            service = start_service(database.url, settings)
            with EideticClient(service.base_url, service.write_key, timeout=600) as client, torch.inference_mode():
                head_us = best_per_sample(lambda q: head(q), queries, args.repeats)
                for n in [int(size) for size in args.sizes.split(",")]:
                    stored = rng.standard_normal((n, args.dim)).astype(np.float32)
                    labels = rng.integers(0, args.classes, n)
                    bank = client.create_bank(f"path-{n}", args.dim, n, metric="cosine", policy="none")
                    for start in range(0, n, 2000):
                        items = [
                            {"key": k.tolist(), "label": int(label)}
                            for k, label in zip(stored[start : start + 2000], labels[start : start + 2000])
                        ]
                        client.write_items(bank["id"], items)
                    cache = MemoryCache.from_service(client, bank["id"])
                    unit_keys = F.normalize(torch.from_numpy(stored), dim=1)
                    cache_us = best_per_sample(lambda q: cache.search(q, k=1), queries, args.repeats)
                    anchor_us = best_per_sample(
                        lambda q: (F.normalize(q, dim=1) @ unit_keys.T).max(dim=1), queries, args.repeats
                    )
                    few = [q.numpy() for q in queries[: args.service_batches]]
                    exact_us = best_per_sample(lambda q: client.search(bank["id"], q, k=1, exact=True), few, 3)
                    hnsw_us = best_per_sample(lambda q: client.search(bank["id"], q, k=1, ef_search=40), few, 3)
                    rows.append((n, head_us, cache_us, anchor_us, exact_us, hnsw_us))
        finally:
            if service is not None:
                service.stop()
    print(
        f"per query, batch {args.batch}, dim {args.dim}, {args.classes} classes, torch {torch.__version__} on "
        f"{args.threads} CPU thread(s); load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        "| bank items | head (us) | device cache search (us) | anchor: matmul + max (us) | cache / head | "
        "service exact (us) | service HNSW ef 40 (us) | service HNSW / cache |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, head_us, cache_us, anchor_us, exact_us, hnsw_us in rows:
        print(
            f"| {n:,} | {head_us:.2f} | {cache_us:.2f} | {anchor_us:.2f} | {cache_us / head_us:.1f}x | "
            f"{exact_us:.1f} | {hnsw_us:.1f} | {hnsw_us / cache_us:.0f}x |"
        )


if __name__ == "__main__":
    main()
