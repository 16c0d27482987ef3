"""Device caches: QuantileCache against the seed's per-value search, MemoryCache against numpy and the service.

One run, side by side, on one device (cuda when torch sees one, else cpu; --device to choose):

1. Buckets. `QuantileCache.bucketize` of a 60,000 x 36 float32 activation matrix with the
   boundaries `local_boundaries(values, Q)` (Q=10), against the seed's bucket search: the
   recursive binary search of EideticLinearLayer / EideticIndexedLinearLayer
   (`binarySearchQuantiles` and its helper `__bsqHelper`, one activation at a time, in Python),
   re-implemented below with the same recursion and the boundaries held as the seed holds them
   (Python lists of numpy float64 scalars). The seed is timed on a random sample of rows (all 36
   units of each, about 20,000 values) in two ways: the search alone on values already taken out
   as Python floats, and the seed's forward loop as written (`w_times_x[j][i].item()` per value,
   the bucket stored into a torch tensor element by element); both are extrapolated to the
   2,160,000 values. The matrix is bench/quantiles.py's mixture (post-ReLU units, so boundaries
   tie at exact zeros): it checks the tie rule too.
2. Top-k. `MemoryCache` in device-only mode (BankSpec(dim=128, capacity=N, metric="cosine",
   policy="none"), filled with `.write(keys, labels)` in chunks): top-10 of a batch of 128
   queries against N = 10,000 and 100,000 keys, against numpy (one matmul of the normalised
   float32 arrays, argpartition, a sort of the k), passes interleaved so that both meet the same
   load. The top-10 ids are compared. Where the time of `MemoryCache.search` goes: its parts
   timed one by one, a torch profile and a cProfile.
3. Service. A bank with policy none holding the same keys (binary COPY, then the bank's own HNSW
   index re-created from its definition, as bench/knn.py loads), on a fresh embedded PostgreSQL;
   one POST /v1/memory-banks/{id}/search round trip for the same batch (HNSW ef_search=100, and
   exact=true), alternating with `MemoryCache.search` of that batch.

Targets (the issue): bucketize at least 1000x the seed's search; MemoryCache at least 0.8x
numpy's speed (time_cache <= 1.25 x time_numpy).

Every CPU figure is taken at each thread count of --threads (default 1 and nproc), set by
torch.set_num_threads and, for numpy's BLAS, threadpoolctl: on a shared machine the extra
threads can cost more than they bring, and the figures show it.

Usage: .venv/bin/python -m bench caches [--device auto|cpu|cuda] [--threads 1,2] [--n 10000,100000] [--no-write]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from pgvector import Vector
from psycopg import sql
from threadpoolctl import threadpool_info, threadpool_limits

from app import banks as memory
from app.database import connect
from app.settings import Settings
from bench.common import (
    Repeats,
    Service,
    activations,
    fresh_database,
    load_words,
    machine_facts,
    start_service,
)
from bench.record import Outcome, plain
from eidetic.torch.memory_cache import BankSpec, MemoryCache, vote
from eidetic.torch.quantile_cache import QuantileCache, local_boundaries

SPEEDUP_TARGET = 1000.0  # bucketize at least 1000x the seed's per-value search
NUMPY_RATIO_TARGET = 1.25  # time_cache <= 1.25 x time_numpy (0.8x numpy's speed)
TIE_TOLERANCE = 1e-5  # a differing neighbour within this of the k-th similarity is a tie, not a miss
EF_SEARCH = 100
BULK_MAINTENANCE_WORK_MEM = "1GB"


# ---------------------------------------------------------------- timing


@dataclass
class Timing(Repeats):
    seconds: list[float]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(n: int) -> None:
    """torch's intra-op threads and every BLAS loaded (numpy's OpenBLAS, torch's MKL) alike."""
    torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")


def interleaved(
    actions: dict[str, Callable[[], object]], repeats: int, device: torch.device, threads: dict[str, int] | None = None
) -> dict[str, Timing]:
    """Each action once to warm up, then `repeats` rounds of all of them in turn (same load on each).

    `threads` gives an action its thread count, set before its clock starts.
    """
    threads = threads or {}

    def run(name: str) -> float:
        if name in threads:
            set_threads(threads[name])
        synchronize(device)
        began = time.perf_counter()
        actions[name]()
        synchronize(device)
        return time.perf_counter() - began

    for name in actions:
        run(name)
    seconds: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name in actions:
            seconds[name].append(run(name))
    return {name: Timing(values) for name, values in seconds.items()}


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- 1. buckets


class SeedBucketSearch:
    """The seed's bucket search (EideticLinearLayer.binarySearchQuantiles), kept as the seed runs it.

    One activation at a time, recursing in Python over one unit's boundaries, which the seed
    keeps as a list per unit of numpy float64 scalars (rows of its float64 `outputValues`).
    The method names are the seed's, so the two can be read side by side.
    """

    def __init__(self, boundaries: np.ndarray) -> None:
        self.quantiles = [list(row) for row in np.asarray(boundaries, dtype=np.float64)]

    def binarySearchQuantiles(self, activation: float, index: int) -> int:
        return self.__bsqHelper(activation, index, 0, len(self.quantiles[index]))

    def __bsqHelper(self, activation: float, index: int, low: int, high: int) -> int:
        quantiles = self.quantiles[index]
        mid = (high + low) // 2
        above = int(activation > quantiles[mid])
        if mid == 0 or mid >= len(quantiles) - 1:
            return mid + above
        if activation >= quantiles[mid]:
            if activation < quantiles[mid + 1]:  # between this boundary and the next
                return mid + above
            return self.__bsqHelper(activation, index, mid, high)
        return self.__bsqHelper(activation, index, low, mid)


def seed_search_only(seed: SeedBucketSearch, rows: list[list[float]]) -> list[list[int]]:
    """The search alone: values already Python floats, buckets into Python lists."""
    return [[seed.binarySearchQuantiles(value, unit) for unit, value in enumerate(row)] for row in rows]


def seed_forward_loop(seed: SeedBucketSearch, w_times_x: torch.Tensor) -> torch.Tensor:
    """The seed's forward loop as written: `.item()` of each element, stored element by element."""
    indices = torch.zeros([len(w_times_x), w_times_x.shape[1]])
    for j in range(len(w_times_x)):
        for i in range(w_times_x.shape[1]):
            indices[j][i] = seed.binarySearchQuantiles(w_times_x[j][i].item(), i)
    return indices


def strictly_below_count(values: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Boundaries strictly below each value, one comparison per boundary: the check of bucketize's semantics."""
    count = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for column in range(boundaries.shape[1]):
        count += values > boundaries[:, column]
    return count


@dataclass
class BucketFigures:
    rows: int
    units: int
    n_quantiles: int
    sample_values: int
    bucketize: dict[int, Timing]  # per thread count: the default (compiled kernel, int64)
    bucketize_int32: dict[int, Timing]  # out_int32=True
    eager: dict[int, Timing]  # QuantileCache(compiled=False)
    first_call_s: float  # the default's first call, compile included
    seed_search: Timing  # over the sample
    seed_loop: Timing  # over the sample
    strictly_below_everywhere: bool  # ours = number of boundaries strictly below, on every value
    agree_untied: tuple[int, int]  # seed == ours on sampled values that equal no repeated boundary
    tied: int  # sampled values equal to a boundary that repeats in their unit
    tied_last_index: tuple[int, int]  # seed gives (boundaries <= v) - 1 on them
    tied_disagree: int
    units_with_tied_boundaries: int
    profile: dict[int, list[str]] = field(default_factory=dict)

    @property
    def values(self) -> int:
        return self.rows * self.units

    @property
    def fastest(self) -> int:
        """The thread count of the fastest bucketize."""
        return min(self.bucketize, key=lambda threads: self.bucketize[threads].best)

    def extrapolated(self, timing: Timing, pick: str) -> float:
        return getattr(timing, pick) / self.sample_values * self.values


def measure_buckets(args: argparse.Namespace, device: torch.device) -> BucketFigures:
    matrix = activations(args.rows, args.units, seed=1)
    values = torch.from_numpy(matrix).to(device)
    boundaries = local_boundaries(values, args.n_quantiles)
    cache = QuantileCache(boundaries)
    eager = QuantileCache(boundaries, compiled=False)
    print(f"1. buckets: {args.rows:,} x {args.units}, Q={args.n_quantiles}, device {device}", flush=True)
    synchronize(device)
    began = time.perf_counter()
    cache.bucketize(values)
    synchronize(device)
    first_call_s = time.perf_counter() - began

    actions, threads = {}, {}
    for n in args.threads:
        actions[f"bucketize {n}"] = lambda: cache.bucketize(values)
        actions[f"int32 {n}"] = lambda: cache.bucketize(values, out_int32=True)
        actions[f"eager {n}"] = lambda: eager.bucketize(values)
        threads[f"bucketize {n}"] = threads[f"int32 {n}"] = threads[f"eager {n}"] = n
    timings = interleaved(actions, args.bucket_repeats, device, threads)
    ours = cache.bucketize(values)
    strictly_below_everywhere = bool(
        torch.equal(ours, strictly_below_count(values, boundaries).long())
        and torch.equal(ours, eager.bucketize(values))
        and torch.equal(ours, cache.bucketize(values, out_int32=True).long())
    )

    sample_rows = max(1, args.sample_values // args.units)
    picked = np.sort(np.random.default_rng(2).choice(args.rows, sample_rows, replace=False))
    seed = SeedBucketSearch(boundaries.cpu().numpy())
    # On the host, the conservative choice: on a GPU each .item() would also wait for the device.
    sample = torch.from_numpy(matrix[picked])
    sample_lists = matrix[picked].tolist()
    seed_timings = interleaved(
        {"search": lambda: seed_search_only(seed, sample_lists), "loop": lambda: seed_forward_loop(seed, sample)},
        args.seed_repeats,
        torch.device("cpu"),
    )
    seed_buckets = np.asarray(seed_search_only(seed, sample_lists), dtype=np.int64)
    loop_buckets = seed_forward_loop(seed, sample).numpy().astype(np.int64)
    if not np.array_equal(seed_buckets, loop_buckets):
        raise RuntimeError("the seed's search and its forward loop disagree")

    ours_sample = ours[torch.from_numpy(picked).to(device)].cpu().numpy()
    bounds = boundaries.cpu().numpy()
    sampled = matrix[picked]
    tied = (sampled[:, :, None] == bounds[None, :, :]).sum(axis=2) >= 2  # equals a boundary repeated in its unit
    at_most = (sampled[:, :, None] >= bounds[None, :, :]).sum(axis=2)
    agree = seed_buckets == ours_sample
    last_index = seed_buckets == at_most - 1
    profile = {}
    for n in args.threads:
        set_threads(n)
        profile[n] = torch_profile(lambda: cache.bucketize(values), device, 5, rows=3)
    figures = BucketFigures(
        rows=args.rows,
        units=args.units,
        n_quantiles=args.n_quantiles,
        sample_values=sampled.size,
        bucketize={n: timings[f"bucketize {n}"] for n in args.threads},
        bucketize_int32={n: timings[f"int32 {n}"] for n in args.threads},
        eager={n: timings[f"eager {n}"] for n in args.threads},
        first_call_s=first_call_s,
        seed_search=seed_timings["search"],
        seed_loop=seed_timings["loop"],
        strictly_below_everywhere=strictly_below_everywhere,
        agree_untied=(int(agree[~tied].sum()), int((~tied).sum())),
        tied=int(tied.sum()),
        tied_last_index=(int(last_index[tied].sum()), int(tied.sum())),
        tied_disagree=int((~agree & tied).sum()),
        units_with_tied_boundaries=int((np.diff(bounds, axis=1) == 0).any(axis=1).sum()),
        profile=profile,
    )
    fastest = figures.bucketize[figures.fastest]
    print(
        f"   bucketize: best {fastest.best * 1e3:.2f} ms ({figures.fastest} threads); "
        f"seed search {figures.extrapolated(figures.seed_search, 'best'):.2f} s extrapolated, "
        f"seed loop {figures.extrapolated(figures.seed_loop, 'best'):.2f} s; "
        f"agree on untied {figures.agree_untied[0]}/{figures.agree_untied[1]}, tied {figures.tied}",
        flush=True,
    )
    return figures


# ---------------------------------------------------------------- 2. top-k


def memory_keys(n_keys: int, n_queries: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian keys, labels 0..9 and queries (seed 1), as bench/knn.py's Gaussian set."""
    rng = np.random.default_rng(1)
    keys_ = rng.standard_normal((n_keys, dim), dtype=np.float32)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    labels = rng.integers(0, 10, n_keys)
    return keys_, labels, queries


def normalised(matrix: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True), dtype=np.float32)


def numpy_top_k(keys_unit: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """numpy's exact top-k by cosine: one matmul, argpartition, a sort of the k (bench/knn.py's anchor)."""
    similarity = normalised(queries) @ keys_unit.T
    part = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(similarity, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def fill_cache(keys_: np.ndarray, labels: np.ndarray, device: torch.device, chunk: int) -> tuple[MemoryCache, float]:
    cache = MemoryCache(BankSpec(dim=keys_.shape[1], capacity=len(keys_), metric="cosine", policy="none"), device)
    keys_t = torch.from_numpy(keys_).to(device)
    labels_t = torch.from_numpy(labels).to(device)
    began = time.perf_counter()
    for start in range(0, len(keys_), chunk):
        cache.write(keys_t[start : start + chunk], labels_t[start : start + chunk])
    synchronize(device)
    spent = time.perf_counter() - began
    if cache.size != len(keys_) or not torch.equal(cache.keys[: cache.size], keys_t):
        raise RuntimeError("the cache does not hold the keys in the order written")
    return cache, spent


def cache_rows(cache: MemoryCache, ids: torch.Tensor) -> np.ndarray:
    """Row of each returned id in the written keys (with policy none and room, slot = row)."""
    slot_of = {item_id: slot for slot, item_id in enumerate(cache.ids[: cache.size].tolist())}
    return np.vectorize(slot_of.__getitem__, otypes=[np.int64])(ids.cpu().numpy())


@dataclass
class TopKCheck:
    identical: int  # queries whose ordered top-k ids are identical
    same_set: int
    within_tolerance: int  # every differing neighbour within TIE_TOLERANCE of the k-th similarity
    queries: int


def compare_top_k(found: np.ndarray, truth: np.ndarray, keys_unit: np.ndarray, queries: np.ndarray) -> TopKCheck:
    queries_unit = normalised(queries)
    identical = same_set = within = 0
    for row, (got, want) in enumerate(zip(found, truth)):
        identical += int(np.array_equal(got, want))
        same_set += int(set(got.tolist()) == set(want.tolist()))
        kth = float(keys_unit[want[-1]] @ queries_unit[row])
        similarities = keys_unit[np.asarray(got, dtype=np.int64)] @ queries_unit[row]
        within += int(len(got) == len(want) and bool((similarities >= kth - TIE_TOLERANCE).all()))
    return TopKCheck(identical, same_set, within, len(truth))


@dataclass
class Part:
    name: str
    timing: Timing


@dataclass
class TopKFigures:
    n_keys: int
    threads: int
    fill_s: float
    cache: Timing
    numpy: Timing
    check: TopKCheck
    parts: list[Part] = field(default_factory=list)
    numpy_parts: list[Part] = field(default_factory=list)
    torch_ops: list[str] = field(default_factory=list)
    python_profile: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:  # time_cache / time_numpy, best against best
        return self.cache.best / self.numpy.best

    @property
    def ratio_median(self) -> float:
        return self.cache.median / self.numpy.median


def search_parts(
    cache: MemoryCache, queries: torch.Tensor, k: int, repeats: int, device: torch.device, threads: int
) -> list[Part]:
    """MemoryCache.search's steps, each on its own (the same calls, on the cache's own tensors)."""
    size = cache.size
    unit_queries = queries / queries.norm(dim=-1, keepdim=True)
    unit_keys = cache.unit_keys[:size]
    similarity = cache.similarity(queries)
    top = torch.topk(similarity, k, dim=1)
    labels = cache.labels[top.indices]
    hits = cache.hits.clone()
    ones = torch.ones(len(queries), dtype=torch.long, device=device)
    actions = {
        "similarity(): normalise the queries + matmul with the unit keys": lambda: cache.similarity(queries),
        "  of which the matmul alone (`unit_queries @ unit_keys.T`)": lambda: unit_queries @ unit_keys.T,
        "  for comparison, not in model/: `F.linear(unit_queries, unit_keys)`": lambda: F.linear(
            unit_queries, unit_keys
        ),
    }
    if device.type == "cpu":
        actions["  for comparison, not in model/: the same product by numpy's BLAS on the tensors' memory"] = lambda: (
            torch.from_numpy(unit_queries.numpy() @ unit_keys.numpy().T)
        )
    actions |= {
        "torch.topk of the (batch x N) similarities": lambda: torch.topk(similarity, k, dim=1),
        "ids and labels of the top k (two gathers)": lambda: (cache.ids[top.indices], cache.labels[top.indices]),
        "vote (unique, scatter_add, max)": lambda: vote(top.values, labels, k),
        "hits.index_add_ of each query's nearest": lambda: hits.index_add_(0, top.indices[:, 0], ones),
        "the whole MemoryCache.search": lambda: cache.search(queries, k),
    }
    timings = interleaved(actions, repeats, device, dict.fromkeys(actions, threads))
    return [Part(name, timing) for name, timing in timings.items()]


def numpy_parts(keys_unit: np.ndarray, queries: np.ndarray, k: int, repeats: int, threads: int) -> list[Part]:
    queries_unit = normalised(queries)
    similarity = queries_unit @ keys_unit.T
    negated = -similarity
    part = np.argpartition(negated, k - 1, axis=1)[:, :k]
    actions = {
        "normalise the queries": lambda: normalised(queries),
        "matmul with the unit keys": lambda: queries_unit @ keys_unit.T,
        "negate + argpartition": lambda: np.argpartition(-similarity, k - 1, axis=1),
        "  of which argpartition alone": lambda: np.argpartition(negated, k - 1, axis=1),
        "sort of the k": lambda: np.take_along_axis(
            part, np.argsort(-np.take_along_axis(similarity, part, axis=1), axis=1, kind="stable"), axis=1
        ),
    }
    timings = interleaved(actions, repeats, torch.device("cpu"), dict.fromkeys(actions, threads))
    return [Part(name, timing) for name, timing in timings.items()]


def torch_profile(action: Callable[[], object], device: torch.device, calls: int, rows: int) -> list[str]:
    """The ops that take the time, from torch.profiler: name, share of self time, ms per call of the action."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    action()
    synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            action()
        synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)
    total = sum(getattr(e, attribute) for e in events) or 1.0
    return [
        f"{e.key}: {100 * getattr(e, attribute) / total:.1f}% of self {'device' if device.type == 'cuda' else 'CPU'} "
        f"time, {getattr(e, attribute) / 1e3 / calls:.2f} ms per call ({e.count // calls} per call)"
        for e in events[:rows]
    ]


def python_profile(action: Callable[[], object], calls: int, rows: int) -> list[str]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        action()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(rows)
    lines = [line.strip() for line in stream.getvalue().splitlines() if re.match(r"\s*\d", line)]
    return [line.replace(str(REPO) + "/", "").replace(str(Path(torch.__file__).parents[1]) + "/", "") for line in lines]


def write_profile(keys_: np.ndarray, labels: np.ndarray, device: torch.device, chunk: int) -> list[str]:
    """cProfile of filling an empty cache by write(): where a fill's time goes."""
    cache = MemoryCache(BankSpec(dim=keys_.shape[1], capacity=len(keys_), metric="cosine", policy="none"), device)
    keys_t, labels_t = torch.from_numpy(keys_).to(device), torch.from_numpy(labels).to(device)
    return python_profile(lambda: cache.write(keys_t[:chunk], labels_t[:chunk]), 1, rows=8)


def measure_top_k(
    n_keys: int, loaded: tuple[np.ndarray, np.ndarray, np.ndarray], args: argparse.Namespace, device: torch.device
) -> tuple[list[TopKFigures], MemoryCache]:
    """MemoryCache.search against numpy at each thread count, all timed in one alternation."""
    all_keys, all_labels, queries = loaded
    keys_, labels = all_keys[:n_keys], all_labels[:n_keys]
    keys_unit = normalised(keys_)
    print(f"2. top-k: N={n_keys:,}, batch {len(queries)}, k={args.k}", flush=True)
    set_threads(max(args.threads))
    cache, fill_s = fill_cache(keys_, labels, device, args.write_chunk)
    print(f"   filled by write() in chunks of {args.write_chunk:,}: {fill_s:.1f} s", flush=True)
    queries_device = torch.from_numpy(queries).to(device)
    repeats = args.topk_repeats if n_keys <= 20_000 else max(3, args.topk_repeats // 3)
    actions, threads = {}, {}
    for n in args.threads:
        actions[f"cache {n}"] = lambda: cache.search(queries_device, args.k)
        actions[f"numpy {n}"] = lambda: numpy_top_k(keys_unit, queries, args.k)
        threads[f"cache {n}"] = threads[f"numpy {n}"] = n
    timings = interleaved(actions, repeats, device, threads)
    answer = cache.search(queries_device, args.k)
    check = compare_top_k(cache_rows(cache, answer.ids), numpy_top_k(keys_unit, queries, args.k), keys_unit, queries)
    results = []
    for n in args.threads:
        figures = TopKFigures(n_keys, n, fill_s, timings[f"cache {n}"], timings[f"numpy {n}"], check)
        figures.parts = search_parts(cache, queries_device, args.k, repeats, device, n)
        figures.numpy_parts = numpy_parts(keys_unit, queries, args.k, repeats, n)
        set_threads(n)
        figures.torch_ops = torch_profile(lambda: cache.search(queries_device, args.k), device, 5, rows=5)
        figures.python_profile = python_profile(lambda: cache.search(queries_device, args.k), 5, rows=4)
        print(
            f"   {n} threads: cache best {figures.cache.best * 1e3:.2f} ms (median {figures.cache.median * 1e3:.2f}), "
            f"numpy best {figures.numpy.best * 1e3:.2f} ms (median {figures.numpy.median * 1e3:.2f}): "
            f"{figures.ratio:.2f}x numpy's time; identical top-{args.k} {check.identical}/{check.queries}",
            flush=True,
        )
        results.append(figures)
    return results, cache


# ---------------------------------------------------------------- 3. the service


def _expect(response: httpx.Response, status: int) -> dict:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {response.text[:500]}"
        )
    return response.json() if response.content else {}


def bulk_load(
    database_url: str, bank_id: int, keys_: np.ndarray, labels: np.ndarray
) -> tuple[float, float, np.ndarray]:
    """Fills a fresh bank's partition as bench/knn.py does: its HNSW index dropped, a binary COPY,
    the index re-created from its own definition (pg_get_indexdef), size and version set as a write
    would. Returns the COPY and CREATE INDEX seconds and the ids of the rows."""
    partition = memory.items_partition(bank_id)
    index_name = f"memory_items_b{int(bank_id)}_hnsw"
    with connect(database_url, Settings(statement_timeout_ms=0)) as conn:
        definition = conn.execute("SELECT pg_get_indexdef(%s::regclass)", (index_name,)).fetchone()[0]
        version = conn.execute("SELECT version FROM memory_banks WHERE id = %s", (bank_id,)).fetchone()[0] + 1
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name)))
        began = time.perf_counter()
        ids = np.array(
            [
                row[0]
                for row in conn.execute(
                    "SELECT nextval(pg_get_serial_sequence('memory_items', 'id')) FROM generate_series(1, %s)",
                    (len(keys_),),
                )
            ],
            dtype=np.int64,
        )
        statement = sql.SQL("COPY {} (bank_id, id, key, label, version, inserted_version) FROM STDIN (FORMAT BINARY)")
        with conn.cursor().copy(statement.format(partition)) as copy:
            copy.set_types(["bigint", "bigint", "vector", "integer", "bigint", "bigint"])
            for item_id, key, label in zip(ids.tolist(), keys_, labels.tolist()):
                copy.write_row((bank_id, item_id, Vector(key), label, version, version))
        copy_s = time.perf_counter() - began
        conn.execute(f"SET maintenance_work_mem = '{BULK_MAINTENANCE_WORK_MEM}'")
        began = time.perf_counter()
        conn.execute(definition)
        index_s = time.perf_counter() - began
        conn.execute("UPDATE memory_banks SET size = %s, version = %s WHERE id = %s", (len(keys_), version, bank_id))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(partition))
    return copy_s, index_s, ids


@dataclass
class ServiceFigures:
    n_keys: int
    copy_s: float
    index_s: float
    exact: Timing
    hnsw: Timing
    cache_beside_exact: dict[
        int, Timing
    ]  # per thread count: MemoryCache.search of the batch, alternating with the requests
    cache_beside_hnsw: dict[int, Timing]
    exact_check: TopKCheck
    hnsw_recall: float


def measure_service(
    service: Service,
    database_url: str,
    cache: MemoryCache,
    loaded: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_keys: int,
    args: argparse.Namespace,
    device: torch.device,
) -> ServiceFigures:
    all_keys, all_labels, queries = loaded
    keys_, labels = all_keys[:n_keys], all_labels[:n_keys]
    keys_unit = normalised(keys_)
    truth = numpy_top_k(keys_unit, queries, args.k)
    print(f"3. service: N={n_keys:,}", flush=True)
    bank = _expect(
        service.client.post(
            "/v1/memory-banks",
            json={
                "name": f"caches-{n_keys}",
                "dim": keys_.shape[1],
                "metric": "cosine",
                "capacity": n_keys,
                "policy": "none",
                "merge_threshold": 0,  # one live HNSW index, loaded in bulk below
            },
        ),
        201,
    )
    copy_s, index_s, ids = bulk_load(database_url, bank["id"], keys_, labels)
    print(f"   COPY {copy_s:.1f} s, CREATE INDEX (HNSW) {index_s:.1f} s", flush=True)
    row_of = {int(item_id): row for row, item_id in enumerate(ids)}
    queries_device = torch.from_numpy(queries).to(device)
    found: dict[bool, list] = {}

    def request(exact: bool, body: bytes) -> Callable[[], None]:
        def post() -> None:
            response = service.client.post(
                f"/v1/memory-banks/{bank['id']}/search", content=body, headers={"content-type": "application/json"}
            )
            found[exact] = [[row_of[int(i)] for i in result["ids"]] for result in _expect(response, 200)["results"]]

        return post

    def body(exact: bool) -> bytes:
        return json.dumps({"queries": queries.tolist(), "k": args.k, "exact": exact, "ef_search": EF_SEARCH}).encode()

    def alternating(exact: bool, repeats: int) -> dict[str, Timing]:
        actions = {"service": request(exact, body(exact))}
        threads = {}
        for n in args.threads:
            actions[f"cache {n}"] = lambda: cache.search(queries_device, args.k)
            threads[f"cache {n}"] = n
        return interleaved(actions, repeats, device, threads)

    # exact=true first, then HNSW; whether exact answers are exact is checked against numpy below
    # (bench/knn.py found cached HNSW plans serving exact=true before app.banks was changed).
    exact = alternating(True, args.exact_repeats)
    exact_found = np.asarray(found[True], dtype=np.int64)
    hnsw = alternating(False, args.service_repeats)
    queries_unit = normalised(queries)
    hits = 0  # a returned key within TIE_TOLERANCE of the k-th similarity counts (bench/knn.py's recall)
    for row, (got, want) in enumerate(zip(found[False], truth)):
        kth = float(keys_unit[want[-1]] @ queries_unit[row])
        hits += int((keys_unit[np.asarray(got, dtype=np.int64)] @ queries_unit[row] >= kth - TIE_TOLERANCE).sum())
    figures = ServiceFigures(
        n_keys,
        copy_s,
        index_s,
        exact["service"],
        hnsw["service"],
        {n: exact[f"cache {n}"] for n in args.threads},
        {n: hnsw[f"cache {n}"] for n in args.threads},
        compare_top_k(exact_found, truth, keys_unit, queries),
        hits / truth.size,
    )
    _expect(service.client.delete(f"/v1/memory-banks/{bank['id']}"), 204)
    print(
        f"   exact=true best {figures.exact.best * 1e3:.0f} ms, HNSW ef={EF_SEARCH} best {figures.hnsw.best * 1e3:.0f} ms "
        f"(recall@{args.k} {figures.hnsw_recall:.3f}); cache beside them "
        f"{', '.join(f'{t.best * 1e3:.2f} ms ({n} threads)' for n, t in figures.cache_beside_hnsw.items())}",
        flush=True,
    )
    return figures


# ---------------------------------------------------------------- the benchmark


@dataclass
class Figures:
    args: argparse.Namespace
    device: torch.device
    device_name: str
    blas: str  # the BLAS libraries threadpoolctl sees
    threads_read_back: list[int] = field(default_factory=list)  # torch.get_num_threads() after each setting
    buckets: BucketFigures | None = None
    top_k: list[TopKFigures] = field(default_factory=list)
    write_profile: list[str] = field(default_factory=list)
    write_profile_keys: int = 0
    service: list[ServiceFigures] = field(default_factory=list)
    postgres: str = ""
    pgvector: str = ""
    total_s: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False in this session")
    return torch.device(name)


def run_benchmark(args: argparse.Namespace) -> Figures:
    began = time.perf_counter()
    device = pick_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    blas = threadpool_limits(limits=max(args.threads), user_api="blas")  # restored at the end
    shown = ", ".join(sorted({info["internal_api"] for info in threadpool_info() if info["user_api"] == "blas"}))
    figures = Figures(args, device, device_name, shown, load_before=load_average())
    print(
        f"device {device} ({device_name}); torch.cuda.is_available() = {torch.cuda.is_available()}; "
        f"thread counts {args.threads} (torch.set_num_threads and threadpoolctl for {shown})",
        flush=True,
    )
    for n in args.threads:
        set_threads(n)
        figures.threads_read_back.append(torch.get_num_threads())
    try:
        figures.buckets = measure_buckets(args, device)
        loaded = memory_keys(max(args.n), args.batch, args.dim)
        figures.write_profile_keys = min(args.n)
        figures.write_profile = write_profile(loaded[0], loaded[1], device, figures.write_profile_keys)
        caches: dict[int, MemoryCache] = {}
        for n_keys in args.n:
            top_k, caches[n_keys] = measure_top_k(n_keys, loaded, args, device)
            figures.top_k.extend(top_k)
        if not args.no_service:
            measure_all_services(figures, caches, loaded, args, device)
    finally:
        blas.restore_original_limits()
    figures.total_s = time.perf_counter() - began
    figures.load_after = load_average()
    return figures


def measure_all_services(
    figures: Figures, caches: dict[int, MemoryCache], loaded: tuple, args: argparse.Namespace, device: torch.device
) -> None:
    service = None
    with fresh_database("caches") as database:
        figures.postgres, figures.pgvector = database.postgres, database.pgvector
        try:
            service = start_service(
                database.url, Settings(database_url=database.url, data_dir=database.workdir, no_auth=False)
            )
            for n_keys in args.n:
                figures.service.append(
                    measure_service(service, database.url, caches[n_keys], loaded, n_keys, args, device)
                )
        finally:
            if service is not None:
                service.stop()


# ---------------------------------------------------------------- reporting


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def report(figures: Figures, machine: dict[str, str]) -> str:
    args = figures.args
    cuda = torch.cuda.is_available()
    lines = [
        f"- Date: {machine['date']}",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} memory; {machine['software']}",
        f"- Command: `{machine['command']}` (wall {figures.total_s:.0f} s, including set-up and checks; "
        f"{load_words(figures.load_before, figures.load_after)})",
        f"- Device: {figures.device} ({figures.device_name}); `torch.cuda.is_available()` = {cuda}. Thread counts "
        f"timed: {', '.join(map(str, args.threads))}, each set by `torch.set_num_threads` (`torch.get_num_threads()` "
        f"read back: {', '.join(str(n) for n in figures.threads_read_back)}) and, for numpy, threadpoolctl on "
        f"{figures.blas}.",
    ]
    if not cuda:
        lines.append(
            "- GPU: none in this session, so every figure below is CPU; the GPU figures are pending a session with a "
            "lent GPU. The same command picks `cuda` when torch sees one (or `--device cuda`) and runs the same "
            "measurements there (numpy and the service stay on the host)."
        )
    lines += [
        "- Timings: best and median of the repeats after a warm-up call. Figures that are compared were timed in "
        "alternation, round by round, so that they met the same load.",
        "",
    ]
    b = figures.buckets
    if b is not None:
        fastest = b.bucketize[b.fastest]
        search_s = b.extrapolated(b.seed_search, "best")
        loop_s = b.extrapolated(b.seed_loop, "best")
        speedup = search_s / fastest.best
        lines += [
            f"### QuantileCache.bucketize against the seed's bucket search ({b.rows:,} x {b.units} float32, Q={b.n_quantiles})",
            "",
            f"Target: bucketize at least {SPEEDUP_TARGET:,.0f}x faster than the seed's search: "
            f"{_met(speedup >= SPEEDUP_TARGET)}. It is {speedup:,.0f}x faster than the search alone and "
            f"{loop_s / fastest.best:,.0f}x faster than the seed's forward loop as written (best bucketize, "
            f"{b.fastest} thread{'s' if b.fastest > 1 else ''}).",
            "",
            "- The matrix is bench/quantiles.py's activation mixture (seed 1), in which half the units are post-ReLU. "
            f"The boundaries are `local_boundaries(values, {b.n_quantiles})`, on the device.",
            "- The seed's search is EideticLinearLayer.binarySearchQuantiles, with its recursive helper "
            "`__bsqHelper`. The script re-implements it with the same recursion and gives it the same boundaries, "
            "held as the seed held them: a list per unit of numpy float64 scalars.",
            f"- The seed is timed on {b.sample_values:,} values ({b.sample_values // b.units} random rows x "
            f"{b.units} units, seed 2), then extrapolated to all {b.values:,}. It runs in Python on one thread.",
            "",
            "| method | threads | best | median | per value (best) | bucketize's speed-up (best; median) |",
            "|---|---|---|---|---|---|",
        ]
        variants = [
            ("QuantileCache.bucketize (the default: compiled kernel, int64)", b.bucketize),
            ("the same with `out_int32=True`", b.bucketize_int32),
            ("`QuantileCache(compiled=False)`: the eager kernel (one `>` pass per boundary)", b.eager),
        ]
        for label, timings in variants:
            for n, timing in timings.items():
                lines.append(
                    f"| {label}, all {b.values:,} values in one call | {n} | {_ms(timing.best)} | "
                    f"{_ms(timing.median)} | {timing.best / b.values * 1e9:.1f} ns | "
                    f"{search_s / timing.best:,.0f}x; {b.extrapolated(b.seed_search, 'median') / timing.median:,.0f}x |"
                )
        lines += [
            f"| seed: the search alone (values already Python floats), extrapolated | 1 | {search_s:.2f} s | "
            f"{b.extrapolated(b.seed_search, 'median'):.2f} s | {b.seed_search.best / b.sample_values * 1e6:.2f} us | "
            f"{speedup:,.0f}x; {b.extrapolated(b.seed_search, 'median') / fastest.median:,.0f}x |",
            f"| seed: its forward loop as written (`.item()` per value, each bucket stored into a tensor element), "
            f"extrapolated | 1 | {loop_s:.2f} s | {b.extrapolated(b.seed_loop, 'median'):.2f} s | "
            f"{b.seed_loop.best / b.sample_values * 1e6:.2f} us | {loop_s / fastest.best:,.0f}x; "
            f"{b.extrapolated(b.seed_loop, 'median') / fastest.median:,.0f}x |",
        ]
        lines += [
            "",
            f"- The speed-up column is against the seed's search alone. The default's first call, which compiles "
            f"the kernel (torch.compile, or loads it from inductor's disk cache), took {b.first_call_s:.2f} s; "
            "later calls of any batch size reuse it (dynamic shapes).",
            "",
            "Checks:",
            "",
            f"- On all {b.values:,} values, bucketize gives the number of the unit's boundaries strictly below the "
            f"value, and the compiled, int32 and eager kernels agree: {_met(b.strictly_below_everywhere)}.",
            f"- On the sample, the seed agrees with bucketize on {b.agree_untied[0]:,} of the {b.agree_untied[1]:,} "
            "values that equal no repeated boundary. A value equal to a single, unrepeated boundary gets the same "
            "bucket from both.",
            f"- The two differ on ties. {b.units_with_tied_boundaries} of the {b.units} units have repeated "
            "boundaries (the exact zeros of the post-ReLU units). On a value equal to a repeated boundary, the seed "
            "gives the index of the last equal boundary, (number of boundaries <= v) - 1. DESIGN.md section 4, and "
            f"bucketize, count the boundaries strictly below. The seed follows its rule on "
            f"{b.tied_last_index[0]:,} of the {b.tied_last_index[1]:,} such values in the sample, and the two "
            f"disagree on {b.tied_disagree:,} of them.",
            "- The seed also took its boundaries at other positions: every int(rows / Q)-th of rows + 1 stored "
            "values. Here both get the same boundaries, so only the search is compared.",
            "",
            "Where bucketize's time goes (torch.profiler, 5 calls):",
            "",
        ]
        for n, rows in b.profile.items():
            lines += [f"- {n} thread{'s' if n > 1 else ''}: " + "; ".join(rows)]
        lines.append("")
    if figures.top_k:
        lines += [
            f"### MemoryCache top-{args.k} against numpy (batch of {args.batch} queries, dim {args.dim}, cosine)",
            "",
            f'- The cache: `MemoryCache(BankSpec(dim={args.dim}, capacity=N, metric="cosine", policy="none"))` on '
            f"{figures.device}, filled by `.write(keys, labels)` in chunks of {args.write_chunk:,}.",
            "- The data: bench/knn.py's Gaussian set (seed 1): keys, labels 0..9 and queries.",
            "- numpy holds the normalised float32 keys in memory. Per batch it normalises the queries, then runs one "
            "matmul, argpartition, and a sort of the k (bench/knn.py's brute force).",
            f"- Target: time_cache <= {NUMPY_RATIO_TARGET}x time_numpy, that is at least 0.8x numpy's speed.",
            "",
            f"| N | threads | MemoryCache.search best | median | numpy best | median | cache / numpy (best; median) | "
            f"target met | identical top-{args.k} (ordered; as sets; within {TIE_TOLERANCE:g}) | fill by write() |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in figures.top_k:
            c = t.check
            lines.append(
                f"| {t.n_keys:,} | {t.threads} | {_ms(t.cache.best)} | {_ms(t.cache.median)} | {_ms(t.numpy.best)} | "
                f"{_ms(t.numpy.median)} | {t.ratio:.2f}x; {t.ratio_median:.2f}x | {_met(t.ratio <= NUMPY_RATIO_TARGET)} | "
                f"{c.identical}/{c.queries}; {c.same_set}/{c.queries}; {c.within_tolerance}/{c.queries} | "
                f"{t.fill_s:.1f} s ({t.n_keys / t.fill_s:,.0f} keys/s) |"
            )
        for t in figures.top_k:
            lines += [
                "",
                f"Where the time goes, N={t.n_keys:,}, {t.threads} thread{'s' if t.threads > 1 else ''} (each step alone, "
                "on the cache's own tensors):",
                "",
                "| MemoryCache.search step | best | median | | numpy step | best | median |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in range(max(len(t.parts), len(t.numpy_parts))):
                ours = t.parts[row] if row < len(t.parts) else None
                theirs = t.numpy_parts[row] if row < len(t.numpy_parts) else None
                left = f"{ours.name} | {_ms(ours.timing.best)} | {_ms(ours.timing.median)}" if ours else " | | "
                right = (
                    f"{theirs.name} | {_ms(theirs.timing.best)} | {_ms(theirs.timing.median)}" if theirs else " | | "
                )
                lines.append(f"| {left} | | {right} |")
            lines += [
                "",
                "torch.profiler, 5 calls of MemoryCache.search, ops by self time: " + "; ".join(t.torch_ops) + ".",
                "",
                "cProfile, 5 calls (top functions by own time: ncalls, tottime, percall, cumtime, percall):",
                "",
                "```",
                *t.python_profile,
                "```",
            ]
        lines += [
            "",
            f"Filling by write(): cProfile of one write() of {figures.write_profile_keys:,} keys into an empty cache "
            "(top functions by own time):",
            "",
            "```",
            *figures.write_profile,
            "```",
            "",
        ]
    if figures.service:
        lines += [
            f"### MemoryCache against one service search round trip (the same batch of {args.batch}, k={args.k})",
            "",
            f"- The database: a fresh embedded {figures.postgres} with pgvector {figures.pgvector}. The service runs "
            "over HTTP on loopback (uvicorn in this process, default Settings).",
            "- The bank has policy none and metric cosine, and holds the same keys. They were loaded by binary COPY, "
            "then the bank's HNSW index (m=16, ef_construction=64) was re-created from its own definition, as "
            "bench/knn.py loads.",
            "- One round trip is a POST search, with the batch's JSON body encoded beforehand, and the answer parsed. "
            "The service also records each query's nearest hit.",
            f"- Each request alternates with MemoryCache.search of the same batch at each thread count. The figures "
            f"are best / median of {args.exact_repeats} rounds (exact) and {args.service_repeats} rounds (HNSW), after "
            "a warm-up.",
            "",
            f"| N | bulk load (COPY + CREATE INDEX) | service exact=true | service HNSW ef_search={EF_SEARCH} | "
            f"recall@{args.k} of HNSW | exact=true identical to numpy (ordered; within {TIE_TOLERANCE:g}) | "
            "MemoryCache.search beside them (HNSW rounds) | cache speed-up over the service, best (exact; HNSW) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in figures.service:
            c = s.exact_check
            beside = "<br>".join(f"{n} thr: {_ms(t.best)} / {_ms(t.median)}" for n, t in s.cache_beside_hnsw.items())
            speedups = "<br>".join(
                f"{n} thr: {s.exact.best / s.cache_beside_exact[n].best:,.0f}x; {s.hnsw.best / s.cache_beside_hnsw[n].best:,.0f}x"
                for n in s.cache_beside_hnsw
            )
            lines.append(
                f"| {s.n_keys:,} | {s.copy_s:.1f} s + {s.index_s:.1f} s | {_ms(s.exact.best)} / {_ms(s.exact.median)} | "
                f"{_ms(s.hnsw.best)} / {_ms(s.hnsw.median)} | {s.hnsw_recall:.3f} | {c.identical}/{c.queries}; "
                f"{c.within_tolerance}/{c.queries} | {beside} | {speedups} |"
            )
        lines.append("")
    return "\n".join(lines)


def machine_description(command: str) -> dict[str, str]:
    blas = {info["user_api"] + ":" + info["internal_api"]: info.get("version") for info in threadpool_info()}
    torch_blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    numpy_blas = next((f"{api.split(':')[1]} {v}" for api, v in blas.items() if api.startswith("blas:openblas")), "?")
    software = (
        f"Python {platform.python_version()}, torch {torch.__version__} (matmul on CPU: {torch_blas}), "
        f"numpy {np.__version__} ({numpy_blas})"
    )
    return machine_facts(command, software)


# Options of a smoke run: a small matrix and small banks, few repeats, one thread.
TINY = shlex.split(
    "--device cpu --threads 1 --rows 2000 --units 4 --sample-values 200 --bucket-repeats 2 --seed-repeats 1 --n 500 --dim 16 --batch 16 --write-chunk 250 --topk-repeats 2 --service-repeats 1 --exact-repeats 1"
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the caches live (auto: cuda when torch.cuda.is_available())",
    )
    parser.add_argument(
        "--threads",
        type=lambda s: [int(v) for v in s.split(",")],
        default=sorted({1, os.cpu_count() or 1}),
        help="thread counts to time at (torch.set_num_threads and numpy's BLAS alike), e.g. 1,2",
    )
    parser.add_argument("--rows", type=int, default=60_000, help="rows of the activation matrix")
    parser.add_argument("--units", type=int, default=36, help="units of the activation matrix")
    parser.add_argument("--n-quantiles", type=int, default=10, help="Q")
    parser.add_argument("--sample-values", type=int, default=20_000, help="values the seed's search is timed on")
    parser.add_argument("--bucket-repeats", type=int, default=20, help="timed bucketize calls")
    parser.add_argument("--seed-repeats", type=int, default=3, help="timed passes of the seed over the sample")
    parser.add_argument(
        "--n", type=lambda s: [int(v) for v in s.split(",")], default=[10_000, 100_000], help="bank sizes"
    )
    parser.add_argument("--dim", type=int, default=128, help="key dimension")
    parser.add_argument("--batch", type=int, default=128, help="queries per batch")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query")
    parser.add_argument("--write-chunk", type=int, default=10_000, help="keys per MemoryCache.write call")
    parser.add_argument("--topk-repeats", type=int, default=30, help="timed rounds at N <= 20,000 (a third above)")
    parser.add_argument("--service-repeats", type=int, default=5, help="timed HNSW request rounds")
    parser.add_argument("--exact-repeats", type=int, default=2, help="timed exact=true request rounds")
    parser.add_argument("--no-service", action="store_true", help="leave out the service round trips")
    return parser


def run(args: argparse.Namespace, command: str) -> Outcome:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the server and removes its data
    machine = machine_description(command)
    figures = run_benchmark(args)
    return Outcome(report(figures, machine), plain(figures, skip=("args",)), machine)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["caches", *sys.argv[1:]]))
