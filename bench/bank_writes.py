"""Bank writes: a segmented bank (growing segment + sealed HNSW segments built in bulk) against a bank
whose writes go into one live HNSW index, side by side in one run.

One run on a fresh embedded PostgreSQL, the service over HTTP on loopback (uvicorn in this
process, its background merger looking every 0.2 s), 128-dimensional keys (Fashion-MNIST
projected, as bench/knn.py; Gaussian with --data gaussian), metric cosine, HNSW m and
ef_construction the same for both banks:

1. today's path (`merge_threshold` 0): all but the last --live-keys keys loaded in bulk
   (COPY, then CREATE INDEX: bench/knn.py's bulk_load), then the last keys written through
   POST items into the live index in batches of --batch: the write rate a running bank sees.
   Then its search: batches of --query-batch queries, k=10, at --ef-search, queries/s (best of
   --passes passes) and recall@10 against numpy brute force.
2. the segmented bank (the bank settings' defaults unless --merge-threshold/--merge-factor): all
   --keys keys written through POST items in batches of --batch, one request after the other
   (the bodies encoded beforehand), paced at --write-rate keys/s (the target's 20,000; 0: flat
   out), while a second client searches it without pause at the
   same ef_search: write keys/s over the whole write, search queries/s while the writes ran, and
   on after them while the merges catch up (until the growing segment is under the threshold),
   the time that took, and recall@10 at the end of the writes (growing and sealed segments) and
   once merged.

Target (the issue): writes >= 20,000 keys/s, recall@10 >= 0.95 at today's ef_search, and search
queries/s while writes and merges run >= 0.7x today's.

Usage: .venv/bin/python -m bench bank_writes [--keys 60000 --batch 5000 --ef-search 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import psycopg

from app.banks.schema import DEFAULT_MERGE_FACTOR, DEFAULT_MERGE_THRESHOLD
from app.database import connect
from app.settings import Settings
from bench.common import Service, fresh_database, load_words, machine_facts, start_service
from bench.knn import Truth, _expect, brute_force, bulk_load, fashion_mnist, gaussian, normalised, search_bodies
from bench.record import Outcome, plain
from eidetic.wire.bank_items import items_to_arrow

JSON = {"content-type": "application/json"}
ARROW = {"content-type": "application/vnd.apache.arrow.stream"}
HEADERS = {"json": JSON, "arrow": ARROW}


@dataclass
class Searches:
    """Search batches run in one stretch of time: how many queries, in how long, and what they found."""

    queries: int = 0
    seconds: float = 0.0
    found: list[list[int]] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.queries / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Configuration:
    """A service configuration the segmented bank is measured under; `settings`: Settings fields."""

    name: str
    described: str
    settings: dict[str, int]


# Side by side in one run: the service as it was before the growing items were held, each change
# alone, and the defaults (the targets are judged on the defaults).
CONFIGURATIONS = [
    Configuration(
        "before",
        "growing items read from the database by every search; every sealed segment by its index; builds with "
        "PostgreSQL's parallel workers (the service before these changes)",
        {"growing_cache_mb": 0, "exact_scan_values": 0, "merge_build_workers": -1},
    ),
    Configuration(
        "held",
        "growing items held by the service between searches; every sealed segment by its index; builds with "
        "parallel workers",
        {"exact_scan_values": 0, "merge_build_workers": -1},
    ),
    Configuration(
        "held, 1-process builds",
        "as 'held', builds without parallel workers (`EIDETIC_MERGE_BUILD_WORKERS=0`)",
        {"exact_scan_values": 0, "merge_build_workers": 0},
    ),
    Configuration(
        "defaults",
        "the defaults: growing items and the newest sealed segments up to `EIDETIC_EXACT_SCAN_VALUES` held and "
        "searched exactly, older segments by index; builds without parallel workers",
        {},
    ),
]


@dataclass
class SegmentedRun:
    """The segmented bank under one service configuration."""

    name: str
    write_s: float = 0.0
    timed_keys: int = 0
    qps_during_writes: float = 0.0
    qps_during_merges: float = 0.0
    catch_up_s: float = 0.0
    recall_after_writes: float = 0.0
    recall_merged: float = 0.0
    merged_qps: float = 0.0
    compact_s: float = 0.0
    compacted_qps: float = 0.0
    recall_compacted: float = 0.0
    segments: list[dict] = field(default_factory=list)
    growing_after_writes: int = 0

    @property
    def keys_per_s(self) -> float:
        return self.timed_keys / self.write_s


@dataclass
class Figures:
    data: str
    keys: int
    dim: int
    batch: int
    ef_search: int
    hnsw_m: int
    hnsw_ef_construction: int
    merge_threshold: int
    merge_factor: int
    # today's path
    live_keys: int = 0
    live_write_s: float = 0.0
    bulk_copy_s: float = 0.0
    bulk_index_s: float = 0.0
    live_qps: float = 0.0
    live_qps_during_writes: float = 0.0
    live_recall: float = 0.0
    runs: list[SegmentedRun] = field(default_factory=list)  # the segmented bank, one per service configuration
    body: str = "arrow"
    # write-only, side by side: (body, batch) -> keys/s, and the keys each wrote
    body_keys: int = 0
    body_rates: dict[str, float] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def live_keys_per_s(self) -> float:
        return self.live_keys / self.live_write_s

    def run(self, name: str) -> SegmentedRun:
        return next(run for run in self.runs if run.name == name)


def item_bodies(keys_: np.ndarray, labels: np.ndarray, batch: int, body: str = "json") -> list[bytes]:
    """The write requests' bodies, encoded beforehand: JSON as the old client sent, or Arrow as it sends numpy."""
    if body == "arrow":
        return [items_to_arrow(keys_[s : s + batch], labels=labels[s : s + batch]) for s in range(0, len(keys_), batch)]
    return [
        json.dumps(
            {
                "items": [
                    {"key": key, "label": int(label)}
                    for key, label in zip(keys_[s : s + batch].tolist(), labels[s : s + batch].tolist())
                ]
            }
        ).encode()
        for s in range(0, len(keys_), batch)
    ]


def measure_bodies(service: Service, figures: Figures, keys_: np.ndarray, labels: np.ndarray, args) -> None:
    """Write-only keys/s of JSON and Arrow bodies side by side: a fresh segmented bank per body and batch size,
    the bodies encoded beforehand, one request after the other, nothing searching meanwhile."""
    keys_, labels = keys_[: args.body_keys], labels[: args.body_keys]
    figures.body_keys = len(keys_)
    for batch in args.body_batches:
        for body in ("json", "arrow"):
            bank_id = create_bank(service, f"{body}-{batch}", keys_.shape[1], len(keys_), args, args.merge_threshold)
            bodies = item_bodies(keys_, labels, batch, body)
            began = time.perf_counter()
            for content in bodies:
                _expect(
                    service.client.post(f"/v1/memory-banks/{bank_id}/items", content=content, headers=HEADERS[body]),
                    200,
                )
            figures.body_rates[f"{body} {batch}"] = len(keys_) / (time.perf_counter() - began)
            print(
                f"bodies: {body} in batches of {batch:,}: {figures.body_rates[f'{body} {batch}']:,.0f} keys/s",
                flush=True,
            )
            _expect_deleted(service, bank_id)


def search_pass(client, bank_id: int, bodies: list[bytes], stop: threading.Event | None = None) -> Searches:
    """The batches in turn (all of them, or until `stop`); the ids each query found."""
    done = Searches()
    for body in bodies:
        if stop is not None and stop.is_set():
            break
        began = time.perf_counter()
        results = _expect(client.post(f"/v1/memory-banks/{bank_id}/search", content=body, headers=JSON), 200)
        done.seconds += time.perf_counter() - began
        done.queries += len(results["results"])
        done.found.extend(r["ids"] for r in results["results"])
    return done


def searcher(service: Service, bank_id: int, queries: list[bytes], stop: threading.Event, into: list) -> None:
    """Searches without pause on a client of its own until `stop`."""
    with httpx.Client(base_url=service.base_url, headers=dict(service.client.headers), timeout=600) as client:
        while not stop.is_set():
            into.append(search_pass(client, bank_id, queries, stop))


def total(searches: list[Searches]) -> Searches:
    return Searches(sum(s.queries for s in searches), sum(s.seconds for s in searches))


def best_pass(client, bank_id: int, bodies: list[bytes], passes: int) -> Searches:
    search_pass(client, bank_id, bodies[:1])  # warm-up
    return max((search_pass(client, bank_id, bodies) for _ in range(passes)), key=lambda s: s.per_second)


def recall(truth: Truth, row_of: dict[int, int], found: list[list[int]]) -> float:
    return truth.recall([np.array([row_of[i] for i in ids], dtype=np.int64) for ids in found])


def create_bank(service: Service, name: str, dim: int, n: int, args: argparse.Namespace, merge_threshold: int) -> int:
    body = {
        "name": name,
        "dim": dim,
        "metric": "cosine",
        "capacity": n,
        "policy": "none",
        "hnsw_m": args.m,
        "hnsw_ef_construction": args.ef_construction,
        "merge_threshold": merge_threshold,
        "merge_factor": args.merge_factor,
    }
    return int(_expect(service.client.post("/v1/memory-banks", json=body), 201)["id"])


def segments_of(service: Service, bank_id: int) -> dict:
    return _expect(service.client.get(f"/v1/memory-banks/{bank_id}/segments"), 200)


def measure_live(service: Service, figures: Figures, keys_: np.ndarray, labels: np.ndarray, args, truth, queries):
    """Today's path: a bank with one live HNSW index, all but the last keys in bulk, the last through POST."""
    bank_id = create_bank(service, "live", keys_.shape[1], len(keys_), args, merge_threshold=0)
    bulk = len(keys_) - args.live_keys
    with connect(service.database_url, Settings()) as conn:
        figures.bulk_copy_s, figures.bulk_index_s, ids = bulk_load(conn, bank_id, keys_[:bulk], labels[:bulk])
        conn.execute("VACUUM ANALYZE memory_items")
    row_of = {int(item_id): row for row, item_id in enumerate(ids)}
    bodies = item_bodies(keys_[bulk:], labels[bulk:], args.batch)
    stop = threading.Event()
    during: list[Searches] = []
    thread = threading.Thread(target=searcher, args=(service, bank_id, queries, stop, during))
    thread.start()
    began = time.perf_counter()
    for body in bodies:
        written = _expect(service.client.post(f"/v1/memory-banks/{bank_id}/items", content=body, headers=JSON), 200)
        for item_id in written["ids"]:
            row_of[int(item_id)] = len(row_of)  # the rows in written order
    figures.live_write_s = time.perf_counter() - began
    stop.set()
    thread.join()
    figures.live_qps_during_writes = total(during).per_second
    figures.live_keys = len(keys_) - bulk
    print(f"today: {figures.live_keys:,} keys into the live index at {figures.live_keys_per_s:,.0f} keys/s", flush=True)
    searched = best_pass(service.client, bank_id, queries, args.passes)
    figures.live_qps, figures.live_recall = searched.per_second, recall(truth, row_of, searched.found)
    print(
        f"today: search {figures.live_qps_during_writes:,.0f} queries/s during the writes, {figures.live_qps:,.0f} "
        f"after them, recall@10 {figures.live_recall:.4f}",
        flush=True,
    )
    _expect_deleted(service, bank_id)


def _expect_deleted(service: Service, bank_id: int) -> None:
    if service.client.delete(f"/v1/memory-banks/{bank_id}").status_code != 204:
        raise RuntimeError(f"bank {bank_id} was not deleted")


def measure_segmented(
    service: Service, figures: Figures, run: SegmentedRun, keys_: np.ndarray, labels: np.ndarray, args, truth, queries
):
    """Writes through POST while a second client searches without pause, then on while the merges catch up."""
    bank_id = create_bank(service, f"segmented {run.name}", keys_.shape[1], len(keys_), args, args.merge_threshold)
    bodies = item_bodies(keys_, labels, args.batch, args.body)
    headers = HEADERS[args.body]
    row_of: dict[int, int] = {}
    stop = threading.Event()
    during: list[Searches] = []

    # the first batch before the searcher starts (so that it finds something), untimed
    written = _expect(service.client.post(f"/v1/memory-banks/{bank_id}/items", content=bodies[0], headers=headers), 200)
    row_of.update((int(item_id), row) for row, item_id in enumerate(written["ids"]))
    thread = threading.Thread(target=searcher, args=(service, bank_id, queries, stop, during))
    thread.start()
    began = time.perf_counter()
    for number, body in enumerate(bodies[1:], start=1):
        if args.write_rate > 0:  # paced: this request no earlier than the rate allows
            time.sleep(max(0.0, began + (number - 1) * args.batch / args.write_rate - time.perf_counter()))
        written = _expect(service.client.post(f"/v1/memory-banks/{bank_id}/items", content=body, headers=headers), 200)
        for n, item_id in enumerate(written["ids"]):
            row_of[int(item_id)] = number * args.batch + n
    run.write_s = time.perf_counter() - began
    run.timed_keys = wrote = len(keys_) - len(written["ids"])
    stop.set()
    thread.join()
    run.qps_during_writes = total(during).per_second
    state = segments_of(service, bank_id)
    run.growing_after_writes = state["growing_rows"]
    print(
        f"segmented ({run.name}): {wrote:,} keys at {wrote / run.write_s:,.0f} keys/s, search "
        f"{run.qps_during_writes:,.0f} queries/s meanwhile; {state['growing_rows']:,} growing after the writes",
        flush=True,
    )
    # search on while the merges catch up: the first pass's answers give the recall of the bank as the
    # writes left it (growing and sealed segments; nothing is written meanwhile)
    passes: list[Searches] = []
    began = time.perf_counter()
    while not passes or segments_of(service, bank_id)["growing_rows"] >= max(figures.merge_threshold, 1):
        passes.append(search_pass(service.client, bank_id, queries))
        if time.perf_counter() - began > args.catch_up_limit_s:
            break
    run.catch_up_s = time.perf_counter() - began
    run.qps_during_merges = total(passes).per_second
    run.recall_after_writes = recall(truth, row_of, passes[0].found)
    _expect(service.client.post(f"/v1/memory-banks/{bank_id}/merge"), 200)  # the rest, for the merged figures
    run.segments = segments_of(service, bank_id)["segments"]
    merged = best_pass(service.client, bank_id, queries, args.passes)
    run.merged_qps, run.recall_merged = merged.per_second, recall(truth, row_of, merged.found)
    began = time.perf_counter()
    _expect(service.client.post(f"/v1/memory-banks/{bank_id}/merge", params={"full": "true"}), 200)
    run.compact_s = time.perf_counter() - began
    compacted = best_pass(service.client, bank_id, queries, args.passes)
    run.compacted_qps, run.recall_compacted = compacted.per_second, recall(truth, row_of, compacted.found)
    print(
        f"segmented ({run.name}): caught up in {run.catch_up_s:.1f} s ({run.qps_during_merges:,.0f} queries/s); merged: "
        f"{len(run.segments)} segments, {run.merged_qps:,.0f} queries/s, recall@10 {run.recall_merged:.4f}; "
        f"compacted into one in {run.compact_s:.1f} s: {run.compacted_qps:,.0f} queries/s, "
        f"recall@10 {run.recall_compacted:.4f}",
        flush=True,
    )
    exact = _expect(
        service.client.post(
            f"/v1/memory-banks/{bank_id}/search",
            content=search_bodies(truth.queries_unit[:8], 8, 10, args.ef_search, True)[0],
            headers=JSON,
        ),
        200,
    )
    figures.checks[f"exact search of the segmented bank ({run.name}) is the true top 10"] = (
        recall(truth, row_of, [r["ids"] for r in exact["results"]]) == 1.0
    )
    with psycopg.connect(service.database_url) as conn:
        count, distinct = conn.execute(
            f"SELECT count(*), count(DISTINCT id) FROM memory_items_b{int(bank_id)}"
        ).fetchone()
    figures.checks[f"every key stored once ({run.name})"] = count == distinct == len(keys_) == len(row_of)
    figures.runs.append(run)


def run_benchmark(args: argparse.Namespace) -> Figures:
    loaded = (fashion_mnist if args.data == "fashion-mnist" else gaussian)(args.keys, args.queries, args.dim)
    keys_, labels, queries_, described = loaded
    keys_unit, queries_unit = normalised(keys_), normalised(queries_)
    top, kth = brute_force(keys_unit, queries_unit, 10)
    truth = Truth(top, kth[:, -1], keys_unit, queries_unit)
    figures = Figures(
        described,
        len(keys_),
        keys_.shape[1],
        args.batch,
        args.ef_search,
        args.m,
        args.ef_construction,
        args.merge_threshold,
        args.merge_factor,
        body=args.body,
    )
    queries = search_bodies(queries_, args.query_batch, 10, args.ef_search, False)
    with fresh_database("bank-writes") as database:
        base = {"database_url": database.url, "data_dir": database.workdir, "no_auth": False, "merge_interval_s": 0.2}
        service = start_service(database.url, Settings(**base))
        try:
            measure_bodies(service, figures, keys_, labels, args)
            measure_live(service, figures, keys_, labels, args, truth, queries)
        finally:
            service.stop()
        for configuration in CONFIGURATIONS:
            service = start_service(database.url, Settings(**base, **configuration.settings))
            try:
                run = SegmentedRun(configuration.name)
                measure_segmented(service, figures, run, keys_, labels, args, truth, queries)
            finally:
                service.stop()
    return figures


def verdict(f: Figures) -> str:
    """The targets, judged on the defaults; HNSW recall on the run whose sealed segments are all searched by index."""
    run, indexed = f.run("defaults"), f.run("held, 1-process builds")
    wants = [
        (run.keys_per_s >= 20_000, f"writes {run.keys_per_s:,.0f} keys/s (target 20,000)"),
        (indexed.recall_merged >= 0.95, f"HNSW recall@10 merged {indexed.recall_merged:.3f} (target 0.95)"),
        (indexed.recall_compacted >= 0.95, f"HNSW recall@10 compacted {indexed.recall_compacted:.3f}"),
        (run.recall_merged >= 0.95, f"recall@10 merged, defaults {run.recall_merged:.3f}"),
        (run.recall_after_writes >= 0.95, f"recall@10 right after the writes {run.recall_after_writes:.3f}"),
        (
            run.qps_during_writes >= 0.7 * f.live_qps,
            f"search during writes {run.qps_during_writes / f.live_qps:.2f}x today's (target 0.7x)",
        ),
        (
            run.qps_during_merges >= 0.7 * f.live_qps,
            f"search while merges caught up {run.qps_during_merges / f.live_qps:.2f}x today's",
        ),
    ]
    met = [text for ok, text in wants if ok]
    missed = [text for ok, text in wants if not ok]
    return ("met: " + "; ".join(met) if met else "") + ("; not met: " + "; ".join(missed) if missed else "")


def report(f: Figures, args: argparse.Namespace, machine: dict[str, str], load: tuple[float, float]) -> str:
    lines = [
        f"- Date: {machine['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} memory; {machine['software']}",
        f"- Command: `{machine['command']}` ({load_words(*load)})",
        f"- Data: {f.data}; HNSW m={f.hnsw_m}, ef_construction={f.hnsw_ef_construction} for both banks; "
        f"writes of {f.batch:,} keys per request (today's bank: JSON bodies; the segmented bank: {f.body} bodies; "
        "encoded beforehand), one request after the other"
        + (
            f", the segmented bank's paced at {args.write_rate:,.0f} keys/s while it is searched"
            if args.write_rate > 0
            else ", as fast as they go"
        )
        + "; searches "
        f"of {args.query_batch} queries per request, k=10, ef_search {f.ef_search}; recall@10 against numpy brute "
        "force. The service runs in this process (uvicorn thread, loopback), its merger looking every 0.2 s.",
        f"- Segmented bank: merge_threshold {f.merge_threshold:,}, merge_factor {f.merge_factor}; measured under "
        "each service configuration in turn, a fresh service and bank each: "
        + "; ".join(f"**{c.name}**: {c.described}" for c in CONFIGURATIONS)
        + ".",
        f"- Verdict: {verdict(f)}.",
        "",
        "| path | keys written | keys/s | vs today |",
        "|---|---|---|---|",
        f"| today: POST items into the live HNSW index (the last keys of a bank of {f.keys:,}) | {f.live_keys:,} | "
        f"{f.live_keys_per_s:,.0f} | 1.00x |",
        *(
            f"| segmented ({run.name}): POST items ({f.body}) into the growing segment, merges running | "
            f"{run.timed_keys:,} | {run.keys_per_s:,.0f} | {run.keys_per_s / f.live_keys_per_s:.1f}x |"
            for run in f.runs
        ),
        f"| bulk: binary COPY of {f.keys - f.live_keys:,} keys (today's bank, no index) | {f.keys - f.live_keys:,} | "
        f"{(f.keys - f.live_keys) / f.bulk_copy_s:,.0f} | |",
        f"| bulk: CREATE INDEX hnsw over them | {f.keys - f.live_keys:,} | "
        f"{(f.keys - f.live_keys) / f.bulk_index_s:,.0f} | |",
        "",
        f"| write only, {f.body_keys:,} keys into a fresh segmented bank, nothing searching | JSON keys/s | "
        "Arrow keys/s | Arrow vs JSON |",
        "|---|---|---|---|",
        *(
            f"| batches of {batch:,} | {f.body_rates[f'json {batch}']:,.0f} | {f.body_rates[f'arrow {batch}']:,.0f} | "
            f"{f.body_rates[f'arrow {batch}'] / f.body_rates[f'json {batch}']:.2f}x |"
            for batch in args.body_batches
        ),
        "",
        "| search | queries/s | vs today | recall@10 |",
        "|---|---|---|---|",
        f"| today: one live HNSW index, {f.keys:,} keys, no writes | {f.live_qps:,.0f} | 1.00x | {f.live_recall:.4f} |",
        f"| today: the same while its last {f.live_keys:,} keys were written | {f.live_qps_during_writes:,.0f} | "
        f"{f.live_qps_during_writes / f.live_qps:.2f}x | |",
        *(row for run in f.runs for row in _search_rows(run, f.live_qps)),
        "",
        "Checks: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in f.checks.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def _search_rows(run: SegmentedRun, today_qps: float) -> list[str]:
    sizes = ", ".join(f"{segment['rows']:,}" for segment in run.segments)
    return [
        f"| segmented ({run.name}), while the writes ran | {run.qps_during_writes:,.0f} | "
        f"{run.qps_during_writes / today_qps:.2f}x | |",
        f"| segmented ({run.name}), after the writes while merges caught up ({run.catch_up_s:.1f} s, from "
        f"{run.growing_after_writes:,} growing items) | {run.qps_during_merges:,.0f} | "
        f"{run.qps_during_merges / today_qps:.2f}x | {run.recall_after_writes:.4f} (the bank as the writes left it) |",
        f"| segmented ({run.name}), merged ({len(run.segments)} sealed segments: {sizes} items) | "
        f"{run.merged_qps:,.0f} | {run.merged_qps / today_qps:.2f}x | {run.recall_merged:.4f} |",
        f"| segmented ({run.name}), compacted into one segment (POST merge?full=true, {run.compact_s:.1f} s; what "
        f"the background merger does to a bank left idle) | {run.compacted_qps:,.0f} | "
        f"{run.compacted_qps / today_qps:.2f}x | {run.recall_compacted:.4f} |",
    ]


TINY = shlex.split(
    "--data gaussian --keys 3000 --live-keys 500 --batch 1000 --dim 16 --queries 32 --query-batch 16 "
    "--merge-threshold 1000 --passes 1 --catch-up-limit-s 30 --body-keys 2000 --body-batches 1000"
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["fashion-mnist", "gaussian"], default="fashion-mnist")
    parser.add_argument("--keys", type=int, default=60_000)
    parser.add_argument("--live-keys", type=int, default=5_000, help="keys written into today's live index")
    parser.add_argument("--batch", type=int, default=5_000, help="keys per write request (1,000 to 10,000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1_024)
    parser.add_argument("--query-batch", type=int, default=128)
    parser.add_argument("--ef-search", type=int, default=40, help="bench/knn.py's Fashion-MNIST figure: 40")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--merge-threshold", type=int, default=DEFAULT_MERGE_THRESHOLD)
    parser.add_argument("--merge-factor", type=int, default=DEFAULT_MERGE_FACTOR)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument(
        "--write-rate",
        type=float,
        default=20_000,
        help="keys/s the segmented bank's writer holds while the searcher runs (the target's; 0: as fast as it can)",
    )
    parser.add_argument("--catch-up-limit-s", type=float, default=600.0)
    parser.add_argument("--body", choices=["arrow", "json"], default="arrow", help="the segmented bank's write bodies")
    parser.add_argument("--body-keys", type=int, default=30_000, help="keys of each write-only body measurement")
    parser.add_argument(
        "--body-batches", type=lambda text: [int(x) for x in text.split(",")], default=[1_000, 5_000, 10_000]
    )
    return parser


def run(args: argparse.Namespace, command: str) -> Outcome:
    machine = machine_facts(command, f"Python {platform.python_version()}, numpy {np.__version__}")
    load_before = os.getloadavg()[0]
    figures = run_benchmark(args)
    load = (load_before, os.getloadavg()[0])
    return Outcome(
        report(figures, args, machine, load),
        {"figures": plain(figures), "load": list(load)},
        machine,
        passed=all(figures.checks.values()),
    )


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["bank_writes", *sys.argv[1:]]))
