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

Usage: .venv/bin/python -m bench memory_path [--sizes 1000,10000 --dim 128 --batch 128 --classes 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.settings import Settings
from bench.common import fresh_database, machine_facts, start_service
from bench.record import Outcome, plain
from eidetic.client import EideticClient
from eidetic.torch.memory_cache import MemoryCache


def best_per_sample(action: Callable[[Any], object], batches: list, repeats: int) -> float:
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


@dataclass
class PathFigures:
    """Microseconds per query after the features, for one bank size."""

    bank_items: int
    head_us: float
    cache_us: float
    anchor_us: float
    service_exact_us: float
    service_hnsw_us: float


def measure(args: argparse.Namespace) -> list[PathFigures]:
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    queries = [
        torch.from_numpy(rng.standard_normal((args.batch, args.dim)).astype(np.float32)) for _ in range(args.batches)
    ]
    head = nn.Linear(args.dim, args.classes).eval()
    service = None
    figures = []
    with fresh_database("memory-path") as database:
        try:
            settings = Settings(database_url=database.url, data_dir=database.workdir, no_auth=False)
            service = start_service(database.url, settings)
            with EideticClient(service.base_url, service.write_key, timeout=600) as client, torch.inference_mode():
                head_us = best_per_sample(lambda q: head(q), queries, args.repeats)
                for n in args.sizes:
                    stored = rng.standard_normal((n, args.dim)).astype(np.float32)
                    labels = rng.integers(0, args.classes, n)
                    bank = client.create_bank(f"path-{n}", args.dim, n, metric="cosine", policy="none")
                    for start in range(0, n, 2000):
                        items = [
                            {"key": k, "label": int(label)}
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
                    figures.append(PathFigures(n, head_us, cache_us, anchor_us, exact_us, hnsw_us))
                    print(f"  N={n:,}: cache {cache_us:.2f} us, service HNSW {hnsw_us:.0f} us per query", flush=True)
        finally:
            if service is not None:
                service.stop()
    return figures


def report(
    figures: list[PathFigures], args: argparse.Namespace, machine: dict[str, str], load: tuple[float, float]
) -> str:
    lines = [
        f"After the features, per query (`{machine['command']}`, {machine['date']}; {machine['software']}: "
        f"batch {args.batch}, {args.dim} dimensions, {args.classes} classes, Gaussian keys, cosine, "
        f"{args.threads} thread{'' if args.threads == 1 else 's'}; each of {args.batches} batches' best of "
        f"{args.repeats} runs; service: {args.service_batches} batches, best of 3, HTTP on loopback to a fresh "
        f"embedded PostgreSQL; load average {load[0]:.2f} before, {load[1]:.2f} after):",
        "",
        f"| bank items | head: linear {args.dim}→{args.classes} | device cache search | anchor: matmul + max "
        "| cache / head | service, exact | service, HNSW ef_search 40 | service HNSW / cache |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append(
            f"| {f.bank_items:,} | {f.head_us:.2f} µs | {f.cache_us:.2f} µs | {f.anchor_us:.2f} µs | "
            f"{f.cache_us / f.head_us:.0f}x | {f.service_exact_us:,.0f} µs | {f.service_hnsw_us:,.0f} µs | "
            f"{f.service_hnsw_us / f.cache_us:.0f}x |"
        )
    return "\n".join(lines) + "\n"


# Options of a smoke run: one small bank, a few batches.
TINY = shlex.split("--sizes 200 --dim 16 --batch 8 --batches 2 --service-batches 1 --repeats 1")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1000, 10000],
        help="bank sizes N, e.g. 1000,10000",
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--service-batches", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def run(args: argparse.Namespace, command: str) -> Outcome:
    machine = machine_facts(
        command, f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
    )
    load_before = os.getloadavg()[0]
    figures = measure(args)
    load = (load_before, os.getloadavg()[0])
    return Outcome(report(figures, args, machine, load), {"banks": plain(figures), "load": list(load)}, machine)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["memory_path", *sys.argv[1:]]))
