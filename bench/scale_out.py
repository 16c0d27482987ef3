"""Scale-out on Citus: one PostgreSQL server against a coordinator and 2 workers, side by side on this machine.

Both sides are servers of one build (PostgreSQL with pgvector and Citus, built from the
vendored tarball by tests/citus_kit.py) with the same settings; the single server's
database has no Citus, the cluster's is laid out by `eidetic migrate --distribute`. The
service runs in a thread of this script over each. In rounds that alternate the sides:

1. ingest: --runs runs of one layer each, --batches Arrow batches of --rows rows of --dim
   values per run, posted over REST by 2 client threads; rows/s, and CPU seconds per row
   of every server process (read from /proc: live backends plus the postmaster's reaped ones);
2. search: a bank of --bank-items keys (cosine, HNSW), --queries single-query requests
   of k=10 from 2 client threads; queries/s and CPU per query of every node.

Then, once: where the work of one run or one bank goes (each worker's share of the CPU and
of the rows inserted; Citus's task count for each statement), and the cost of a query
across all runs that cannot push down (percentile_disc of a unit over every run) against
the same query filtered to one run. All nodes share this machine's CPUs, so the cluster
shows its overhead here, never a gain: the projection for 4, 8 and 16 workers is a model
built on the measured CPU per row and per query, with its assumptions written beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import psycopg

from app import distribute, migrate
from app.settings import Settings
from bench.common import Service, load_words, machine_facts, start_service
from bench.record import Outcome, plain
from eidetic.wire.formats import ARROW_STREAM, rows_to_arrow
from eidetic.wire.rows import ActivationRows
from tests import citus_kit
from tests.fault_kit import _children

TINY = [
    "--runs", "2", "--batches", "2", "--rows", "200", "--dim", "16",
    "--bank-items", "300", "--bank-dim", "16", "--queries", "20", "--repeats", "1", "--shard-count", "4",
]  # fmt: skip
CLIENTS = 2  # client threads: one per core of this machine
PROJECTED_WORKERS = (2, 4, 8, 16)
QUANTILES = [0.01, 0.1, 0.5, 0.9, 0.99]
TICKS = os.sysconf("SC_CLK_TCK")
API = "api"  # this process: the service's threads and the clients'


def servers_us(per_unit: dict[str, float]) -> float:
    """The database servers' CPU per unit of work, every node together (this process left out)."""
    return sum(us for name, us in per_unit.items() if name != API)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="runs ingested at once (each one layer)")
    parser.add_argument("--batches", type=int, default=4, help="batches per run and round")
    parser.add_argument("--rows", type=int, default=2000, help="rows per batch")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bank-items", type=int, default=5000)
    parser.add_argument("--bank-dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=400, help="search requests per round (one query each)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per side, alternating")
    parser.add_argument("--shard-count", type=int, default=32, help="citus.shard_count (Citus's default: 32)")
    parser.add_argument("--cores-per-node", type=int, default=0, help="cores of a node in the model (0: nproc)")
    return parser


# ---------------------------------------------------------------- CPU of server processes


def _cpu_of(pid: int, reaped: bool) -> float:
    """CPU seconds of a process (and, with `reaped`, of its children it has waited for)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if reaped else 0)
    return ticks / TICKS


def server_cpu(pgdata: Path) -> float:
    """CPU seconds a server has used: the postmaster, its live children and those it reaped."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    return _cpu_of(postmaster, reaped=True) + sum(_cpu_of(pid, reaped=False) for pid in _children(postmaster))


@dataclass
class Side:
    """One side of the comparison: its servers (coordinator first) and the service over its database."""

    name: str
    url: str
    nodes: dict[str, Path]  # node name -> data directory
    service: Service
    runs: list[tuple[int, int]] = field(default_factory=list)  # (run id, layer id), every round's
    bank_id: int = 0

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each server, and of this process (the service and its clients) as "api"."""
        return {**{name: server_cpu(pgdata) for name, pgdata in self.nodes.items()}, API: time.process_time()}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def in_threads(jobs: list[Callable[[], None]]) -> None:
    failures: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as error:  # reported in the caller's thread
            failures.append(error)

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def client_of(side: Side) -> httpx.Client:
    return httpx.Client(base_url=side.service.base_url, headers=side.service.client.headers, timeout=600)


# ---------------------------------------------------------------- the workloads


def batch_rows(args: argparse.Namespace, round_no: int, run_no: int, batch_no: int) -> bytes:
    """The same rows on both sides: seeded by round, run and batch."""
    seed = (round_no * 1000 + run_no) * 1000 + batch_no
    values = np.random.default_rng(seed).standard_normal((args.rows, args.dim), dtype=np.float32)
    rows = ActivationRows.build(values, step=np.full(args.rows, batch_no), sample_id=np.arange(args.rows))
    return rows_to_arrow(rows, f"r{round_no}b{batch_no}")


@dataclass
class Timing:
    seconds: float
    cpu: dict[str, float]  # CPU seconds per node over the timed work


def ingest_round(side: Side, args: argparse.Namespace, round_no: int) -> Timing:
    """--runs new runs, each filled with --batches batches, by CLIENTS threads; returns the timing."""
    client = side.service.client
    runs = []
    for run_no in range(args.runs):
        run = client.post("/v1/runs", json={"name": f"round{round_no}-run{run_no}"}).json()
        layer = client.post(f"/v1/runs/{run['id']}/layers", json={"name": "fc", "dim": args.dim}).json()
        runs.append((run["id"], layer["id"]))
    bodies = {(r, b): batch_rows(args, round_no, r, b) for r in range(args.runs) for b in range(args.batches)}

    def sender(share: list[int]) -> Callable[[], None]:
        def send() -> None:
            with client_of(side) as mine:
                for b in range(args.batches):
                    for r in share:
                        run_id, layer_id = runs[r]
                        response = mine.post(
                            f"/v1/runs/{run_id}/layers/{layer_id}/activations",
                            content=bodies[r, b],
                            headers={"content-type": ARROW_STREAM},
                        )
                        assert response.status_code == 201, response.text

        return send

    before, started = side.cpu(), time.perf_counter()
    in_threads([sender(list(range(args.runs))[i::CLIENTS]) for i in range(CLIENTS)])
    seconds = time.perf_counter() - started
    side.runs.extend(runs)
    return Timing(seconds, cpu_delta(before, side.cpu()))


def bank_keys(args: argparse.Namespace) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((args.bank_items, args.bank_dim), dtype=np.float32)


def make_bank(side: Side, args: argparse.Namespace) -> None:
    client = side.service.client
    body = {"name": "scale-out", "dim": args.bank_dim, "metric": "cosine", "capacity": args.bank_items}
    side.bank_id = client.post("/v1/memory-banks", json={**body, "policy": "none"}).json()["id"]
    keys = bank_keys(args)
    for start in range(0, len(keys), 2000):
        items = [{"key": key.tolist(), "label": i % 10} for i, key in enumerate(keys[start : start + 2000], start)]
        response = client.post(f"/v1/memory-banks/{side.bank_id}/items", json={"items": items})
        assert response.status_code == 200, response.text


def search_round(side: Side, args: argparse.Namespace, round_no: int) -> tuple[Timing, list[list[int]]]:
    """--queries requests of one query each (k=10), by CLIENTS threads; the timing and every answer's ids."""
    queries = np.random.default_rng(100 + round_no).standard_normal((args.queries, args.bank_dim), dtype=np.float32)
    found: dict[int, list[int]] = {}

    def searcher(share: range) -> Callable[[], None]:
        def search() -> None:
            with client_of(side) as mine:
                for q in share:
                    response = mine.post(
                        f"/v1/memory-banks/{side.bank_id}/search", json={"queries": [queries[q].tolist()], "k": 10}
                    )
                    assert response.status_code == 200, response.text
                    found[q] = response.json()["results"][0]["ids"]

        return search

    before, started = side.cpu(), time.perf_counter()
    in_threads([searcher(range(i, args.queries, CLIENTS)) for i in range(CLIENTS)])
    seconds = time.perf_counter() - started
    return Timing(seconds, cpu_delta(before, side.cpu())), [found[q] for q in range(args.queries)]


def quantile_sql(filtered: bool) -> str:
    where = "WHERE a.run_id = %s" if filtered else ""
    return (
        "SELECT count(*), percentile_disc(%s::float8[]) WITHIN GROUP (ORDER BY (a.values::real[])[1]) "
        f"FROM activations a {where}"
    )


def timed_quantiles(side: Side, filtered: bool, repeats: int) -> tuple[float, int, list[float]]:
    """Median seconds of the unit-0 quantiles over every run (or the first run only), its rows and its answer."""
    params: tuple = (QUANTILES, side.runs[0][0]) if filtered else (QUANTILES,)
    seconds = []
    with psycopg.connect(side.url) as conn:
        for _ in range(repeats + 1):  # the first warms the caches
            started = time.perf_counter()
            rows, values = conn.execute(quantile_sql(filtered), params).fetchone()
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:]), rows, [float(v) for v in values]


# ---------------------------------------------------------------- where one run's work goes (the cluster)


def tasks_of(url: str, statement: str, params: tuple) -> int:
    """Citus's task count for a statement: 1 is routed to one shard, more fan out to every shard."""
    with psycopg.connect(url) as conn:
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN (COSTS OFF) " + statement, params))
    counts = [int(line.split(":")[1]) for line in plan.splitlines() if "Task Count:" in line]
    return max(counts)


def tuples_inserted(node_url: str) -> int:
    with psycopg.connect(node_url, autocommit=True) as conn:
        return conn.execute("SELECT tup_inserted FROM pg_stat_database WHERE datname = current_database()").fetchone()[
            0
        ]


@dataclass
class Routing:
    ingest_cpu_share: float  # the run's worker's share of the workers' CPU while one run is ingested
    ingest_rows_share: float  # its share of the tuples the workers inserted meanwhile
    search_cpu_share: float  # the bank's worker's share of the workers' CPU while one bank is searched
    tasks: dict[str, int]  # statement -> Citus tasks


def routing(side: Side, cluster: citus_kit.CitusCluster, args: argparse.Namespace) -> Routing:
    worker_urls = {f"worker{i}": node.url("eidetic_scale_out") for i, node in enumerate(cluster.workers)}
    run_id, layer_id = side.runs[0]
    # one run's ingest: a round of batches into the first run's layer, by one client
    time.sleep(1.1)  # backends report their counters at most once a second
    rows_before = {name: tuples_inserted(url) for name, url in worker_urls.items()}
    cpu_before = side.cpu()
    with client_of(side) as client:
        for b in range(args.batches):
            body = rows_to_arrow(ActivationRows.build(np.ones((args.rows, args.dim), np.float32)), f"routing{b}")
            path = f"/v1/runs/{run_id}/layers/{layer_id}/activations"
            assert client.post(path, content=body, headers={"content-type": ARROW_STREAM}).status_code == 201
    cpu = cpu_delta(cpu_before, side.cpu())
    # an idle backend reports its counters within PGSTAT_IDLE_INTERVAL (10 s), not at once: wait for the rows
    deadline = time.monotonic() + 15
    while True:
        rows = {name: tuples_inserted(url) - rows_before[name] for name, url in worker_urls.items()}
        if sum(rows.values()) >= args.batches * args.rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    workers_cpu = [cpu[name] for name in worker_urls]
    ingest_cpu_share = max(workers_cpu) / max(sum(workers_cpu), 1e-9)
    ingest_rows_share = max(rows.values()) / max(sum(rows.values()), 1)

    cpu_before = side.cpu()
    search_round(side, args, round_no=99)
    cpu = cpu_delta(cpu_before, side.cpu())
    workers_cpu = [cpu[name] for name in worker_urls]
    search_cpu_share = max(workers_cpu) / max(sum(workers_cpu), 1e-9)

    partition = f"activations_r{run_id}_l{layer_id}"
    statements = {
        "ingest ledger row (INSERT into ingest_batches)": (
            "INSERT INTO ingest_batches (run_id, layer_id, batch_id, row_count, digest) VALUES (%s, %s, 'x', 1, 'x')",
            (run_id, layer_id),
        ),
        "read a window of a run's rows": (
            f"SELECT a.row_no FROM {partition} a JOIN ingest_batches b ON b.run_id = a.run_id AND b.id = a.batch_seq "
            "WHERE a.run_id = %s ORDER BY a.batch_seq, a.row_no LIMIT 100",
            (run_id,),
        ),
        "exact quantiles of one run": (quantile_sql(True), (QUANTILES, run_id)),
        "bank search (kNN in one bank)": (
            f"SELECT id FROM memory_items_b{side.bank_id} WHERE bank_id = %s "
            f"ORDER BY key::vector({args.bank_dim}) <=> %s::vector({args.bank_dim}) LIMIT 10",
            (side.bank_id, str(bank_keys(args)[0].tolist())),
        ),
        "quantiles across every run": (quantile_sql(False), (QUANTILES,)),
    }
    tasks = {name: tasks_of(side.url, statement, params) for name, (statement, params) in statements.items()}
    return Routing(ingest_cpu_share, ingest_rows_share, search_cpu_share, tasks)


# ---------------------------------------------------------------- the sides


@contextmanager
def sides(args: argparse.Namespace) -> Iterator[tuple[Side, Side, citus_kit.CitusCluster]]:
    """The single server and the cluster, each migrated, with the service over it."""
    settings = Settings(database_url=None, max_body_bytes=64 * 1024 * 1024, max_rows_per_batch=1_000_000)
    name = "eidetic_scale_out"
    with citus_kit.plain_server() as single, citus_kit.cluster(workers=2, shard_count=args.shard_count) as cluster:
        with psycopg.connect(single.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        single_url = single.url(name)
        migrate.upgrade(single_url)
        cluster_url = cluster.create_database(name)
        migrate.upgrade(cluster_url)
        with psycopg.connect(cluster_url, autocommit=True) as conn:
            assert distribute.distribute(conn)
        services = [start_service(single_url, settings), start_service(cluster_url, settings)]
        try:
            nodes = {"coordinator": cluster.coordinator.pgdata}
            nodes |= {f"worker{i}": worker.pgdata for i, worker in enumerate(cluster.workers)}
            yield (
                Side("single server", single_url, {"server": single.pgdata}, services[0]),
                Side("Citus, coordinator + 2 workers", cluster_url, nodes, services[1]),
                cluster,
            )
        finally:
            for service in services:
                service.stop()


@dataclass
class SideFigures:
    name: str
    ingest_rows_per_s: float  # median over rounds
    ingest_cpu_us_per_row: dict[str, float]  # node -> CPU microseconds per row (median over rounds)
    search_qps: float
    search_cpu_us_per_query: dict[str, float]
    cross_run_s: float
    cross_run_rows: int
    one_run_s: float
    one_run_rows: int


@dataclass
class Projection:
    workers: int
    ingest_rows_per_s: float  # every request routed by the one coordinator
    ingest_bound: str
    search_qps: float
    search_bound: str
    ingest_any_node_rows_per_s: float  # API processes spread over the workers, each routing (no coordinator tier)
    search_any_node_qps: float


def median_cpu(timings: list[Timing], units: int) -> dict[str, float]:
    return {name: statistics.median(t.cpu[name] for t in timings) * 1e6 / units for name in timings[0].cpu}


def workers_us(per_unit: dict[str, float]) -> float:
    """The workers' CPU per unit of work, all workers together."""
    return sum(us for name, us in per_unit.items() if name.startswith("worker"))


def ceiling(cores: int, cpu_us_per_unit: float) -> float:
    """Units of work per second that `cores` cores can do at that CPU cost; unbounded (inf) where the cost
    measured was 0, below the CPU clock's resolution (a tiny run's few units): that tier is not the limit."""
    return cores * 1e6 / cpu_us_per_unit if cpu_us_per_unit > 0 else math.inf


def cpu_ratio(cluster_us: float, single_us: float) -> str:
    """cluster / single, or n/a where the single server's CPU was below the clock's resolution (a tiny run)."""
    return f"{cluster_us / single_us:.2f}" if single_us > 0 else "n/a"


def project(cluster: SideFigures, cores: int) -> list[Projection]:
    """Throughput with N workers on machines like this one: each tier's CPU ceiling, the lowest wins.

    Worker tier: N x cores / (workers' CPU per unit of work), the work spread evenly over the workers
    (many runs and banks, hashed to shards); coordinator: cores / its CPU per unit, independent of N.
    Any node routing (Citus syncs its metadata to the workers, so API processes may point at any of
    them): the routing CPU spreads over the N workers too, N x cores / (every node's CPU per unit).
    The API tier is left out: it is stateless, more processes on more machines.
    """
    projections = []
    for workers in PROJECTED_WORKERS:
        routed = []
        for per_unit in (cluster.ingest_cpu_us_per_row, cluster.search_cpu_us_per_query):
            worker_cap = ceiling(workers * cores, workers_us(per_unit))
            coordinator_cap = ceiling(cores, per_unit["coordinator"])
            routed.append((worker_cap, "workers") if worker_cap < coordinator_cap else (coordinator_cap, "coordinator"))
        (ingest, ingest_bound), (search, search_bound) = routed
        any_ingest = ceiling(workers * cores, servers_us(cluster.ingest_cpu_us_per_row))
        any_search = ceiling(workers * cores, servers_us(cluster.search_cpu_us_per_query))
        projections.append(Projection(workers, ingest, ingest_bound, search, search_bound, any_ingest, any_search))
    return projections


def measure(args: argparse.Namespace) -> tuple[list[SideFigures], Routing, bool]:
    with sides(args) as (single, cluster_side, cluster):
        both = [single, cluster_side]
        ingests: dict[str, list[Timing]] = {side.name: [] for side in both}
        searches: dict[str, list[Timing]] = {side.name: [] for side in both}
        answers: dict[str, list[list[list[int]]]] = {side.name: [] for side in both}
        for side in both:
            make_bank(side, args)
        for round_no in range(args.repeats):
            order = both if round_no % 2 == 0 else both[::-1]  # alternate who goes first
            for side in order:
                ingests[side.name].append(ingest_round(side, args, round_no))
            for side in order:
                timing, found = search_round(side, args, round_no)
                searches[side.name].append(timing)
                answers[side.name].append(found)
        figures = []
        quantile_answers = []
        for side in both:
            cross_s, cross_rows, cross_values = timed_quantiles(side, filtered=False, repeats=args.repeats)
            one_s, one_rows, one_values = timed_quantiles(side, filtered=True, repeats=args.repeats)
            quantile_answers.append((cross_rows, cross_values, one_rows, one_values))
            rows = args.runs * args.batches * args.rows
            figures.append(
                SideFigures(
                    side.name,
                    ingest_rows_per_s=statistics.median(rows / t.seconds for t in ingests[side.name]),
                    ingest_cpu_us_per_row=median_cpu(ingests[side.name], rows),
                    search_qps=statistics.median(args.queries / t.seconds for t in searches[side.name]),
                    search_cpu_us_per_query=median_cpu(searches[side.name], args.queries),
                    cross_run_s=cross_s,
                    cross_run_rows=cross_rows,
                    one_run_s=one_s,
                    one_run_rows=one_rows,
                )
            )
        routed = routing(cluster_side, cluster, args)
        expected_rows = args.repeats * args.runs * args.batches * args.rows
        # the same data on both sides: the same quantiles, the same rows, the same neighbours (HNSW is
        # deterministic for the same inserts in the same order, but the two indexes are built apart)
        same_answers = quantile_answers[0] == quantile_answers[1] and quantile_answers[0][0] == expected_rows
        recall = np.mean(
            [
                len(set(a) & set(b)) / 10
                for mine, theirs in zip(answers[single.name], answers[cluster_side.name])
                for a, b in zip(mine, theirs)
            ]
        )
        passed = bool(same_answers and recall >= 0.9)
        return figures, routed, passed


# ---------------------------------------------------------------- the report


def report(
    figures: list[SideFigures], routed: Routing, projections: list[Projection], args, machine, load, cores
) -> str:
    single, cluster = figures
    rows = args.runs * args.batches * args.rows

    def cpu_cells(per_unit: dict[str, float]) -> str:
        return ", ".join(f"{name} {us:,.1f}" if us < 100 else f"{name} {us:,.0f}" for name, us in per_unit.items())

    lines = [
        f"- Date: {machine['date']}; {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']}; "
        f"{load_words(*load)}.",
        f"- Command: `{machine['command']}`",
        f"- Each side: {args.runs} runs x {args.batches} batches x {args.rows} rows x {args.dim} values per round "
        f"({rows:,} rows), a bank of {args.bank_items:,} keys of {args.bank_dim} (cosine, HNSW) searched by "
        f"{args.queries} single-query requests (k=10); {CLIENTS} client threads; {args.repeats} rounds per side, "
        f"the sides alternating, medians shown. Both sides are servers of one build and settings "
        f"(fsync off, as in the tests); Citus with citus.shard_count {args.shard_count}.",
        "- **All three Citus nodes, the single server, the service and the clients share this machine's CPUs: "
        "the cluster can only show its overhead here, not a gain.**",
        "",
        "| | single server | Citus (3 nodes) | Citus / single |",
        "|---|---:|---:|---:|",
        f"| ingest, rows/s | {single.ingest_rows_per_s:,.0f} | {cluster.ingest_rows_per_s:,.0f} "
        f"| {cluster.ingest_rows_per_s / single.ingest_rows_per_s:.2f} |",
        f"| bank search, queries/s | {single.search_qps:,.0f} | {cluster.search_qps:,.0f} "
        f"| {cluster.search_qps / single.search_qps:.2f} |",
        f"| ingest, server CPU us/row | {servers_us(single.ingest_cpu_us_per_row):.1f} "
        f"| {servers_us(cluster.ingest_cpu_us_per_row):.1f} "
        f"| {cpu_ratio(servers_us(cluster.ingest_cpu_us_per_row), servers_us(single.ingest_cpu_us_per_row))} |",
        f"| search, server CPU us/query | {servers_us(single.search_cpu_us_per_query):,.0f} "
        f"| {servers_us(cluster.search_cpu_us_per_query):,.0f} "
        f"| {cpu_ratio(servers_us(cluster.search_cpu_us_per_query), servers_us(single.search_cpu_us_per_query))} |",
        "",
        f"CPU by process (us per row / per query; api is this script: the service and its clients, the same "
        f"code on both sides): Citus ingest: {cpu_cells(cluster.ingest_cpu_us_per_row)}; Citus search: "
        f"{cpu_cells(cluster.search_cpu_us_per_query)}; single ingest: {cpu_cells(single.ingest_cpu_us_per_row)}; "
        f"single search: {cpu_cells(single.search_cpu_us_per_query)}.",
        "",
        "**Where one run's or one bank's work goes** (measured on the cluster):",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| one run ingested: its worker's share of the workers' CPU | {routed.ingest_cpu_share:.0%} |",
        f"| one run ingested: its worker's share of the tuples the workers inserted | {routed.ingest_rows_share:.0%} |",
        f"| one bank searched: its worker's share of the workers' CPU | {routed.search_cpu_share:.0%} |",
        *(f"| Citus tasks: {name} | {tasks} |" for name, tasks in routed.tasks.items()),
        "",
        "**A query across every run** (percentile_disc of one unit over all runs: no run filter, so no push-down; "
        "Citus ships every row to the coordinator) against the same query filtered to one run:",
        "",
        "| | rows | single server, ms | Citus, ms | Citus / single | Citus, us/row |",
        "|---|---:|---:|---:|---:|---:|",
        f"| one run | {cluster.one_run_rows:,} | {single.one_run_s * 1e3:,.1f} | {cluster.one_run_s * 1e3:,.1f} "
        f"| {cluster.one_run_s / single.one_run_s:.2f} | {cluster.one_run_s * 1e6 / cluster.one_run_rows:.2f} |",
        f"| every run | {cluster.cross_run_rows:,} | {single.cross_run_s * 1e3:,.1f} | {cluster.cross_run_s * 1e3:,.1f} "
        f"| {cluster.cross_run_s / single.cross_run_s:.2f} | {cluster.cross_run_s * 1e6 / cluster.cross_run_rows:.2f} |",
        "",
        "A run-filtered query runs on the run's worker and grows with the run; the query across every run runs on "
        "the coordinator over rows shipped from every shard, so it grows with the whole store and more workers do "
        "not speed it up (the same holds for a single server, which scans every run too).",
        "",
        f"**Projection** for N workers, each a machine like this one ({cores} cores), from the CPU per row and per "
        "query measured above. Assumptions: the work spreads evenly over the workers (many runs and banks hashed "
        "to shards; one run's ingest or one bank's search stays on one worker, as measured); the coordinator "
        "(its own machine) routes every request and does not scale with N; the API tier is stateless and scaled "
        "apart; no cross-run queries; the network costs nothing more than loopback did; CPU per unit of work "
        "stays as measured under this machine's contention. A tier's ceiling is cores / its CPU per unit; "
        "the lower one wins.",
        "",
        "| workers | ingest rows/s, one coordinator | bound by | search queries/s, one coordinator | bound by "
        "| ingest rows/s, any node routes | search queries/s, any node routes |",
        "|---:|---:|---|---:|---|---:|---:|",
        *(
            f"| {p.workers} | {p.ingest_rows_per_s:,.0f} | {p.ingest_bound} | {p.search_qps:,.0f} | {p.search_bound} "
            f"| {p.ingest_any_node_rows_per_s:,.0f} | {p.search_any_node_qps:,.0f} |"
            for p in projections
        ),
        "",
        "With one coordinator, every request's routing runs there: once it is the busier tier, more workers add "
        "nothing. 'Any node routes' is the other layout Citus offers (its metadata is synced to the workers, so "
        "API processes may point at any worker): the routing CPU then spreads over the workers with the rest. "
        "The service itself (the api column above, more CPU than the servers' here) scales apart, by processes.",
        "",
        f"Per worker (a {cores}-core worker's share of the work, from its CPU per unit): "
        f"{ceiling(cores, workers_us(cluster.ingest_cpu_us_per_row)):,.0f} rows/s and "
        f"{ceiling(cores, workers_us(cluster.search_cpu_us_per_query)):,.0f} queries/s; a single server of this kind: "
        f"{ceiling(cores, servers_us(single.ingest_cpu_us_per_row)):,.0f} rows/s and "
        f"{ceiling(cores, servers_us(single.search_cpu_us_per_query)):,.0f} queries/s by the same arithmetic.",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace, command: str) -> Outcome:
    machine = machine_facts(command, f"Python {platform.python_version()}, numpy {np.__version__}, Citus 14.0.1")
    cores = args.cores_per_node or int(machine["nproc"])
    load_before = os.getloadavg()[0]
    figures, routed, passed = measure(args)
    load = (load_before, os.getloadavg()[0])
    projections = project(figures[1], cores)
    section = report(figures, routed, projections, args, machine, load, cores)
    data = {"sides": plain(figures), "routing": plain(routed), "projection": plain(projections), "load": list(load)}
    notes = [] if passed else ["the two sides answered differently (quantiles, row counts or neighbours)"]
    return Outcome(section, data, machine, passed=passed, notes=notes)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["scale_out", *sys.argv[1:]]))
