"""Sketches off the ingest path: answers state their lag, wait_for catches up, folds happen exactly once.

Ingest only puts a sketched layer's batch on the sketch ledger; a sketcher folds it into
the layer's KLL sketches later. The service here runs without its background sketcher,
so that the lag is there to see; the crash test runs the API as a child process with
its sketcher on and kills it in the middle of a fold.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import psycopg
import pytest

from app import quantiles, runs
from app.database import connect
from app.ingest import ingest
from app.keys import create_key, ensure_project
from app.query import ActivationFilter
from app.settings import Settings
from app.sketches import DEFAULT_K, backlog, fold_layer, merged_sketches
from eidetic.wire.formats import ARROW_STREAM
from eidetic.wire.rows import ActivationRows
from tests.conftest import start_service, stop_service
from tests.fault_kit import fault_bed, fill_layer, make_batch
from tests.helpers import error_of, make_layer, post_arrow, random_rows

LEVELS = np.arange(1, 10) / 10


@pytest.fixture
def settings() -> Settings:
    """The suite's service settings, without the background sketcher."""
    return Settings(database_url=None, no_auth=False, max_rows_per_batch=50_000, sketcher=False)


def worst_rank_error(matrix: np.ndarray, boundaries: np.ndarray) -> float:
    """How far the true rank interval of each boundary is from its level, at worst."""
    worst = 0.0
    for unit in range(matrix.shape[1]):
        column = np.sort(matrix[:, unit])
        below = np.searchsorted(column, boundaries[unit], side="left") / len(column)
        at_most = np.searchsorted(column, boundaries[unit], side="right") / len(column)
        worst = max(worst, float(np.maximum(0, np.maximum(below - LEVELS, LEVELS - at_most)).max()))
    return worst


def test_an_answer_states_the_rows_it_covers_and_its_lag(service, api):
    run_id, layer_id = make_layer(api, dim=4)
    base = f"/v1/runs/{run_id}/layers/{layer_id}/quantiles"
    first = random_rows(3000, 4, seed=1, task="A")
    assert post_arrow(api, run_id, layer_id, first).status_code == 201

    nothing_yet = api.post(base, json={"n_quantiles": 10, "method": "sketch"})
    assert nothing_yet.status_code == 503 and error_of(nothing_yet)["code"] == "sketches_behind"
    assert error_of(nothing_yet)["field"] == "wait_for" and "3000 rows" in error_of(nothing_yet)["message"]

    caught_up = api.post(base, json={"n_quantiles": 10, "method": "sketch", "wait_for": 10})
    assert caught_up.status_code == 201, caught_up.text
    body = caught_up.json()
    assert (body["rows"], body["pending_rows"], body["lag_s"]) == (3000, 0, 0.0)
    assert worst_rank_error(first.values, np.array(body["boundaries"])) <= body["rank_error"]

    second = random_rows(2000, 4, seed=2, task="B")
    assert post_arrow(api, run_id, layer_id, second).status_code == 201
    time.sleep(0.05)
    behind = api.post(base, json={"n_quantiles": 10, "method": "sketch"}).json()
    assert (behind["rows"], behind["pending_rows"]) == (3000, 2000) and behind["lag_s"] > 0
    assert api.get(f"/v1/quantile-sets/{behind['id']}").json()["pending_rows"] == 2000

    current = api.post(base, json={"n_quantiles": 10, "method": "sketch", "wait_for": 10}).json()
    assert (current["rows"], current["pending_rows"], current["lag_s"]) == (5000, 0, 0.0)
    both = np.concatenate([first.values, second.values])
    assert worst_rank_error(both, np.array(current["boundaries"])) <= current["rank_error"]
    only_b = api.post(base, json={"n_quantiles": 10, "method": "sketch", "task": "B", "wait_for": 1}).json()
    assert only_b["rows"] == 2000
    exact = api.post(base, json={"n_quantiles": 10}).json()
    assert exact["pending_rows"] is None and exact["lag_s"] is None


def test_wait_for_gives_up_with_a_clear_error_and_is_checked(service, api):
    run_id, layer_id = make_layer(api, dim=3)
    base = f"/v1/runs/{run_id}/layers/{layer_id}/quantiles"
    assert post_arrow(api, run_id, layer_id, random_rows(100, 3)).status_code == 201
    with psycopg.connect(service.database_url) as other:  # another sketcher holds the batch and never finishes
        other.execute("SELECT 1 FROM sketch_backlog WHERE layer_id = %s FOR UPDATE", (layer_id,))
        started = time.monotonic()
        held = api.post(base, json={"n_quantiles": 4, "method": "sketch", "wait_for": 0.3})
        assert 0.3 <= time.monotonic() - started < 5
    assert held.status_code == 503 and error_of(held)["code"] == "sketches_behind", held.text
    assert "100 rows (1 batches) behind" in error_of(held)["message"]
    assert api.post(base, json={"n_quantiles": 4, "method": "sketch", "wait_for": 5}).status_code == 201
    for body in (
        {"n_quantiles": 4, "method": "exact", "wait_for": 1},
        {"n_quantiles": 4, "method": "sketch", "wait_for": -1},
        {"n_quantiles": 4, "method": "sketch", "wait_for": 3600},
    ):
        answer = api.post(base, json=body)
        assert answer.status_code == 422 and error_of(answer)["field"] == "wait_for", answer.text


def test_the_background_sketcher_catches_up(database_url):
    server, thread, base_url = start_service(Settings(database_url=None, sketch_poll_s=0.05), database_url)
    try:
        with psycopg.connect(database_url) as conn:
            key = create_key(conn, "alpha", "write")
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
            run_id, layer_id = make_layer(api, dim=5)
            for batch in range(4):
                assert post_arrow(api, run_id, layer_id, random_rows(500, 5, seed=batch)).status_code == 201
            deadline = time.monotonic() + 30
            while True:  # no wait_for: only the background sketcher folds
                answer = api.post(
                    f"/v1/runs/{run_id}/layers/{layer_id}/quantiles", json={"n_quantiles": 4, "method": "sketch"}
                )
                if answer.status_code == 201 and answer.json()["pending_rows"] == 0:
                    break
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.05)
            assert answer.json()["rows"] == 2000
    finally:
        stop_service(server, thread)


def test_concurrent_sketchers_fold_every_batch_exactly_once(database_url):
    with connect(database_url, Settings()) as conn:
        project_id = ensure_project(conn, "alpha")
        run = runs.create_run(conn, project_id, "many", {})
        layer = runs.create_layer(conn, project_id, run.id, "fc", 3, "activations")
        parts = []
        for batch in range(40):
            values = np.random.default_rng(batch).standard_normal((50 + batch, 3)).astype(np.float32)
            parts.append(values)
            ingest(conn, layer, f"b{batch}", ActivationRows.build(values, task="AB"[batch % 2]))
    folded: list[int] = []
    failures: list[BaseException] = []

    def sketcher() -> None:
        try:
            with connect(database_url, Settings()) as own:
                while (rows := fold_layer(own, layer, DEFAULT_K, 200 * 3)) or backlog(own, layer).batches:
                    folded.append(rows)
        except BaseException as error:  # the test reports it
            failures.append(error)

    threads = [threading.Thread(target=sketcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    total = sum(len(part) for part in parts)
    assert sum(folded) == total
    with connect(database_url, Settings()) as conn:
        assert merged_sketches(conn, layer, None)[0][0].n == total
        assert merged_sketches(conn, layer, "A")[0][0].n == sum(len(p) for p in parts[::2])
        assert backlog(conn, layer).batches == 0
        found = quantiles.compute(conn, layer, 10, "sketch", ActivationFilter(), 1 << 30)
        assert worst_rank_error(np.concatenate(parts), found.boundaries) <= found.rank_error


def test_a_crash_of_the_sketcher_midway_neither_loses_nor_double_counts_a_batch():
    """The API's sketcher is killed (SIGKILL) while it holds claimed batches it has read and sketched."""
    dim, rows = 8, 2000
    with fault_bed({"sketch_poll_s": "0.05"}) as bed:
        run_id, layer_id = bed.new_layer(dim, "crash")
        base = f"/v1/runs/{run_id}/layers/{layer_id}/quantiles"
        fill_layer(bed.api, run_id, layer_id, 1, rows, dim)
        with bed.api.client() as client:
            assert client.post(base, json={"n_quantiles": 4, "method": "sketch", "wait_for": 20}).status_code == 201
        with psycopg.connect(bed.api.database_url, autocommit=True) as admin:
            holder = psycopg.connect(bed.api.database_url)  # holds the sketches' row: the next fold stops at its merge
            holder.execute("SELECT 1 FROM layer_sketches WHERE layer_id = %s FOR UPDATE", (layer_id,))
            try:
                with bed.api.client() as client:
                    for seq in range(1, 6):  # ingest does not wait on the sketches
                        batch = make_batch(99, seq, rows, dim)
                        answer = client.post(
                            f"/v1/runs/{run_id}/layers/{layer_id}/activations",
                            content=batch.body,
                            headers={"content-type": ARROW_STREAM},
                        )
                        assert answer.status_code == 201, answer.text
                blocked = _wait_for_blocked_fold(admin)
                bed.api.kill()
            finally:
                holder.rollback()
                holder.close()
            _wait_until_gone(admin, blocked)
            pending, sketched = _ledger_and_sketches(admin, layer_id)
            assert (pending, sketched) == (5 * rows, rows), "the killed fold left no trace"
        bed.api.start()
        with bed.api.client() as client:
            answer = client.post(base, json={"n_quantiles": 10, "method": "sketch", "wait_for": 30})
            assert answer.status_code == 201, answer.text
            body = answer.json()
        assert (body["rows"], body["pending_rows"]) == (6 * rows, 0)
        with psycopg.connect(bed.api.database_url, autocommit=True) as admin:
            assert _ledger_and_sketches(admin, layer_id) == (0, 6 * rows)
        stored = np.concatenate([make_batch(99, seq, rows, dim).rows.values for seq in range(6)])
        assert worst_rank_error(stored, np.array(body["boundaries"])) <= body["rank_error"]


def _wait_for_blocked_fold(admin: psycopg.Connection, timeout: float = 60) -> int:
    """The pid of a backend whose fold waits on the held sketches row (it has claimed and read its batches)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM layer_sketches%'"
        ).fetchone()
        if found is not None:
            return int(found[0])
        time.sleep(0.02)
    raise AssertionError("no fold reached the sketches' row")


def _wait_until_gone(admin: psycopg.Connection, pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone() is not None:
        assert time.monotonic() < deadline, "the killed API's backend lingers"
        time.sleep(0.02)


def _ledger_and_sketches(admin: psycopg.Connection, layer_id: int) -> tuple[int, int]:
    """Rows waiting on the ledger, rows in the sketches."""
    pending = admin.execute(
        "SELECT coalesce(sum(row_count), 0) FROM sketch_backlog WHERE layer_id = %s", (layer_id,)
    ).fetchone()[0]
    sketched = admin.execute(
        "SELECT coalesce(sum(n), 0) FROM layer_sketches WHERE layer_id = %s", (layer_id,)
    ).fetchone()[0]
    return int(pending), int(sketched)


def test_a_batch_larger_than_one_read_is_read_in_windows(database_url, monkeypatch):
    monkeypatch.setattr("app.sketches._READ_VALUES", 30)  # 10 rows of 3 units per read
    values = np.random.default_rng(5).standard_normal((95, 3)).astype(np.float32)
    tasks = ["A" if row % 3 else "B" for row in range(95)]
    with connect(database_url, Settings()) as conn:
        project_id = ensure_project(conn, "alpha")
        run = runs.create_run(conn, project_id, "windows", {})
        layer = runs.create_layer(conn, project_id, run.id, "fc", 3, "activations")
        ingest(conn, layer, "big", ActivationRows.build(values, task=tasks))
        assert fold_layer(conn, layer, DEFAULT_K, 1) == 95  # one batch at least, whatever the budget
        assert merged_sketches(conn, layer, "B")[0][0].n == 32
        merged, _ = merged_sketches(conn, layer, None)
        assert merged[0].n == 95
        np.testing.assert_array_equal([sketch.get_min_value() for sketch in merged], values.min(axis=0))
        np.testing.assert_array_equal([sketch.get_max_value() for sketch in merged], values.max(axis=0))
