"""Small helpers the API tests share: making a run and a layer, sending batches, counting rows."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import numpy as np
import psycopg

from app.settings import Settings
from eidetic.wire.formats import ARROW_STREAM, rows_to_arrow
from eidetic.wire.rows import ActivationRows


def make_layer(api: httpx.Client, dim: int = 8, run: str = "run", layer: str = "fc") -> tuple[int, int]:
    response = api.post("/v1/runs", json={"name": run, "config": {"lr": 0.1}})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    response = api.post(f"/v1/runs/{run_id}/layers", json={"name": layer, "dim": dim})
    assert response.status_code == 201, response.text
    return run_id, response.json()["id"]


def activations_path(run_id: int, layer_id: int) -> str:
    return f"/v1/runs/{run_id}/layers/{layer_id}/activations"


def random_rows(n: int, dim: int, seed: int = 0, **metadata) -> ActivationRows:
    values = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return ActivationRows.build(values, **metadata)


def post_arrow(api: httpx.Client, run_id: int, layer_id: int, rows: ActivationRows, batch_id: str | None = None):
    return api.post(
        activations_path(run_id, layer_id),
        content=rows_to_arrow(rows, batch_id),
        headers={"content-type": ARROW_STREAM},
    )


def stored_rows(database_url: str, layer_id: int) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM activations WHERE layer_id = %s", (layer_id,)).fetchone()[0]


def stored_batches(database_url: str, layer_id: int) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM ingest_batches WHERE layer_id = %s", (layer_id,)).fetchone()[0]


def error_of(response: httpx.Response) -> dict:
    """The error object of a 4xx/5xx answer (asserting it has the one JSON shape)."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "field"} <= set(body["error"]), body
    return body["error"]


def sampling_settings(sample_rows: int) -> Settings:
    """The suite's service settings with a small sampling budget, so that a test layer or bank counts as large."""
    return Settings(
        database_url=None,
        no_auth=False,
        max_body_bytes=8 * 1024 * 1024,
        max_rows_per_batch=50_000,
        aggregate_sample_rows=sample_rows,
        summary_sample_rows=sample_rows,
    )


def run_concurrently(worker: Callable[[int], None], n: int) -> None:
    """Runs worker(0) .. worker(n - 1) on n threads at once and waits for all of them."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def assert_versions_rise_per_writer(answers: list[list[dict]]) -> None:
    """Each writer's write answers came back with strictly rising bank versions, in the order it wrote."""
    for mine in answers:
        versions = [answer["version"] for answer in mine]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
