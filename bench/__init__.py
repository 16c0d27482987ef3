"""The benchmarks, run through one driver: `python -m bench NAME [options]` (bench/__main__.py).

Each benchmark is a module of this package with the same three names:

- `build_parser(prog)`: its options, declared once (the driver adds its own to them);
- `TINY`: the options of a smoke run (seconds, not minutes: figures of no value);
- `run(args, command) -> record.Outcome`: measures, and reports the figures as Markdown and as data.

Nothing heavy is imported here: `python -m bench list` loads no benchmark.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BENCHMARKS", "RESULTS_DIR", "RESULTS_MD", "Benchmark"]

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"  # one NAME.json per benchmark: its latest recorded run
RESULTS_MD = BENCH / "RESULTS.md"  # hand-written prose around regions rendered from those files


@dataclass(frozen=True)
class Benchmark:
    name: str
    heading: str  # the section of RESULTS.md the benchmark's region sits in
    summary: str
    requires: tuple[str, ...] = ()  # modules beyond the service's own dependencies (the [train] extra)

    @property
    def module(self) -> str:
        return f"bench.{self.name}"

    def missing(self) -> list[str]:
        """The required modules this environment lacks."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "ingest",
            "## Ingest (bench/ingest.py)",
            "ActivationWriter (direct COPY, REST Arrow) against raw binary COPY, and its cost to a training loop",
            requires=("torch", "sklearn"),
        ),
        Benchmark(
            "knn",
            "## Nearest neighbours (bench/knn.py)",
            "the service's HNSW search against raw pgvector SQL, FAISS HNSW and exact search",
        ),
        Benchmark(
            "bank_writes",
            "## Bank writes (bench/bank_writes.py)",
            "a segmented bank's writes and search while merges run, against writes into one live HNSW index",
        ),
        Benchmark(
            "quantiles",
            "## Quantiles (bench/quantiles.py)",
            "exact quantiles over the service against numpy; KLL sketches against exact",
        ),
        Benchmark(
            "caches",
            "## Device caches (bench/caches.py)",
            "QuantileCache against the seed's search, MemoryCache against numpy and the service",
            requires=("torch", "threadpoolctl"),
        ),
        Benchmark(
            "memory_path",
            "## Memory classifier (model/experiments/memory_classifier.py)",
            "memory path against network path after the features: device cache, matmul anchor, service",
            requires=("torch",),
        ),
        Benchmark(
            "reliability",
            "## Reliability (bench/reliability.py)",
            "crashes and freezes mid-ingest against an earlier revision's API, then a bounded mixed load",
        ),
        Benchmark(
            "dashboard",
            "## Dashboard (bench/dashboard.py)",
            "every page of a 1,000,000 x 128 layer as the browser loads it, sampled aggregates against exact",
        ),
        Benchmark(
            "scale_out",
            "## Scale-out on Citus (bench/scale_out.py)",
            "a single server against a 3-node Citus cluster: ingest, search, routing, cross-run queries, projection",
        ),
    )
}
