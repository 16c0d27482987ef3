"""Several API processes over one database: the service keeps no state of its own.

Two `eidetic serve` processes (children of the test, each with its own connection pool)
take concurrent writers and readers at once. What must hold is what holds for one process:
a batch id raced across the processes is stored once; a batch is all or nothing; a read
sees every batch acknowledged before it began, each row once, and never loses one a
previous read saw; a bank's capacity and its versions hold under writers in both
processes. tests/test_citus.py runs the same test on the Citus cluster.
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from eidetic.client import EideticClient
from tests.fault_kit import ApiChild
from tests.helpers import (
    activations_path,
    assert_versions_rise_per_writer,
    make_layer,
    post_arrow,
    random_rows,
    run_concurrently,
    stored_rows,
)

WINDOW_ROWS = "256"  # streams of several record batches
RACE_TRIALS, RACE_ROWS = 3, 2000
WRITERS_PER_PROCESS, BATCHES_PER_WRITER, BATCH_ROWS = 2, 6, 200
BANK_WRITES, BANK_ITEMS_PER_WRITE, BANK_CAPACITY = 8, 12, 50


@contextmanager
def api_processes(database_url: str, count: int = 2) -> Iterator[list[ApiChild]]:
    """`count` API processes over the database, each on its own port with a write key of project 'faults'."""
    with tempfile.TemporaryDirectory(prefix="eidetic-processes-") as work, ExitStack() as stack:
        children = []
        for index in range(count):
            workdir = Path(work) / f"api{index}"
            workdir.mkdir()
            child = ApiChild(workdir, database_url, {"stream_window_rows": WINDOW_ROWS})
            stack.callback(child.stop)
            children.append(child)
        for child in children:
            child.start()
        yield children


def batches_in(table) -> Counter:
    """Rows per batch id in an Arrow read; fails on a row seen twice."""
    keys = list(zip(table.column("batch_id").to_pylist(), table.column("row").to_pylist()))
    assert len(keys) == len(set(keys)), "a read returned a row twice"
    return Counter(batch for batch, _ in keys)


def run_and_layer(child: ApiChild, name: str) -> tuple[int, int]:
    with child.client() as client:
        return make_layer(client, dim=8, run=name)


def race_one_batch_across(children: list[ApiChild], database_url: str, name: str) -> None:
    """The same batch sent at once by 4 clients, spread over the processes: stored once, acknowledged 4 times."""
    for trial in range(RACE_TRIALS):
        run_id, layer_id = run_and_layer(children[0], f"{name}-race-{trial}")
        answers = send_at_once([children[i % len(children)] for i in range(4)], run_id, layer_id, trial)
        assert sorted(answers) == [200, 200, 200, 201], (trial, answers)
        assert stored_rows(database_url, layer_id) == RACE_ROWS


def send_at_once(senders: list[ApiChild], run_id: int, layer_id: int, seed: int) -> list[int]:
    """One batch (batch id 'shared') posted by one client per sender, released together; their statuses."""
    rows = random_rows(RACE_ROWS, 8, seed=seed)
    start = threading.Barrier(len(senders))
    answers: list[int] = []

    def send(child: ApiChild) -> None:
        with child.client() as client:
            start.wait()
            answers.append(post_arrow(client, run_id, layer_id, rows, batch_id="shared").status_code)

    threads = [threading.Thread(target=send, args=(child,)) for child in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def write_and_read_across(children: list[ApiChild], name: str) -> None:
    """Writers in every process (each batch retried once through another), a reader alternating between them."""
    run_id, layer_id = run_and_layer(children[0], f"{name}-rw")
    acknowledged: set[str] = set()
    failures: list[str] = []
    writing = threading.Event()
    writing.set()

    def writer(process: int, index: int) -> None:
        mine, other = children[process], children[(process + 1) % len(children)]
        with mine.client() as client, other.client() as retry:
            for i in range(BATCHES_PER_WRITER):
                batch_id = f"p{process}w{index}-{i}"
                rows = random_rows(BATCH_ROWS, 8, seed=1000 * process + 100 * index + i, task=batch_id)
                first = post_arrow(client, run_id, layer_id, rows, batch_id=batch_id)
                again = post_arrow(retry, run_id, layer_id, rows, batch_id=batch_id)
                if (first.status_code, again.status_code) != (201, 200):
                    failures.append(f"{batch_id}: {first.status_code} {again.status_code} {again.text[:200]}")
                acknowledged.add(batch_id)

    reads: list[Counter] = []

    def reader() -> None:
        turn = 0
        while writing.is_set():
            child = children[turn % len(children)]
            before = set(acknowledged)
            try:
                table = EideticClient(child.base_url, child.key).read_activations(run_id, layer_id)
            except Exception as error:  # reported by the test's thread
                failures.append(f"a read through {child.base_url} failed: {error!r}")
                return
            seen = batches_in(table)
            if not before <= set(seen):
                failures.append(f"a read missed acknowledged batches {sorted(before - set(seen))}")
            if any(count != BATCH_ROWS for count in seen.values()):
                failures.append(f"a read saw part of a batch: {seen}")
            if reads and not set(reads[-1]) <= set(seen):
                failures.append("a later read lost batches an earlier one saw")
            reads.append(seen)
            turn += 1

    writers = [
        threading.Thread(target=writer, args=(process, index))
        for process in range(len(children))
        for index in range(WRITERS_PER_PROCESS)
    ]
    reading = threading.Thread(target=reader)
    reading.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    writing.clear()
    reading.join()
    assert failures == []
    assert len(reads) >= 2  # reads overlapped the writes
    expected = len(children) * WRITERS_PER_PROCESS * BATCHES_PER_WRITER
    assert len(acknowledged) == expected
    for child in children:  # every committed row once, through each process
        seen = batches_in(EideticClient(child.base_url, child.key).read_activations(run_id, layer_id))
        assert seen == Counter(dict.fromkeys(acknowledged, BATCH_ROWS))
        with child.client() as client:
            page = client.get(activations_path(run_id, layer_id), params={"limit": 5000}).json()
        assert len(page["rows"]) == expected * BATCH_ROWS and page["next_cursor"] is None


def bank_writes_across(children: list[ApiChild], name: str) -> None:
    """FIFO bank writers in every process: one version per write, capacity held, the same bank through each."""
    with children[0].client() as client:
        body = {"name": f"{name}-bank", "dim": 8, "capacity": BANK_CAPACITY, "policy": "fifo"}
        bank = client.post("/v1/memory-banks", json={**body, "metric": "cosine", "similarity_threshold": 0.999})
        assert bank.status_code == 201, bank.text
    bank_id = bank.json()["id"]
    writers = len(children) * 2
    answers: list[list[dict]] = [[] for _ in range(writers)]
    failures: list[str] = []

    def writer(index: int) -> None:
        rng = np.random.default_rng(index)
        with children[index % len(children)].client() as client:
            for _ in range(BANK_WRITES):
                items = [
                    {"key": key, "label": index} for key in rng.standard_normal((BANK_ITEMS_PER_WRITE, 8)).tolist()
                ]
                response = client.post(f"/v1/memory-banks/{bank_id}/items", json={"items": items})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    answers[index].append(response.json())

    run_concurrently(writer, writers)
    assert failures == []
    assert_versions_rise_per_writer(answers)
    writes = writers * BANK_WRITES
    assert sorted(answer["version"] for mine in answers for answer in mine) == list(range(1, writes + 1))
    assert sum(answer["inserted"] for mine in answers for answer in mine) == BANK_CAPACITY
    for child in children:
        with child.client() as client:
            current = client.get(f"/v1/memory-banks/{bank_id}").json()
        assert (current["size"], current["version"]) == (BANK_CAPACITY, writes)
        snapshot = EideticClient(child.base_url, child.key).snapshot_table(bank_id)
        assert snapshot.num_rows == BANK_CAPACITY and snapshot.schema.metadata[b"bank_version"] == str(writes).encode()


def test_two_service_processes_hold_every_invariant(database_url):
    name = f"procs-{uuid.uuid4().hex[:8]}"
    with api_processes(database_url, count=2) as children:
        race_one_batch_across(children, database_url, name)
        write_and_read_across(children, name)
        bank_writes_across(children, name)
