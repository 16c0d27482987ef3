"""Ingest: ActivationWriter (direct COPY and REST Arrow) against raw binary COPY, and its cost to a training loop.

One run on a fresh embedded PostgreSQL (a temporary data directory, removed at the end) and
one service process beside it (`python -m app.cli serve` over the same database, with an API
key: the deployment a training job meets). The same seeded activations (`--rows x --dim`
float32 with sample id, step, epoch, label and task, shaped like a trained fc layer's) go in:

(a) the anchor: one raw binary COPY from psycopg into a plain table with the activations
    table's columns (no ledger, no checks, no index). Two encoders are measured, the
    project's numpy encoder (app.copy_binary) and psycopg's `write_row` with `set_types`
    (pgvector's binary numpy dumper); the faster by median is the anchor.
(b) ActivationWriter with the direct transport (store_batch on a psycopg connection).
(c) ActivationWriter over REST (Arrow IPC) to the service process.

(b) and (c) write into fresh layers with sketch=false (the raw store path) and sketch=true
(each batch put on the sketch ledger; the service's background sketcher folds it into the
KLL sketches later). The cases are interleaved, each repeat in a rotated order, each into a
fresh table or layer after a CHECKPOINT; best and median are reported. Targets: (b) >= 0.9 x
(a), (c) >= 0.5 x (a). For sketch=true the lag is measured too: the rows not yet in the
sketches when close() returns, and how long after close() the sketches hold every row (the
next case starts only then, so no case pays for an earlier one's sketching).

Then a small CNN (28x28 inputs, batch 64) trains on CPU with the writer off and on (its
fc layer's 128-d activations of every batch streamed by the direct or REST writer),
interleaved; the slowdown of the loop (stored rows included) has the target <= 5%.

Usage: .venv/bin/python -m bench ingest [--rows 600000 --dim 128 --batch-rows 32768 --in-flight 2 --repeats 3 --train-threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import psycopg
from psycopg import sql

from app import keys
from app.copy_binary import COPY_COLUMNS, iter_copy_chunks
from app.database import connect
from app.settings import Settings
from bench.common import BenchDatabase, Repeats, fresh_database, machine_facts
from bench.record import Outcome, plain
from eidetic.config import ClientSettings
from eidetic.wire.rows import ActivationRows, NullableColumn, slice_rows
from eidetic.writer import ActivationWriter, WriterStats, open_writer

DIRECT_TARGET = 0.9  # the direct writer at least 0.9x raw binary COPY
REST_TARGET = 0.5  # the REST writer at least 0.5x raw binary COPY
SLOWDOWN_TARGET = 0.05  # training with the writer on at most 5% slower
EPOCH_SAMPLES = 60_000  # the stream looks like epochs over an MNIST-sized training set
TRAIN_BATCH = 64
MB = 1e6

# COPY column types for psycopg's write_row: run, layer, batch_seq, row_no, the metadata, task, values.
_WRITE_ROW_TYPES = ["int8", "int8", "int8", "int4", "int8", "int8", "int4", "int4", "text", "vector"]


# ---------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Stream:
    """The activations every case stores: values and per-row metadata, tasks A then B."""

    values: np.ndarray
    sample_id: np.ndarray
    step: np.ndarray
    epoch: np.ndarray
    label: np.ndarray
    task_b_from: int  # rows before this one are task "A", the rest task "B"

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def payload_mb(self) -> float:
        """Megabytes of activation values (rows x dim x 4): what MB/s counts, whatever the wire format."""
        return self.values.nbytes / MB

    def task_of(self, row: int) -> str:
        return "A" if row < self.task_b_from else "B"


def make_stream(n_rows: int, dim: int, write_rows: int, seed: int = 0) -> Stream:
    """Like an fc layer after ReLU: per-unit shifts and scales, most units with exact zeros; epochs of shuffled ids."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((n_rows, dim), dtype=np.float32)
    values *= rng.uniform(0.25, 2.0, dim).astype(np.float32)
    values += rng.uniform(-1.0, 1.0, dim).astype(np.float32)
    post_relu = rng.random(dim) < 0.75
    values[:, post_relu] = np.maximum(values[:, post_relu], 0.0)
    rows = np.arange(n_rows, dtype=np.int64)
    epoch = (rows // EPOCH_SAMPLES).astype(np.int32)
    dataset_labels = rng.integers(0, 10, EPOCH_SAMPLES).astype(np.int32)
    sample_id = np.concatenate([rng.permutation(EPOCH_SAMPLES) for _ in range(int(epoch[-1]) + 1)])[:n_rows].astype(
        np.int64
    )
    half = (n_rows // 2 // write_rows) * write_rows  # a whole number of writes per task
    return Stream(values, sample_id, rows // TRAIN_BATCH, epoch, dataset_labels[sample_id], half)


def stream_rows(stream: Stream) -> ActivationRows:
    """The whole stream as one columnar batch (numpy arrays, no per-row Python)."""
    codes = (np.arange(stream.n_rows) >= stream.task_b_from).astype(np.int32)
    return ActivationRows(
        values=stream.values,
        sample_id=NullableColumn(stream.sample_id),
        step=NullableColumn(stream.step),
        epoch=NullableColumn(stream.epoch),
        label=NullableColumn(stream.label),
        task_codes=codes,
        task_names=("A", "B"),
    )


# ---------------------------------------------------------------- the store and the service


@dataclass
class Store:
    """The embedded database, the service process over it, and an HTTP client with a write key."""

    database_url: str
    base_url: str
    api_key: str
    api: httpx.Client
    admin: psycopg.Connection
    postgres: str
    service: subprocess.Popen
    service_log: Path

    def new_layer(self, name: str, dim: int, sketch: bool) -> tuple[int, int]:
        """A fresh run with one layer: every measurement writes into its own partition."""
        response = self.api.post("/v1/runs", json={"name": name, "config": {"bench": "ingest"}})
        _expect(response, 201)
        run_id = response.json()["id"]
        response = self.api.post(f"/v1/runs/{run_id}/layers", json={"name": "fc", "dim": dim, "sketch": sketch})
        _expect(response, 201)
        return run_id, response.json()["id"]

    def drop_run(self, run_id: int) -> None:
        _expect(self.api.delete(f"/v1/runs/{run_id}"), 204)

    def stored(self, run_id: int, layer_id: int) -> tuple[int, int]:
        """Rows in the layer's partition, and rows its sketches describe (0 without sketches)."""
        partition = sql.Identifier(f"activations_r{int(run_id)}_l{int(layer_id)}")
        rows = self.admin.execute(sql.SQL("SELECT count(*) FROM {}").format(partition)).fetchone()[0]
        sketched = self.admin.execute(
            "SELECT coalesce(sum(n), 0) FROM layer_sketches WHERE layer_id = %s", (layer_id,)
        ).fetchone()[0]
        return int(rows), int(sketched)

    def pending(self, run_id: int, layer_id: int) -> int:
        """Rows of the layer on the sketch ledger: committed, not yet in the sketches."""
        return int(
            self.admin.execute(
                "SELECT coalesce(sum(row_count), 0) FROM sketch_backlog WHERE run_id = %s AND layer_id = %s",
                (run_id, layer_id),
            ).fetchone()[0]
        )

    def caught_up_after(self, run_id: int, layer_id: int, timeout: float = 600) -> float:
        """Seconds until the service's sketcher has folded every batch of the layer (polled every 10 ms)."""
        started = time.perf_counter()
        while self.pending(run_id, layer_id):
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"the sketches of layer {layer_id} did not catch up in {timeout:g} s")
            time.sleep(0.01)
        return time.perf_counter() - started

    def settle(self) -> None:
        """Every timed case starts from a clean checkpoint, so none pays for an earlier one's dirty pages."""
        self.admin.execute("CHECKPOINT")

    def client_settings(self) -> ClientSettings:
        return ClientSettings(eidetic_url=self.base_url, eidetic_api_key=self.api_key, database_url=self.database_url)


def start_store(database: BenchDatabase) -> Store:
    """The service as a process of its own (`python -m app.cli serve`) over the benchmark's database."""
    database_url, postgres, workdir = database.url, database.postgres, database.workdir
    admin = psycopg.connect(database_url, autocommit=True)
    api_key = keys.create_key(admin, "bench", "write")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service_log = workdir / "service.log"
    env = {**os.environ, "DATABASE_URL": database_url, "EIDETIC_HOST": "127.0.0.1", "EIDETIC_NO_AUTH": "false"}
    with service_log.open("w") as log_file:
        service = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=600)
    store = Store(database_url, base_url, api_key, api, admin, postgres, service, service_log)
    deadline = time.monotonic() + 60
    while True:
        try:
            if api.get("/readyz").status_code == 200:
                return store
        except httpx.TransportError:
            pass
        if service.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start; its log:\n{service_log.read_text()[-4000:]}")
        time.sleep(0.1)


def stop_store(store: Store) -> None:
    store.api.close()
    store.service.terminate()
    try:
        store.service.wait(timeout=20)
    except subprocess.TimeoutExpired:
        store.service.kill()
        store.service.wait()
    store.admin.close()


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:500]}"
        )


# ---------------------------------------------------------------- the cases


@dataclass
class Timing(Repeats):
    """The seconds of every repeat of one case."""

    name: str
    label: str
    seconds: list[float] = field(default_factory=list)
    retries: int = 0
    pending_rows: list[int] = field(default_factory=list)  # sketch=true: rows not in the sketches at close()
    catch_up_s: list[float] = field(default_factory=list)  # sketch=true: seconds after close() until they were


def anchor_copy(store: Store, stream: Stream, table: str, encoder: str, batch_rows: int = 0) -> float:
    """Raw binary COPY of the whole stream into a plain table, in one statement; seconds.

    With `batch_rows` (numpy encoder), one COPY and one commit per that many rows instead:
    the durability a writer pays per batch, without its ledger or checks.
    """
    columns = sql.SQL(", ").join(map(sql.Identifier, COPY_COLUMNS))
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(sql.Identifier(table), columns)
    with connect(store.database_url, Settings(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE activations)").format(sql.Identifier(table)))
        store.settle()
        started = time.perf_counter()
        if encoder == "write_row":
            _copy_write_rows(conn, statement, stream)
        else:
            rows = stream_rows(stream)
            step = batch_rows or stream.n_rows
            for seq, start in enumerate(range(0, stream.n_rows, step)):
                with conn.cursor().copy(statement) as copy:  # autocommit: each COPY commits on its own
                    for chunk in iter_copy_chunks(slice_rows(rows, start, start + step), 1, 1, seq):
                        copy.write(chunk)
        seconds = time.perf_counter() - started
        stored = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0]
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
    if stored != stream.n_rows:
        raise RuntimeError(f"the anchor stored {stored} rows, not {stream.n_rows}")
    return seconds


def _copy_write_rows(conn: psycopg.Connection, statement: sql.Composed, stream: Stream) -> None:
    """psycopg's own binary COPY encoder, one write_row per row (pgvector dumps the numpy vector)."""
    sample_id, step = stream.sample_id.tolist(), stream.step.tolist()
    epoch, label = stream.epoch.tolist(), stream.label.tolist()
    with conn.cursor().copy(statement) as copy:
        copy.set_types(_WRITE_ROW_TYPES)
        for row in range(stream.n_rows):
            task = stream.task_of(row)
            copy.write_row((1, 1, 1, row, sample_id[row], step[row], epoch[row], label[row], task, stream.values[row]))


def feed_writer(writer: ActivationWriter, stream: Stream, write_rows: int) -> WriterStats:
    """Writes the stream as a training loop would (one write per `write_rows`), then closes: all stored."""
    with writer:
        for start in range(0, stream.n_rows, write_rows):
            stop = start + write_rows
            writer.write(
                stream.values[start:stop],
                sample_id=stream.sample_id[start:stop],
                step=stream.step[start:stop],
                epoch=stream.epoch[start:stop],
                label=stream.label[start:stop],
                task=stream.task_of(start),
            )
    return writer.stats()


@dataclass(frozen=True)
class CaseResult:
    seconds: float
    retries: int = 0
    pending_rows: int | None = None
    catch_up_s: float | None = None


def writer_case(
    store: Store, stream: Stream, transport: str, sketch: bool, args: argparse.Namespace, tag: str
) -> CaseResult:
    """The stream through ActivationWriter into a fresh layer; seconds, retries and (sketch=true) the lag."""
    run_id, layer_id = store.new_layer(f"ingest-{tag}", stream.dim, sketch)
    store.settle()
    started = time.perf_counter()
    writer = open_writer(
        run_id, layer_id, store.client_settings(), transport, batch_rows=args.batch_rows, in_flight=args.in_flight
    )
    stats = feed_writer(writer, stream, args.write_rows)
    seconds = time.perf_counter() - started
    pending = store.pending(run_id, layer_id) if sketch else None
    catch_up = store.caught_up_after(run_id, layer_id) if sketch else None
    rows, sketched = store.stored(run_id, layer_id)
    store.drop_run(run_id)
    if rows != stream.n_rows or stats.rows_sent != stream.n_rows or sketched != (stream.n_rows if sketch else 0):
        raise RuntimeError(f"{tag}: stored {rows} rows, sketched {sketched}, writer sent {stats.rows_sent}")
    return CaseResult(seconds, stats.retries, pending, catch_up)


def measure_ingest(store: Store, stream: Stream, args: argparse.Namespace) -> dict[str, Timing]:
    cases: dict[str, tuple[str, Callable[[str], CaseResult]]] = {
        "anchor_numpy": (
            "(a) raw binary COPY, numpy encoder",
            lambda tag: CaseResult(anchor_copy(store, stream, tag, "numpy")),
        ),
        "anchor_write_row": (
            "(a) raw binary COPY, psycopg write_row",
            lambda tag: CaseResult(anchor_copy(store, stream, tag, "write_row")),
        ),
        "raw_batched": (
            f"raw binary COPY, a commit per {args.batch_rows} rows",
            lambda tag: CaseResult(anchor_copy(store, stream, tag, "numpy", args.batch_rows)),
        ),
    }
    for transport, letter in (("direct", "b"), ("rest", "c")):
        for sketch in (False, True):
            cases[f"{transport}_sketch_{str(sketch).lower()}"] = (
                f"({letter}) writer, {transport}, sketch={str(sketch).lower()}",
                lambda tag, transport=transport, sketch=sketch: writer_case(
                    store, stream, transport, sketch, args, tag
                ),
            )
    timings = {name: Timing(name, label) for name, (label, _) in cases.items()}
    names = list(cases)
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotated: no case always goes first
        for name in order:
            result = cases[name][1](f"{name}_{repeat}")
            timing = timings[name]
            timing.seconds.append(result.seconds)
            timing.retries += result.retries
            lag = ""
            if result.pending_rows is not None and result.catch_up_s is not None:
                timing.pending_rows.append(result.pending_rows)
                timing.catch_up_s.append(result.catch_up_s)
                lag = f"  ({result.pending_rows:,} rows to sketch at close, caught up {result.catch_up_s:.2f} s later)"
            print(
                f"  repeat {repeat + 1}/{args.repeats}  {cases[name][0]:<42} {result.seconds:7.2f} s  "
                f"{stream.n_rows / result.seconds:10,.0f} rows/s{lag}",
                flush=True,
            )
    return timings


def sort_cpu_seconds(stream: Stream, batch_rows: int) -> float:
    """The floor of any sketch built from sorted columns: numpy's sort of every unit of every batch, alone."""
    started = time.perf_counter()
    for start in range(0, stream.n_rows, batch_rows):
        np.sort(np.ascontiguousarray(stream.values[start : start + batch_rows].T), axis=1)
    return time.perf_counter() - started


def sketch_cpu_seconds(stream: Stream, batch_rows: int, k: int) -> float:
    """What keeping sketches costs in CPU alone: the store's own per-batch sketching and merge, no database."""
    from app.sketches import sketch_columns

    sketches: dict[str, list] = {}
    started = time.perf_counter()
    for start in range(0, stream.n_rows, batch_rows):
        stop = min(start + batch_rows, stream.n_rows)
        for task, lo, hi in (("A", start, min(stop, stream.task_b_from)), ("B", max(start, stream.task_b_from), stop)):
            if hi > lo:
                batch = sketch_columns(stream.values[lo:hi], k)
                if task in sketches:
                    for sketch, batch_sketch in zip(sketches[task], batch):
                        sketch.merge(batch_sketch)
                else:
                    sketches[task] = batch
    return time.perf_counter() - started


# ---------------------------------------------------------------- the training loop


def measure_training(store: Store, args: argparse.Namespace) -> tuple[dict[str, Timing], float]:
    """Interleaved arms: the same seeded training with the writer off and on; also the step time."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    class SmallCNN(nn.Module):
        """conv 16, pool, conv 32, pool, fc 128 (streamed), dropout .25, fc 10, log-softmax: MNIST-shaped."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = nn.Linear(32 * 7 * 7, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = F.max_pool2d(F.relu(self.conv1(images)), 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2)
            features = F.relu(self.fc1(torch.flatten(x, 1)))
            return F.log_softmax(self.fc2(F.dropout(features, 0.25, self.training)), dim=1), features

    if args.train_threads:
        torch.set_num_threads(args.train_threads)
    digits = load_digits()  # bundled 8x8 digits, upscaled to MNIST's 28x28
    images = F.interpolate(
        torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1), size=(28, 28), mode="bilinear"
    )
    labels = torch.from_numpy(digits.target.astype(np.int64))

    def train(steps: int, writer: ActivationWriter | None) -> float:
        torch.manual_seed(0)
        model = SmallCNN()
        optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
        order = torch.Generator().manual_seed(0)
        permutation, position, epoch = torch.randperm(len(labels), generator=order), 0, 0
        started = time.perf_counter()
        with writer if writer is not None else contextlib.nullcontext():  # done when its rows are stored
            for step in range(steps):
                if position + TRAIN_BATCH > len(labels):
                    permutation, position, epoch = torch.randperm(len(labels), generator=order), 0, epoch + 1
                index = permutation[position : position + TRAIN_BATCH]
                position += TRAIN_BATCH
                log_probs, features = model(images[index])
                loss = F.nll_loss(log_probs, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if writer is not None:
                    writer.write(features, sample_id=index, step=step, epoch=epoch, label=labels[index], task="digits")
                loss.item()
        return time.perf_counter() - started

    arms = {
        "off": ("writer off", None, True),
        "direct": ("writer on, direct, sketch=true", "direct", True),
        "rest": ("writer on, REST, sketch=true", "rest", True),
        "direct_nosketch": ("writer on, direct, sketch=false", "direct", False),
    }
    timings = {name: Timing(name, label) for name, (label, _, _) in arms.items()}
    train(20, None)  # warm-up: the first steps allocate and pick kernels
    names = list(arms)
    for repeat in range(args.train_repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            _, transport, sketch = arms[name]
            writer, run_id, layer_id = None, None, None
            if transport is not None:
                run_id, layer_id = store.new_layer(f"train-{name}-{repeat}", 128, sketch)
                writer = open_writer(
                    run_id,
                    layer_id,
                    store.client_settings(),
                    transport,
                    batch_rows=args.batch_rows,
                    in_flight=args.in_flight,
                )
            seconds = train(args.train_steps, writer)
            timings[name].seconds.append(seconds)
            if writer is not None:
                timings[name].retries += writer.stats().retries
                rows, _ = store.stored(run_id, layer_id)
                store.drop_run(run_id)
                if rows != args.train_steps * TRAIN_BATCH:
                    raise RuntimeError(f"training arm {name}: {rows} rows stored, not {args.train_steps * TRAIN_BATCH}")
            print(
                f"  repeat {repeat + 1}/{args.train_repeats}  {arms[name][0]:<34} {seconds:6.2f} s  "
                f"({1000 * seconds / args.train_steps:.1f} ms/step)",
                flush=True,
            )
    return timings, torch.get_num_threads()


# ---------------------------------------------------------------- the report


@dataclass
class Figures:
    args: argparse.Namespace
    stream: Stream
    postgres: str = ""
    ingest: dict[str, Timing] = field(default_factory=dict)
    sketch_cpu_s: float = 0.0
    sort_cpu_s: float = 0.0
    training: dict[str, Timing] = field(default_factory=dict)
    torch_threads: int = 0
    load: list[tuple[str, float]] = field(default_factory=list)  # 1-minute load average at points of the run


def run_benchmark(args: argparse.Namespace) -> Figures:
    figures = Figures(args, make_stream(args.rows, args.dim, args.write_rows))
    with fresh_database("ingest") as database:
        store = None
        try:
            store = start_store(database)
            figures.postgres = store.postgres
            figures.load.append(("start", os.getloadavg()[0]))
            stream = figures.stream
            print(
                f"ingest: {stream.n_rows:,} x {stream.dim} float32 ({stream.payload_mb:.0f} MB of values), "
                f"writer batches of {args.batch_rows} rows ({args.in_flight} in flight), writes of {args.write_rows} rows",
                flush=True,
            )
            figures.ingest = measure_ingest(store, stream, args)
            figures.sketch_cpu_s = sketch_cpu_seconds(stream, args.batch_rows, Settings().sketch_k)
            figures.sort_cpu_s = sort_cpu_seconds(stream, args.batch_rows)
            print(
                f"  KLL sketches of the same rows alone (no database): {figures.sketch_cpu_s:.2f} s, "
                f"of which numpy's sort {figures.sort_cpu_s:.2f} s",
                flush=True,
            )
            figures.load.append(("after ingest", os.getloadavg()[0]))
            if args.train_repeats > 0:
                print(f"training: {args.train_steps} steps of batch {TRAIN_BATCH}, arms interleaved", flush=True)
                figures.training, figures.torch_threads = measure_training(store, args)
                figures.load.append(("after training", os.getloadavg()[0]))
        finally:
            if store is not None:
                stop_store(store)
    return figures


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def paired_median(reference: list[float], measured: list[float]) -> float:
    """Median over rounds of reference / measured, each pair timed in the same round."""
    return statistics.median(ref / seconds for ref, seconds in zip(reference, measured))


def anchor_of(ingest: dict[str, Timing]) -> Timing:
    return min((ingest["anchor_numpy"], ingest["anchor_write_row"]), key=lambda timing: timing.median)


def report(figures: Figures, machine: dict[str, str]) -> str:
    args, stream = figures.args, figures.stream
    anchor = anchor_of(figures.ingest)
    lines = [
        f"- date: {machine['date']}",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} memory; "
        f"client, service process and PostgreSQL share these cores",
        f"- software: {machine['software']}, {figures.postgres} (embedded, default settings: fsync on)",
        f"- command: `{machine['command']}`",
        "- load average (1 min) during the run: "
        + ", ".join(f"{value:.1f} {point}" for point, value in figures.load)
        + f" (on {machine['nproc']} CPUs; above that, other work shared the box and the medians carry its noise)",
        "",
        f"{stream.n_rows:,} rows x {stream.dim} float32 ({stream.payload_mb:.0f} MB of values; MB/s counts these bytes) "
        f"with sample id, step, epoch, label and task (A, then B). Writers send batches of {args.batch_rows} rows, "
        f"{args.in_flight} at a time, "
        f"fed by writes of {args.write_rows} rows; the timing runs from the first write until close() returns "
        f"(every row committed). Each case ran {args.repeats} times, interleaved in rotated order, each time into "
        "a fresh table or layer after a CHECKPOINT. x anchor: the anchor's median over the path's median "
        "(the verdict), best over best, and the median of the per-round ratios (each path against the anchor "
        "of the same round, which cancels slow swings in the box's load).",
        "",
        "| path | best s | median s | rows/s (median) | MB/s (median) | x anchor (median) | x anchor (best) "
        "| x anchor (paired) | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    targets = {"direct": DIRECT_TARGET, "rest": REST_TARGET}
    verdicts = []
    for name, timing in figures.ingest.items():
        ratio_median = anchor.median / timing.median
        ratio_best = anchor.best / timing.best
        ratio_paired = paired_median(anchor.seconds, timing.seconds)
        target = ""
        if name.startswith(("direct", "rest")):
            wanted = targets[name.split("_")[0]]
            target = f">= {wanted} x: {_met(ratio_median >= wanted)}"
            verdicts.append((timing.label, ratio_median, wanted))
        elif timing is anchor:
            target = "anchor"
        elif name == "raw_batched":
            target = "reference"
        lines.append(
            f"| {timing.label} | {timing.best:.2f} | {timing.median:.2f} | {stream.n_rows / timing.median:,.0f} | "
            f"{stream.payload_mb / timing.median:.1f} | {ratio_median:.2f} | {ratio_best:.2f} | {ratio_paired:.2f} "
            f"| {target} |"
        )
    other = figures.ingest["anchor_write_row" if anchor.name == "anchor_numpy" else "anchor_numpy"]
    lines += [
        "",
        f"Anchor: {anchor.label.split(', ', 1)[1]} (median {anchor.median:.2f} s; {other.label.split(', ', 1)[1]}: "
        f"{other.median:.2f} s). Writer retries in all repeats: "
        f"{sum(t.retries for t in figures.ingest.values())}.",
        f"KLL sketches of the same rows alone (app.sketches.sketch_columns: each unit sorted, then datasketches' "
        f"KLL, k={Settings().sketch_k}, merged batch by batch as the store does; batches of {args.batch_rows}, "
        f"one thread, no database): {figures.sketch_cpu_s:.2f} s, i.e. "
        f"{1e9 * figures.sketch_cpu_s / (stream.n_rows * stream.dim):.0f} ns per value; numpy's sort of each "
        f"unit of each batch alone (the floor of any sketch built from sorted columns): {figures.sort_cpu_s:.2f} s.",
        "",
        "Sketch lag (sketch=true): rows not yet in the sketches when close() returned, and seconds after close() "
        "until the service's background sketcher had folded every batch (median [min, max] over repeats):",
        "",
        *(
            f"- {timing.label}: {statistics.median(timing.pending_rows):,.0f} rows "
            f"[{min(timing.pending_rows):,}, {max(timing.pending_rows):,}] pending at close, caught up "
            f"{statistics.median(timing.catch_up_s):.2f} s [{min(timing.catch_up_s):.2f}, "
            f"{max(timing.catch_up_s):.2f}] later"
            for timing in figures.ingest.values()
            if timing.catch_up_s
        ),
        "",
        "Targets: "
        + "; ".join(
            f"{label}: {ratio:.2f} x ({_met(ratio >= wanted)}, >= {wanted})" for label, ratio, wanted in verdicts
        )
        + ".",
    ]
    if figures.training:
        off = figures.training["off"]
        lines += [
            "",
            f"Training loop: a small MNIST-shaped CNN (conv 16, conv 32, fc 128, fc 10) on bundled digits upscaled "
            f"to 28x28, batch {TRAIN_BATCH}, {args.train_steps} steps, CPU ({figures.torch_threads} torch thread{'' if figures.torch_threads == 1 else 's'}), "
            f"the fc layer's 128-d activations of every batch written with sample id, step, epoch, label, task; "
            f"{args.train_repeats} interleaved repeats per arm; a writer arm's time includes close() "
            "(its rows committed). Slowdown: the arm's median over the writer-off median (the verdict), best over "
            "best, and the median of the per-round slowdowns (against the writer-off run of the same round).",
            "",
            "| arm | best s | median s | ms/step (median) | slowdown (median) | slowdown (best) | slowdown (paired) "
            "| target |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, timing in figures.training.items():
            if name == "off":
                lines.append(
                    f"| {timing.label} | {timing.best:.2f} | {timing.median:.2f} | "
                    f"{1000 * timing.median / args.train_steps:.1f} | | | | |"
                )
                continue
            slow_median = timing.median / off.median - 1
            slow_best = timing.best / off.best - 1
            slow_paired = 1 / paired_median(off.seconds, timing.seconds) - 1
            lines.append(
                f"| {timing.label} | {timing.best:.2f} | {timing.median:.2f} | {1000 * timing.median / args.train_steps:.1f} | "
                f"{100 * slow_median:+.1f}% | {100 * slow_best:+.1f}% | {100 * slow_paired:+.1f}% "
                f"| <= {100 * SLOWDOWN_TARGET:.0f}%: "
                f"{_met(slow_median <= SLOWDOWN_TARGET)} |"
            )
    return "\n".join(lines) + "\n"


def machine_description(command: str) -> dict[str, str]:
    facts = machine_facts(
        command,
        software=f"Python {platform.python_version()}, numpy {np.__version__}, psycopg {psycopg.__version__} "
        f"({psycopg.pq.__impl__}), pyarrow {metadata.version('pyarrow')}, datasketches {metadata.version('datasketches')}",
    )
    return facts


# Options of a smoke run: a few thousand rows, one repeat, a few training steps.
TINY = shlex.split(
    "--rows 2048 --dim 8 --batch-rows 512 --write-rows 256 --repeats 1 --train-steps 3 --train-repeats 1"
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, default=600_000, help="rows of the stream (at least 600,000 for the record)"
    )
    parser.add_argument("--dim", type=int, default=128, help="values per row")
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=ClientSettings.model_fields["writer_batch_rows"].default,
        help="rows per batch the writers send (default: the writer's own default)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=ClientSettings.model_fields["writer_in_flight"].default,
        help="batches each writer keeps on their way at once (default: the writer's own default)",
    )
    parser.add_argument("--write-rows", type=int, default=256, help="rows per write() call into the writer")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every ingest case")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of each training arm")
    parser.add_argument("--train-repeats", type=int, default=5, help="repeats of every training arm (0: skip)")
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads of the training loop (0: torch's default); 1 leaves a core of this 2-core box to the "
        "writer and PostgreSQL",
    )
    return parser


def run(args: argparse.Namespace, command: str) -> Outcome:
    machine = machine_description(command)
    began = time.perf_counter()
    figures = run_benchmark(args)
    print(f"({time.perf_counter() - began:.0f} s in all)")
    measured = plain(figures, skip=("args", "stream"))
    measured["stream"] = {
        "rows": figures.stream.n_rows,
        "dim": figures.stream.dim,
        "task_b_from": figures.stream.task_b_from,
    }
    return Outcome(report(figures, machine), measured, machine)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["ingest", *sys.argv[1:]]))
