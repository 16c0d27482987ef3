"""Dashboard: how long every page of a large layer takes to render, as a browser waits for it.

One run on a fresh embedded PostgreSQL (a temporary data directory, removed at the end) and
the service over HTTP on loopback (uvicorn in a thread of this process). A layer of `--rows`
x `--dim` float32 activations (shaped like a trained layer's; step = row // 64, an epoch
every 60,000 rows, labels 0-9, task A then task B) is loaded through the service's binary
COPY ingest path (app.ingest.ingest on a direct connection, `--batch-rows` per batch), then
VACUUM (ANALYZE) runs, as autovacuum would after a bulk load. An exact quantile set (Q=10,
epoch 0) is stored so the page has boundaries to draw.

Each view of the layer page is timed the way the page's script loads it: the HTML, then the
run and the layer, then the list of quantile sets, then the distribution, histogram, sampled
summary and the newest set's boundaries in parallel. Views: no filter, task B, label 3,
epoch 2 with a step range, and the last unit. The runs and health pages are timed alike.

The memory-bank page is timed on a bank of `--bank-keys` x `--dim` keys (10 labelled Gaussian
clusters, cosine), written through POST items in batches of `--bank-batch` (into the growing
segment); then the service's background merger seals and compacts them into one HNSW segment,
as it does to a bank left unwritten for `merge_idle_s` (here 1 s, so the wait is the merge
itself), and the database is VACUUM (ANALYZE)d: the bank as a user sees it once the merger
has caught up. The page as its script
loads it (app/ui/static/bank.js): the HTML, the bank (size and settings), then the first page
of items with the counts per label, the 2-D projection of 5,000 sampled keys and the fill, in
parallel. Then each request a click makes, alone: the items of one label, an item's neighbours
(exact) and a pasted key's neighbours (exact search). The projection must say it is sampled
(how many of how many keys), and the neighbours must be numpy's exact top 10.
Target: every page and request under 1 s. The anchor beside it is the same aggregates read exactly
(`sample=false`: every row), which is what the routes did before they sampled large layers;
and the sampled answers are checked against the exact ones (the CDF of a histogram, the percentile bands).

Usage: .venv/bin/python -m bench dashboard [--rows 1000000 --dim 128 --batch-rows 50000 --repeats 3
                                           --bank-keys 100000 --bank-batch 5000]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import psycopg

from app import ingest, runs
from app.settings import Settings
from bench.common import Service, activations, fresh_database, load_words, machine_facts, start_service
from bench.record import Outcome, plain
from eidetic.wire.rows import ActivationRows

PAGE_TARGET_S = 1.0  # every page of the layer renders in under 1 s
STEP_ROWS = 64  # rows per training step (a batch of 64)
EPOCH_ROWS = 60_000  # rows per epoch (an MNIST-sized training set)
CDF_TOLERANCE = 0.01  # a sampled histogram's CDF within 1 percentage point of the exact one
PERCENTILE_TOLERANCE = 0.05  # sampled band percentiles within 5% of the unit's spread (p93 - p7) of the exact


# ---------------------------------------------------------------- the layer


def load_layer(database_url: str, layer: runs.Layer, n_rows: int, batch_rows: int) -> float:
    """Stores the rows through the ingest path (binary COPY into the layer's partition); returns seconds."""
    began = time.perf_counter()
    with psycopg.connect(database_url, autocommit=True) as conn:
        for number, start in enumerate(range(0, n_rows, batch_rows)):
            stop = min(start + batch_rows, n_rows)
            rows_ids = np.arange(start, stop)
            values = activations(stop - start, layer.dim, seed=number)
            rows = ActivationRows.build(
                values,
                sample_id=rows_ids % EPOCH_ROWS,
                step=rows_ids // STEP_ROWS,
                epoch=(rows_ids // EPOCH_ROWS).astype(np.int32),
                label=np.random.default_rng(number).integers(0, 10, stop - start, dtype=np.int32),
                task=np.where(rows_ids < n_rows // 2, "A", "B"),
            )
            ingest.ingest(conn, layer, f"batch-{number}", rows)
    seconds = time.perf_counter() - began
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return seconds


# ---------------------------------------------------------------- a page, as the browser loads it


@dataclass
class View:
    name: str
    filters: dict[str, object]
    unit: int = 0


@dataclass
class PageTiming:
    name: str
    page_s: list[float] = field(default_factory=list)  # every repeat: HTML + the script's requests, stage by stage
    requests_s: dict[str, list[float]] = field(default_factory=dict)  # each request alone, every repeat
    exact_s: dict[str, float] = field(default_factory=dict)  # the anchor: the aggregates over every row

    @property
    def best(self) -> float:
        return min(self.page_s)

    @property
    def median(self) -> float:
        return float(np.median(self.page_s))

    @property
    def slowest_request(self) -> tuple[str, float]:
        name = max(self.requests_s, key=lambda n: min(self.requests_s[n]))
        return name, min(self.requests_s[name])


def _get(client: httpx.Client, path: str, params: dict | None = None, body: dict | None = None) -> httpx.Response:
    """GET the path (or POST `body` as JSON, for a search); anything but 200 stops the benchmark."""
    response = client.get(path, params=params) if body is None else client.post(path, params=params, json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.method} {path}: {response.status_code} {response.text[:300]}")
    return response


def timed_stages(client: httpx.Client, pool: ThreadPoolExecutor, stages: list[dict[str, tuple]]) -> dict[str, float]:
    """Runs each stage's requests in parallel (as the page's script does), stage after stage;
    returns each request's own seconds and the whole as "page"."""
    seconds: dict[str, float] = {}
    began = time.perf_counter()

    def one(name: str, path: str, params: dict | None, body: dict | None = None) -> None:
        start = time.perf_counter()
        _get(client, path, params, body)
        seconds[name] = time.perf_counter() - start

    for stage in stages:
        for future in [pool.submit(one, name, *request) for name, request in stage.items()]:
            future.result()
    seconds["page"] = time.perf_counter() - began
    return seconds


def layer_stages(run_id: int, layer_id: int, view: View, set_id: int | None) -> list[dict[str, tuple]]:
    """What the layer page requests, in the order its script does (app/ui/static/layer.js)."""
    base = f"/v1/runs/{run_id}/layers/{layer_id}"
    where = {name: value for name, value in view.filters.items() if value is not None}
    last = {
        "distribution": (f"{base}/distribution", {"unit": view.unit, "buckets": 50, **where}),
        "histogram": (f"{base}/histogram", {"unit": view.unit, "bins": 40, **where}),
        "summary": (f"{base}/summary", {"sample": "true", **where}),
    }
    if set_id is not None:
        last["quantile set"] = (f"/v1/quantile-sets/{set_id}", None)
    return [
        {"HTML": (f"/ui/runs/{run_id}/layers/{layer_id}", None)},
        {"run": (f"/v1/runs/{run_id}", None), "layer": (base, None)},
        {"quantile sets": (f"{base}/quantiles", {"limit": 100})},
        last,
    ]


def time_page(
    client: httpx.Client, pool: ThreadPoolExecutor, name: str, stages: list[dict[str, tuple]], repeats: int
) -> PageTiming:
    timing = PageTiming(name)
    for _ in range(repeats):
        seconds = timed_stages(client, pool, stages)
        timing.page_s.append(seconds.pop("page"))
        for request, spent in seconds.items():
            timing.requests_s.setdefault(request, []).append(spent)
    return timing


def exact_anchor(client: httpx.Client, stages: list[dict[str, tuple]]) -> dict[str, float]:
    """The page's aggregates read exactly (sample=false), one at a time: the routes before sampling."""
    spent = {}
    for name, (path, params) in stages[-1].items():
        if name not in ("distribution", "histogram", "summary"):
            continue
        began = time.perf_counter()
        _get(client, path, {**(params or {}), "sample": "false"})
        spent[name] = time.perf_counter() - began
    return spent


# ---------------------------------------------------------------- sampled against exact


def accuracy(client: httpx.Client, stages: list[dict[str, tuple]], unit: int) -> dict[str, object]:
    """How far the sampled histogram and bands of a unit are from the exact ones.

    The histograms span different ranges (the sample's own), so they are compared as
    distributions: the largest gap between the sampled CDF at its bin edges and the exact
    CDF there (interpolated within the exact bins), a Kolmogorov distance.
    """
    requests = stages[-1]
    path, params = requests["histogram"]
    params = {**params, "unit": unit}
    sampled = _get(client, path, params).json()
    exact = _get(client, path, {**params, "sample": "false"}).json()
    sampled_cdf = np.concatenate([[0.0], np.cumsum(sampled["counts"])]) / max(sampled["rows"], 1)
    exact_cdf = np.concatenate([[0.0], np.cumsum(exact["counts"])]) / max(exact["rows"], 1)
    distance = float(np.abs(sampled_cdf - np.interp(sampled["edges"], exact["edges"], exact_cdf)).max())

    path, params = requests["distribution"]
    params = {**params, "unit": unit}
    sampled_bands = _get(client, path, params).json()
    exact_bands = _get(client, path, {**params, "sample": "false"}).json()
    exact_values = np.asarray([b["values"] for b in exact_bands["buckets"]])
    spread = float(np.median(exact_values[:, -2] - exact_values[:, 1])) or 1.0
    by_step = {b["step_min"]: b["values"] for b in exact_bands["buckets"]}
    errors = []
    for bucket in sampled_bands["buckets"]:  # the inner bands of the bucket over (about) the same steps
        nearest = min(by_step, key=lambda step: abs(step - bucket["step_min"]))
        errors.append(np.abs(np.asarray(bucket["values"][1:-1]) - np.asarray(by_step[nearest][1:-1])).max())
    return {
        "unit": unit,
        "sampled": bool(sampled["sampled"]),
        "sample_percent": sampled["sample_percent"],
        "layer_rows": sampled["layer_rows"],
        "histogram_rows_sampled": sampled["rows"],
        "histogram_rows_exact": exact["rows"],
        "cdf_distance": distance,
        "band_error_of_spread": float(np.median(errors)) / spread if errors else 0.0,
        "buckets_sampled": len(sampled_bands["buckets"]),
        "buckets_exact": len(exact_bands["buckets"]),
    }


# ---------------------------------------------------------------- the memory bank


BANK_LABELS = 10  # the bank's keys: Gaussian clusters, one per label
PROJECTION_SAMPLE = 5000  # what the bank page asks for (app/ui/static/bank.js)
MERGE_IDLE_S = 1.0  # the merger compacts the bank this long after its last write
MERGE_WAIT_S = 1200.0  # the longest wait for the merger before the benchmark gives up


@dataclass
class Bank:
    id: int
    keys: np.ndarray  # every key, in written order
    labels: np.ndarray
    ids: np.ndarray  # the item id of each key
    write_s: float = 0.0
    merge_s: float = 0.0
    segments: list[dict] = field(default_factory=list)
    growing_rows: int = 0


def bank_keys(n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """n keys in 10 labelled clusters (centres far apart against the noise), rounded so the JSON stays small."""
    rng = np.random.default_rng(13)
    centres = rng.normal(0.0, 1.0, (BANK_LABELS, dim))
    labels = rng.integers(0, BANK_LABELS, n)
    keys_ = centres[labels] + rng.normal(0.0, 0.6, (n, dim))
    return np.round(keys_, 4).astype(np.float32), labels


def load_bank(client: httpx.Client, database_url: str, n: int, dim: int, batch: int) -> Bank:
    """Writes the keys through POST items (the growing segment), then waits for the background merger to
    seal and compact them into one HNSW segment: the bank as it is once the merger has caught up. (A
    `POST merge?full=true` would do the same, but a 100,000-key build outlasts a request's deadline.)"""
    keys_, labels = bank_keys(n, dim)
    body = {"name": "bench-bank", "dim": dim, "metric": "cosine", "capacity": n, "policy": "none"}
    bank = Bank(int(_get_json(client.post("/v1/memory-banks", json=body))["id"]), keys_, labels, np.zeros(0))
    bodies = [
        json.dumps(
            {
                "items": [
                    {"key": k, "label": int(c)} for k, c in zip(keys_[s : s + batch].tolist(), labels[s : s + batch])
                ]
            }
        ).encode()
        for s in range(0, n, batch)
    ]
    ids: list[int] = []
    began = time.perf_counter()
    for content in bodies:
        response = client.post(
            f"/v1/memory-banks/{bank.id}/items", content=content, headers={"content-type": "application/json"}
        )
        ids.extend(_get_json(response, 200)["ids"])
    bank.write_s = time.perf_counter() - began
    bank.ids = np.asarray(ids, dtype=np.int64)
    began = time.perf_counter()
    while True:
        merged = _get(client, f"/v1/memory-banks/{bank.id}/segments").json()
        if merged["growing_rows"] == 0 and len(merged["segments"]) == 1:
            break
        if time.perf_counter() - began > MERGE_WAIT_S:
            raise RuntimeError(f"the bank was not merged into one segment in {MERGE_WAIT_S:g} s: {merged}")
        time.sleep(0.5)
    bank.merge_s = time.perf_counter() - began
    bank.segments, bank.growing_rows = merged["segments"], merged["growing_rows"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return bank


def bank_stages(bank: Bank) -> list[dict[str, tuple]]:
    """What the bank page requests as it opens, in the order its script does (app/ui/static/bank.js)."""
    base = f"/v1/memory-banks/{bank.id}"
    return [
        {"HTML": (f"/ui/banks/{bank.id}", None)},
        {"bank": (base, None)},
        {
            "items": (f"{base}/items", {"after_id": 0, "limit": 50}),
            "projection": (f"{base}/projection", {"sample": PROJECTION_SAMPLE}),
            "fill": (f"{base}/fill", {"points": 200}),
        },
    ]


def bank_clicks(bank: Bank) -> dict[str, tuple]:
    """The requests a click on the bank page makes: a label's items, an item's neighbours, a pasted key's."""
    base = f"/v1/memory-banks/{bank.id}"
    pasted = {"queries": [bank.keys[-1].tolist()], "k": 10, "exact": True}
    return {
        "items of label 3": (f"{base}/items", {"label": 3, "after_id": 0, "limit": 50}),
        "neighbours of an item": (f"{base}/items/{int(bank.ids[0])}/neighbours", {"k": 10}),
        "neighbours of a pasted key": (f"{base}/search", None, pasted),
    }


def bank_checks(client: httpx.Client, bank: Bank) -> dict[str, bool]:
    """The bank page's answers are honest: a sampled projection says of how many keys, neighbours are exact."""
    base = f"/v1/memory-banks/{bank.id}"
    n = len(bank.keys)
    projection = _get(client, f"{base}/projection", {"sample": PROJECTION_SAMPLE}).json()
    unit = bank.keys / np.linalg.norm(bank.keys, axis=1, keepdims=True)
    similar = unit @ unit[0]
    similar[0] = -np.inf  # the item itself is left out
    truth = set(bank.ids[np.argsort(-similar)[:10]].tolist())
    neighbours = _get(client, f"{base}/items/{int(bank.ids[0])}/neighbours", {"k": 10}).json()
    items = _get(client, f"{base}/items", {"label": 3, "limit": 50}).json()
    per_label = {c["label"]: c["items"] for c in items["labels"]}
    return {
        f"projection of {min(PROJECTION_SAMPLE, n):,} sampled keys, saying the bank holds {n:,}": (
            len(projection["x"]) == len(set(projection["ids"])) == min(PROJECTION_SAMPLE, n) and projection["size"] == n
        ),
        "an item's neighbours are numpy's exact top 10": set(neighbours["ids"]) == truth,
        "items per label as written": per_label == {c: int((bank.labels == c).sum()) for c in range(BANK_LABELS)},
        "items of label 3 are of label 3": bool(items["items"]) and all(i["label"] == 3 for i in items["items"]),
        "the bank is sealed (nothing left growing)": bank.growing_rows == 0,
    }


# ---------------------------------------------------------------- the benchmark


@dataclass
class Figures:
    rows: int
    dim: int
    sample_rows: int
    summary_sample_rows: int
    repeats: int
    load_s: float = 0.0
    layer_mb: float = 0.0
    pages: list[PageTiming] = field(default_factory=list)
    first_page_s: float = 0.0  # the first load of the default view (cold caches of the sample's pages)
    accuracy: dict[str, object] = field(default_factory=dict)
    bank_keys: int = 0
    bank_write_s: float = 0.0
    bank_merge_s: float = 0.0
    bank_segments: list[dict] = field(default_factory=list)
    bank_checks: dict[str, bool] = field(default_factory=dict)
    postgres: str = ""
    total_s: float = 0.0


def run_benchmark(args: argparse.Namespace) -> Figures:
    began = time.perf_counter()
    figures = Figures(args.rows, args.dim, args.sample_rows, args.summary_sample_rows, args.repeats)
    service: Service | None = None
    with fresh_database("dashboard") as database:
        figures.postgres = database.postgres
        try:
            settings = Settings(
                database_url=database.url,
                data_dir=database.workdir,
                no_auth=False,
                aggregate_sample_rows=args.sample_rows,
                summary_sample_rows=args.summary_sample_rows,
                merge_interval_s=0.2,
                merge_idle_s=MERGE_IDLE_S,
            )
            service = start_service(database.url, settings)
            client = service.client
            run_id = _get_json(client.post("/v1/runs", json={"name": "bench-dashboard", "config": {"lr": 0.01}}))["id"]
            layer_id = _get_json(
                client.post(f"/v1/runs/{run_id}/layers", json={"name": "fc", "dim": args.dim, "sketch": False})
            )["id"]
            with psycopg.connect(database.url) as conn:
                layer = runs.find_layer(conn, layer_id)
            print(f"loading {args.rows:,} x {args.dim} through binary COPY", flush=True)
            figures.load_s = load_layer(database.url, layer, args.rows, args.batch_rows)
            with psycopg.connect(database.url) as conn:
                size = conn.execute(
                    "SELECT pg_total_relation_size(%s::regclass)",
                    (runs.layer_partition(run_id, layer_id).as_string(conn),),
                ).fetchone()
                figures.layer_mb = (size[0] if size else 0) / 1e6
            print(f"   {figures.load_s:.1f} s ({args.rows / figures.load_s:,.0f} rows/s), {figures.layer_mb:,.0f} MB")
            quantile_set = _get_json(
                client.post(f"/v1/runs/{run_id}/layers/{layer_id}/quantiles", json={"n_quantiles": 10, "epoch": 0}),
                201,
            )
            last_step = (args.rows - 1) // STEP_ROWS
            views = [
                View("no filter", {}),
                View("task B", {"task": "B"}),
                View("label 3", {"label": 3}),
                View(
                    "one epoch in a step range",
                    {"epoch": 3 * args.rows // 8 // EPOCH_ROWS, "step_min": last_step // 4, "step_max": last_step // 2},
                ),
                View(f"unit {args.dim - 1}", {}, unit=args.dim - 1),
            ]
            with ThreadPoolExecutor(max_workers=4) as pool:
                default = layer_stages(run_id, layer_id, views[0], quantile_set["id"])
                figures.first_page_s = timed_stages(client, pool, default)["page"]
                for view in views:
                    stages = layer_stages(run_id, layer_id, view, quantile_set["id"])
                    timing = time_page(client, pool, f"layer: {view.name}", stages, args.repeats)
                    timing.exact_s = exact_anchor(client, stages)
                    figures.pages.append(timing)
                    print(f"   {timing.name}: best {timing.best:.3f} s, median {timing.median:.3f} s", flush=True)
                figures.accuracy = accuracy(client, default, unit=min(3, args.dim - 1))  # a gaussian unit
                others = {
                    "runs": [
                        {"HTML": ("/", None)},
                        {"runs": ("/v1/runs", {"limit": 1000}), "stats": ("/v1/stats", None)},
                    ],
                    "health": [
                        {"HTML": ("/ui/health", None)},
                        {"readiness": ("/readyz", None), "metrics": ("/metrics", None), "stats": ("/v1/stats", None)},
                    ],
                }
                for name, stages in others.items():
                    figures.pages.append(time_page(client, pool, name, stages, args.repeats))
                print(f"writing a bank of {args.bank_keys:,} x {args.dim} keys, then waiting for its merge", flush=True)
                bank = load_bank(client, database.url, args.bank_keys, args.dim, args.bank_batch)
                figures.bank_keys, figures.bank_write_s, figures.bank_merge_s = (
                    len(bank.keys),
                    bank.write_s,
                    bank.merge_s,
                )
                figures.bank_segments = bank.segments
                print(
                    f"   written in {bank.write_s:.1f} s, merged into one segment {bank.merge_s:.1f} s later",
                    flush=True,
                )
                timed_stages(client, pool, bank_stages(bank))  # the first load after the merge (cold pages)
                timing = time_page(client, pool, f"bank of {len(bank.keys):,} keys", bank_stages(bank), args.repeats)
                figures.pages.append(timing)
                print(f"   {timing.name}: best {timing.best:.3f} s, median {timing.median:.3f} s", flush=True)
                for name, request in bank_clicks(bank).items():
                    timing = time_page(client, pool, f"bank: {name}", [{name: request}], args.repeats)
                    figures.pages.append(timing)
                    print(f"   {timing.name}: best {timing.best:.3f} s", flush=True)
                figures.bank_checks = bank_checks(client, bank)
        finally:
            if service is not None:
                service.stop()
    figures.total_s = time.perf_counter() - began
    return figures


def _get_json(response: httpx.Response, status: int = 201) -> dict:
    if response.status_code != status:
        raise RuntimeError(f"{response.request.url.path}: {response.status_code} {response.text[:300]}")
    return response.json()


# ---------------------------------------------------------------- reporting


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(figures: Figures, machine: dict[str, str]) -> str:
    a = figures.accuracy
    lines = [
        f"- Date: {machine['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} memory; {machine['software']}",
        f"- Command: `{machine['command']}` (wall {figures.total_s:.0f} s, including the load)",
        f"- Database: a fresh embedded {figures.postgres}; the service over HTTP on loopback (uvicorn in this "
        f"process, the client's threads beside it), `aggregate_sample_rows` = {figures.sample_rows:,}, "
        f"`summary_sample_rows` = {figures.summary_sample_rows:,}.",
        f"- Layer: {figures.rows:,} rows x {figures.dim} units, {figures.layer_mb:,.0f} MB on disk, loaded through "
        f"binary COPY in {figures.load_s:.1f} s ({figures.rows / figures.load_s:,.0f} rows/s), then VACUUM (ANALYZE).",
        f"- Page times are the best and median of {figures.repeats} loads, each the HTML then the page script's "
        "requests stage by stage (parallel within a stage, as the browser sends them); 1-minute "
        f"{load_words(float(machine['load_before']), float(_load_average()))}.",
        f"- The first load of the layer page after the bulk load (pages not yet cached): {figures.first_page_s:.3f} s.",
        f"- Bank: {figures.bank_keys:,} keys x {figures.dim} (cosine, 10 labelled clusters), written through POST "
        f"items in {figures.bank_write_s:.1f} s ({figures.bank_keys / max(figures.bank_write_s, 1e-9):,.0f} keys/s), "
        f"sealed and compacted by the background merger into {len(figures.bank_segments)} HNSW segment "
        f"{figures.bank_merge_s:.1f} s after the last write (`merge_idle_s` {MERGE_IDLE_S:g} s), then VACUUM (ANALYZE). Its page: the HTML, the "
        f"bank, then items + projection (asking for {PROJECTION_SAMPLE:,} sampled keys) + fill in parallel; each click's "
        "request is timed alone.",
        "",
        "| page | best | median | slowest request (best) | target | met | same aggregates read exactly (anchor) |",
        "|---|---|---|---|---|---|---|",
    ]
    for page in figures.pages:
        slow_name, slow_s = page.slowest_request
        anchor = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in page.exact_s.items()) or "–"
        lines.append(
            f"| {page.name} | {page.best:.3f} s | {page.median:.3f} s | {slow_name} {slow_s:.3f} s "
            f"| < {PAGE_TARGET_S:g} s | {_met(page.best < PAGE_TARGET_S)} | {anchor} |"
        )
    lines += [
        "",
        f"Sampled against exact (no filter, unit {a['unit']}): the answer says it is sampled and from how many rows.",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
        f"| answer says sampled, of the layer's rows | {a['sampled']}, {a['sample_percent']}% of pages "
        f"of {a['layer_rows']:,} rows | sampled when the layer holds more than {figures.sample_rows:,} "
        f"| {_met(bool(a['sampled']) == (figures.rows > figures.sample_rows) and a['layer_rows'] == figures.rows)} |",
        f"| histogram rows, sampled / exact | {a['histogram_rows_sampled']:,} / {a['histogram_rows_exact']:,} | | |",
        f"| largest CDF difference at the bin edges, sampled vs exact | {a['cdf_distance']:.4f} "
        f"| <= {CDF_TOLERANCE} | {_met(a['cdf_distance'] <= CDF_TOLERANCE)} |",
        f"| median band difference (p7-p93), as a share of the unit's spread | {a['band_error_of_spread']:.4f} "
        f"| <= {PERCENTILE_TOLERANCE} | {_met(a['band_error_of_spread'] <= PERCENTILE_TOLERANCE)} |",
        f"| step buckets, sampled / exact | {a['buckets_sampled']} / {a['buckets_exact']} | | |",
        "",
        "Bank page checks: " + "; ".join(f"{name}: {_met(ok)}" for name, ok in figures.bank_checks.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def _load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def checks_pass(figures: Figures) -> bool:
    """Correctness, not speed: a large layer's answers say they are sampled, and count rows they read."""
    a = figures.accuracy
    sampled_as_expected = bool(a["sampled"]) == (figures.rows > figures.sample_rows)
    return (
        sampled_as_expected
        and a["layer_rows"] == figures.rows
        and 0 < int(a["histogram_rows_sampled"]) <= int(a["histogram_rows_exact"]) == figures.rows
        and bool(figures.bank_checks)
        and all(figures.bank_checks.values())
    )


def machine_description(command: str) -> dict[str, str]:
    facts = machine_facts(
        command, software=f"Python {platform.python_version()}, numpy {np.__version__}, httpx {httpx.__version__}"
    )
    facts["load_before"] = _load_average()
    return facts


# Options of a smoke run: a few thousand rows, sampled above 1,000, one repeat; a bank of 2,000 keys.
TINY = shlex.split(
    "--rows 4000 --dim 8 --batch-rows 1000 --sample-rows 1000 --summary-sample-rows 500 --repeats 1 "
    "--bank-keys 2000 --bank-batch 1000"
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows stored in the layer")
    parser.add_argument("--dim", type=int, default=128, help="units of the layer")
    parser.add_argument("--batch-rows", type=int, default=50_000, help="rows per ingest batch while loading")
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=Settings.model_fields["aggregate_sample_rows"].default,
        help="the service's aggregate_sample_rows (default: the setting's default)",
    )
    parser.add_argument(
        "--summary-sample-rows",
        type=int,
        default=Settings.model_fields["summary_sample_rows"].default,
        help="the service's summary_sample_rows (default: the setting's default)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="page loads timed per view")
    parser.add_argument("--bank-keys", type=int, default=100_000, help="keys in the memory bank whose page is timed")
    parser.add_argument("--bank-batch", type=int, default=5_000, help="keys per POST items while writing the bank")
    return parser


def run(args: argparse.Namespace, command: str) -> Outcome:
    machine = machine_description(command)
    figures = run_benchmark(args)
    return Outcome(report(figures, machine), plain(figures), machine, passed=checks_pass(figures))


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["dashboard", *sys.argv[1:]]))
