"""Quantiles: exact through the service against numpy, KLL sketches against exact, and what sketches cost at ingest.

One run on a fresh embedded PostgreSQL (a temporary data directory, removed at the end):

1. exact: `--rows x --dim` activations in a layer without sketches; POST .../quantiles
   method=exact (Q=10 and Q=100) over HTTP, against the anchor numpy
   `np.quantile(matrix, levels, axis=0, method="inverted_cdf")` on the same matrix in memory.
   Targets: the service at most 3x numpy, and the very same boundaries.
2. sketch: `--sketch-rows x --sketch-dim` activations in a layer with sketches; method=sketch
   against method=exact, both through the service (Q=100). Targets: at least 10x faster, and
   both the rank error measured against the stored matrix and the stated bound at most 1%.
3. ingest: rows/s into each layer and into a twin with the other sketch setting, batch by
   batch in turn (so checkpoints and other load fall on both alike), so the cost of keeping
   sketches in step with ingest is visible.

The exact path is also split into its parts (raw binary COPY out, COPY parsed into a
float32 block, numpy boundaries of the block) so a slow part shows up by name.

Usage: .venv/bin/python -m bench quantiles [--rows 60000 --dim 128 --sketch-rows 6000000 --sketch-dim 16 --repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import numpy as np
from psycopg import sql

from app import runs
from app.copy_binary import iter_vectors
from app.database import connect
from app.settings import Settings
from bench.common import Service, activations, fresh_database, load_words, machine_facts, start_service
from bench.record import Outcome, plain
from eidetic.wire.formats import ARROW_STREAM, rows_to_arrow
from eidetic.wire.order_statistics import exact_boundaries_of
from eidetic.wire.rows import ActivationRows

EXACT_TARGET_RATIO = 3.0  # the service's exact path at most 3x numpy on the same matrix
SKETCH_TARGET_SPEEDUP = 10.0  # sketch at least 10x faster than exact at scale
SKETCH_WAIT_S = 50.0  # under the service's 60 s request timeout
RANK_ERROR_TARGET = 0.01  # measured and stated rank error at most 1%

T = TypeVar("T")


# ---------------------------------------------------------------- data


def labels_of(n_rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, n_rows, dtype=np.int32)


# ---------------------------------------------------------------- the service


def create_layer(service: Service, run_id: int, name: str, dim: int, sketch: bool) -> int:
    response = service.client.post(f"/v1/runs/{run_id}/layers", json={"name": name, "dim": dim, "sketch": sketch})
    _expect(response, 201)
    return response.json()["id"]


def ingest_over_http(
    service: Service, run_id: int, layer_rows: dict[int, int], matrix: np.ndarray, batch_rows: int
) -> dict[int, float]:
    """Stores the first `layer_rows[layer]` rows of the matrix in each layer, batch by batch in turn.

    Returns the seconds the service took to acknowledge each layer's batches (Arrow encoding
    on the client not counted). Taking turns, and swapping who goes first, spreads background
    work (checkpoints, other processes) evenly over the layers being compared.
    """
    labels = labels_of(len(matrix), seed=7)
    spent = dict.fromkeys(layer_rows, 0.0)
    for number, start in enumerate(range(0, len(matrix), batch_rows)):
        stop = min(start + batch_rows, len(matrix))
        rows = ActivationRows.build(
            matrix[start:stop], sample_id=np.arange(start, stop), step=number, epoch=0, label=labels[start:stop]
        )
        body = rows_to_arrow(rows, f"batch-{number}")
        turn = list(layer_rows) if number % 2 == 0 else list(reversed(layer_rows))
        for layer_id in turn:
            if stop > layer_rows[layer_id]:
                continue
            began = time.perf_counter()
            response = service.client.post(
                f"/v1/runs/{run_id}/layers/{layer_id}/activations", content=body, headers={"content-type": ARROW_STREAM}
            )
            spent[layer_id] += time.perf_counter() - began
            _expect(response, 201)
    return spent


def quantiles_over_http(service: Service, run_id: int, layer_id: int, n_quantiles: int, method: str) -> dict:
    """A quantile set; a sketch one covers every row (it waits, if need be, for the sketcher to catch up)."""
    body: dict = {"n_quantiles": n_quantiles, "method": method}
    if method == "sketch":
        body["wait_for"] = SKETCH_WAIT_S
    response = service.client.post(f"/v1/runs/{run_id}/layers/{layer_id}/quantiles", json=body)
    _expect(response, 201)
    answer = response.json()
    answer["boundaries"] = np.asarray(answer["boundaries"], dtype=np.float32)
    return answer


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:500]}"
        )


# ---------------------------------------------------------------- measuring


def timed(repeats: int, action: Callable[[], T]) -> tuple[list[float], T]:
    """The wall time of each of `repeats` runs, and the last run's result."""
    seconds = []
    result = None
    for _ in range(repeats):
        began = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - began)
    return seconds, result


def best_of(repeats: int, action: Callable[[], T]) -> tuple[float, T]:
    """The shortest wall time of `repeats` runs, and the last run's result."""
    seconds, result = timed(repeats, action)
    return min(seconds), result


def numpy_boundaries(matrix: np.ndarray, n_quantiles: int) -> np.ndarray:
    """The anchor: numpy's inverted-CDF quantiles of every column (units x (Q-1))."""
    levels = np.arange(1, n_quantiles) / n_quantiles
    return np.ascontiguousarray(np.quantile(matrix, levels, axis=0, method="inverted_cdf").T, dtype=np.float32)


def largest_rank_error(sorted_units: np.ndarray, boundaries: np.ndarray, n_quantiles: int) -> float:
    """Largest distance between level i/Q and boundary i's true rank interval [count(<b), count(<=b)] / N.

    `sorted_units` is units x N, each row sorted; 0 means every boundary is an exact quantile.
    """
    n_values = sorted_units.shape[1]
    levels = np.arange(1, n_quantiles) / n_quantiles
    worst = 0.0
    for column, bounds in zip(sorted_units, boundaries):
        below = np.searchsorted(column, bounds, side="left") / n_values
        at_or_below = np.searchsorted(column, bounds, side="right") / n_values
        distance = np.maximum(np.maximum(below - levels, levels - at_or_below), 0.0)
        worst = max(worst, float(distance.max()))
    return worst


@dataclass
class ExactParts:
    """Where the service's exact path spends its time, measured in-process on the same rows."""

    raw_copy_s: float  # binary COPY out, bytes drained and dropped (the server's share)
    copy_to_block_s: float  # the same COPY parsed into the float32 block (app.copy_binary.iter_vectors)
    numpy_s: dict[int, float] = field(default_factory=dict)  # exact_boundaries_of(block, Q), per Q


def exact_parts(database_url: str, layer_id: int, quantile_counts: list[int], repeats: int) -> ExactParts:
    with connect(database_url, Settings(statement_timeout_ms=0)) as conn:
        layer = runs.find_layer(conn, layer_id)
        partition = runs.layer_partition(layer.run_id, layer.id)
        n_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(partition)).fetchone()[0]
        select = sql.SQL("SELECT a.values FROM {} a").format(partition)

        def drain() -> int:
            drained = 0
            with conn.cursor().copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(select)) as copy:
                for data in copy:
                    drained += len(data)
            return drained

        def read_block() -> np.ndarray:
            block = np.empty((n_rows, layer.dim), dtype=np.float32)
            filled = 0
            for chunk in iter_vectors(conn, select, [], layer.dim):
                block[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
            return block

        raw_copy_s, _ = best_of(repeats, drain)
        copy_to_block_s, block = best_of(repeats, read_block)
        parts = ExactParts(raw_copy_s, copy_to_block_s)
        for n_quantiles in quantile_counts:
            parts.numpy_s[n_quantiles], _ = best_of(repeats, lambda: exact_boundaries_of(block, n_quantiles))
    return parts


# ---------------------------------------------------------------- the benchmark


@dataclass
class Figures:
    rows: int
    dim: int
    sketch_rows: int
    sketch_dim: int
    repeats: int
    sketch_repeats: int
    exact: list[dict] = field(default_factory=list)  # per Q: service_s, numpy_s, ratio, identical
    exact_parts: dict[str, ExactParts] = field(default_factory=dict)  # per layer shape
    sketch: dict = field(default_factory=dict)
    ingest: list[dict] = field(default_factory=list)  # per layer: rows, dim, sketch, seconds, rows_per_s
    postgres: str = ""
    total_s: float = 0.0


def run_benchmark(args: argparse.Namespace) -> Figures:
    began = time.perf_counter()
    figures = Figures(args.rows, args.dim, args.sketch_rows, args.sketch_dim, args.repeats, args.sketch_repeats)
    service = None
    with fresh_database("quantiles") as database:
        figures.postgres, database_url = database.postgres, database.url
        try:
            settings = Settings(database_url=database_url, data_dir=database.workdir, no_auth=False)
            service = start_service(database_url, settings)
            response = service.client.post("/v1/runs", json={"name": "bench-quantiles", "config": {}})
            _expect(response, 201)
            run_id = response.json()["id"]

            print(f"1. exact: {args.rows:,} x {args.dim} float32, layer sketch=false", flush=True)
            matrix = activations(args.rows, args.dim, seed=1)
            exact_layer = create_layer(service, run_id, "exact", args.dim, sketch=False)
            twin = create_layer(service, run_id, "exact-sketched-twin", args.dim, sketch=True)
            spent = ingest_over_http(
                service, run_id, {exact_layer: args.rows, twin: args.rows}, matrix, args.batch_rows
            )
            figures.ingest.append(_ingest_row(args.rows, args.dim, False, spent[exact_layer]))
            figures.ingest.append(_ingest_row(args.rows, args.dim, True, spent[twin]))
            print(
                f"   ingest: sketch=false {spent[exact_layer]:.2f} s, sketch=true twin {spent[twin]:.2f} s", flush=True
            )
            for n_quantiles in (10, 100):
                service_times, answer = timed(
                    args.repeats, lambda: quantiles_over_http(service, run_id, exact_layer, n_quantiles, "exact")
                )
                service_s = min(service_times)
                numpy_s, expected = best_of(args.repeats, lambda: numpy_boundaries(matrix, n_quantiles))
                identical = bool(np.array_equal(answer["boundaries"], expected)) and answer["rows"] == args.rows
                figures.exact.append(
                    {
                        "q": n_quantiles,
                        "service_s": service_s,
                        "first_s": service_times[0],
                        "numpy_s": numpy_s,
                        "ratio": service_s / numpy_s,
                        "identical": identical,
                    }
                )
                print(
                    f"   Q={n_quantiles}: service {service_s:.3f} s, numpy {numpy_s:.3f} s, "
                    f"ratio {service_s / numpy_s:.2f}x, identical {identical}",
                    flush=True,
                )
            figures.exact_parts[f"{args.rows:,} x {args.dim}"] = exact_parts(
                database_url, exact_layer, [10, 100], args.repeats
            )
            matrix = None  # free the rows before the next part

            shape = (
                f"{args.sketch_rows:,} rows x {args.sketch_dim} units ({args.sketch_rows * args.sketch_dim:,} values)"
            )
            print(f"2. sketch: {shape}, layer sketch=true (k={settings.sketch_k})", flush=True)
            matrix = activations(args.sketch_rows, args.sketch_dim, seed=2)
            sketch_layer = create_layer(service, run_id, "sketched", args.sketch_dim, sketch=True)
            layer_rows = {sketch_layer: args.sketch_rows}
            twin_rows = min(args.twin_rows if args.twin_rows is not None else args.sketch_rows, args.sketch_rows)
            if twin_rows:
                twin = create_layer(service, run_id, "sketched-unsketched-twin", args.sketch_dim, sketch=False)
                layer_rows[twin] = twin_rows
            spent = ingest_over_http(service, run_id, layer_rows, matrix, args.sketch_batch_rows)
            figures.ingest.append(_ingest_row(args.sketch_rows, args.sketch_dim, True, spent[sketch_layer]))
            print(f"   ingest: sketch=true {spent[sketch_layer]:.1f} s", end="", flush=True)
            if twin_rows:
                figures.ingest.append(_ingest_row(twin_rows, args.sketch_dim, False, spent[twin]))
                print(f", sketch=false twin ({twin_rows:,} rows) {spent[twin]:.1f} s", end="")
            print(flush=True)
            q = 100
            # exact first: its first scan after the bulk load also sets the rows' hint bits (reported apart)
            exact_times, exact = timed(
                args.sketch_repeats, lambda: quantiles_over_http(service, run_id, sketch_layer, q, "exact")
            )
            sketch_s, sketched = best_of(
                args.repeats, lambda: quantiles_over_http(service, run_id, sketch_layer, q, "sketch")
            )
            exact_s = min(exact_times)
            print(
                f"   Q={q}: sketch {sketch_s:.3f} s, exact {exact_s:.3f} s (first {exact_times[0]:.3f} s)", flush=True
            )
            figures.exact_parts[f"{args.sketch_rows:,} x {args.sketch_dim}"] = exact_parts(
                database_url, sketch_layer, [q], args.sketch_repeats
            )
            sorted_units = np.ascontiguousarray(matrix.T)
            matrix = None  # free the rows before the next part
            sorted_units.sort(axis=1)
            levels = np.arange(1, q) / q
            expected = np.ascontiguousarray(
                np.quantile(sorted_units, levels, axis=1, method="inverted_cdf").T, dtype=np.float32
            )
            figures.sketch = {
                "q": q,
                "k": settings.sketch_k,
                "sketch_s": sketch_s,
                "exact_s": exact_s,
                "exact_first_s": exact_times[0],
                "speedup": exact_s / sketch_s,
                "rank_error": largest_rank_error(sorted_units, sketched["boundaries"], q),
                "stated_bound": sketched["rank_error"],
                "rows_sketch": sketched["rows"],
                "exact_rank_error": largest_rank_error(sorted_units, exact["boundaries"], q),
                "exact_identical": bool(np.array_equal(exact["boundaries"], expected))
                and exact["rows"] == args.sketch_rows,
            }
        finally:
            if service is not None:
                service.stop()
    figures.total_s = time.perf_counter() - began
    return figures


def _ingest_row(n_rows: int, dim: int, sketch: bool, seconds: float) -> dict:
    return {"rows": n_rows, "dim": dim, "sketch": sketch, "seconds": seconds, "rows_per_s": n_rows / seconds}


# ---------------------------------------------------------------- reporting


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(figures: Figures, machine: dict[str, str]) -> str:
    """The figures as the markdown section of RESULTS.md (also printed)."""
    s = figures.sketch
    lines = [
        f"- Date: {machine['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} memory; {machine['software']}",
        f"- Command: `{machine['command']}` (wall {figures.total_s:.0f} s, including setup and checks)",
        f"- Database: a fresh embedded {figures.postgres} in a temporary directory; the service over HTTP on loopback "
        f"(uvicorn in-process, default Settings: statement_timeout {Settings().statement_timeout_ms} ms).",
        f"- Sketch workload read as {figures.sketch_rows:,} rows x {figures.sketch_dim} units "
        f"({figures.sketch_rows * figures.sketch_dim:,} values).",
        f"- Timings are the best of {figures.repeats} (exact at scale: best of {figures.sketch_repeats}); "
        f"1-minute {load_words(float(machine['load_before']), float(_load_average()))}.",
        "",
        f"Exact quantiles, {figures.rows:,} x {figures.dim} float32 (anchor: numpy `np.quantile(..., axis=0, "
        f'method="inverted_cdf")` on the matrix in memory):',
        "",
        "| Q | service (HTTP) | first call | numpy | ratio | target | met | boundaries identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in figures.exact:
        lines.append(
            f"| {row['q']} | {row['service_s']:.3f} s | {row['first_s']:.3f} s | {row['numpy_s']:.3f} s | {row['ratio']:.2f}x "
            f"| <= {EXACT_TARGET_RATIO:g}x | {_met(row['ratio'] <= EXACT_TARGET_RATIO)} | {_met(row['identical'])} |"
        )
    lines += [
        "",
        f"Sketch against exact, both through the service, {figures.sketch_rows:,} x {figures.sketch_dim}, "
        f"Q={s['q']}, KLL k={s['k']}:",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
        f"| sketch quantiles | {s['sketch_s']:.3f} s | | |",
        f"| exact quantiles (the anchor) | {s['exact_s']:.3f} s | | |",
        f"| exact quantiles, first call after the bulk load (sets hint bits) | {s['exact_first_s']:.3f} s | | |",
        f"| speed-up | {s['speedup']:.1f}x | >= {SKETCH_TARGET_SPEEDUP:g}x | {_met(s['speedup'] >= SKETCH_TARGET_SPEEDUP)} |",
        f"| largest rank error, measured | {s['rank_error']:.4%} | <= {RANK_ERROR_TARGET:.0%} "
        f"| {_met(s['rank_error'] <= RANK_ERROR_TARGET)} |",
        f"| rank error bound, stated | {s['stated_bound']:.4%} | <= {RANK_ERROR_TARGET:.0%} "
        f"| {_met(s['stated_bound'] <= RANK_ERROR_TARGET)} |",
        f"| measured within stated bound | {s['rank_error']:.4%} vs {s['stated_bound']:.4%} | | "
        f"{_met(s['rank_error'] <= s['stated_bound'])} |",
        f"| exact: boundaries identical to numpy, rank error | {_met(s['exact_identical'])}, {s['exact_rank_error']:.4%} "
        f"| identical, 0 | {_met(s['exact_identical'] and s['exact_rank_error'] == 0)} |",
        "",
        "Where the exact path spends its time (in-process, same rows; the service adds the count, HTTP and JSON):",
        "",
        "| rows x units | raw binary COPY out (anchor) | COPY parsed to float32 block | numpy boundaries | service (HTTP) |",
        "|---|---|---|---|---|",
    ]
    services = {f"{figures.rows:,} x {figures.dim}": {r["q"]: r["service_s"] for r in figures.exact}}
    services[f"{figures.sketch_rows:,} x {figures.sketch_dim}"] = {s["q"]: s["exact_s"]}
    for shape, parts in figures.exact_parts.items():
        numpy_cells = ", ".join(f"Q={q}: {t:.3f} s" for q, t in parts.numpy_s.items())
        service_cells = ", ".join(f"Q={q}: {t:.3f} s" for q, t in services[shape].items())
        lines.append(
            f"| {shape} | {parts.raw_copy_s:.3f} s | {parts.copy_to_block_s:.3f} s | {numpy_cells} | {service_cells} |"
        )
    lines += [
        "",
        "Ingest over HTTP (Arrow IPC batches; seconds the service took to acknowledge them, client encoding not counted):",
        "",
        "| layer | rows | units | sketch | seconds | rows/s | values/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in figures.ingest:
        name = f"{row['rows']:,} x {row['dim']}"
        lines.append(
            f"| {name} | {row['rows']:,} | {row['dim']} | {str(row['sketch']).lower()} | {row['seconds']:.2f} "
            f"| {row['rows_per_s']:,.0f} | {row['rows_per_s'] * row['dim']:,.0f} |"
        )
    for dim in sorted({row["dim"] for row in figures.ingest}):
        pair = {row["sketch"]: row for row in figures.ingest if row["dim"] == dim}
        if True in pair and False in pair:
            cost = pair[False]["rows_per_s"] / pair[True]["rows_per_s"]
            lines.append(
                f"\nKeeping sketches at {dim} units: ingest takes {cost:.2f}x the time of an unsketched layer."
            )
    return "\n".join(lines) + "\n"


def _load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def checks_pass(figures: Figures) -> bool:
    """The correctness checks (not the speed targets): exact is exact, sketches meet their stated bound."""
    s = figures.sketch
    return (
        all(row["identical"] for row in figures.exact)
        and s["exact_identical"]
        and s["exact_rank_error"] == 0
        and s["rank_error"] <= s["stated_bound"]
    )


def machine_description(command: str) -> dict[str, str]:
    facts = machine_facts(
        command,
        software=f"Python {platform.python_version()}, numpy {np.__version__}, datasketches {metadata.version('datasketches')}",
    )
    facts["load_before"] = _load_average()
    return facts


# Options of a smoke run: thousands of rows, one repeat.
TINY = shlex.split(
    "--rows 2000 --dim 8 --sketch-rows 20000 --sketch-dim 4 --repeats 1 --batch-rows 1000 --sketch-batch-rows 10000"
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60_000, help="rows of the exact workload")
    parser.add_argument("--dim", type=int, default=128, help="units of the exact workload")
    parser.add_argument("--sketch-rows", type=int, default=6_000_000, help="rows of the sketch workload")
    parser.add_argument("--sketch-dim", type=int, default=16, help="units of the sketch workload")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument(
        "--sketch-repeats", type=int, default=None, help="repeats of exact at scale (default: --repeats)"
    )
    parser.add_argument("--batch-rows", type=int, default=10_000, help="rows per ingest batch, exact workload")
    parser.add_argument("--sketch-batch-rows", type=int, default=100_000, help="rows per ingest batch, sketch workload")
    parser.add_argument(
        "--twin-rows",
        type=int,
        default=None,
        help="rows of the sketch workload also stored without sketches, for the ingest cost (default: all; 0: none)",
    )
    return parser


def run(args: argparse.Namespace, command: str) -> Outcome:
    if args.sketch_repeats is None:
        args.sketch_repeats = args.repeats
    machine = machine_description(command)
    figures = run_benchmark(args)
    return Outcome(report(figures, machine), plain(figures), machine, passed=checks_pass(figures))


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["quantiles", *sys.argv[1:]]))
