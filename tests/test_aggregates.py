"""The aggregate routes the dashboard reads, checked against numpy over the same rows."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.settings import Settings
from tests.helpers import error_of, make_layer, post_arrow, random_rows, sampling_settings

SAMPLE_ROWS = 2000  # layers above this many rows are read through a block sample here


@pytest.fixture
def settings() -> Settings:
    """The suite's settings, with a small sampling budget so a test layer can be "large"."""
    return sampling_settings(SAMPLE_ROWS)


@pytest.fixture
def stored(api):
    """A layer of 6 units: 40 rows at each of the steps 0, 10, ..., 90 (task A before step 50, else B)."""
    run_id, layer_id = make_layer(api, dim=6)
    values = []
    for step in range(0, 100, 10):
        rows = random_rows(40, 6, seed=step, step=step, task="A" if step < 50 else "B", label=step % 2)
        assert post_arrow(api, run_id, layer_id, rows).status_code == 201
        values.append((step, rows.values))
    return run_id, layer_id, values


def test_distribution_bands_are_the_percentiles_of_each_step_bucket(api, stored):
    run_id, layer_id, values = stored
    answer = api.get(f"/v1/runs/{run_id}/layers/{layer_id}/distribution", params={"unit": 2, "buckets": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["buckets"]) == 5
    for i, bucket in enumerate(body["buckets"]):
        unit = np.concatenate([v[:, 2] for step, v in values if 20 * i <= step < 20 * (i + 1)])
        assert bucket["rows"] == len(unit) == 80
        assert (bucket["step_min"], bucket["step_max"]) == (20 * i, 20 * i + 10)
        np.testing.assert_allclose(bucket["values"], np.percentile(unit, body["percentiles"]), rtol=1e-5, atol=1e-6)


def test_histogram_counts_every_selected_row_once(api, stored):
    run_id, layer_id, values = stored
    path = f"/v1/runs/{run_id}/layers/{layer_id}/histogram"
    body = api.get(path, params={"unit": 0, "bins": 7, "task": "B"}).json()
    unit = np.concatenate([v[:, 0] for step, v in values if step >= 50])
    counts, edges = np.histogram(unit, bins=7)
    assert body["rows"] == 200 and body["counts"] == counts.tolist()
    np.testing.assert_allclose(body["edges"], edges, rtol=1e-5)
    assert api.get(path, params={"unit": 0, "step_min": 1000}).json() == {
        "unit": 0,
        "rows": 0,
        "edges": [],
        "counts": [],
        "sampled": False,
        "sample_percent": None,
        "layer_rows": 400,
    }
    assert error_of(api.get(path, params={"unit": 6}))["field"] == "unit"


def test_stats_count_rows_and_runs_of_the_callers_project_only(service, api, stored):
    run_id, _, _ = stored
    runs = api.get("/v1/stats").json()["runs"]
    assert [(r["run_id"], r["rows"], r["layers"]) for r in runs] == [(run_id, 400, 1)]
    assert runs[0]["bytes"] > 0 and runs[0]["rows_last_minute"] == 400
    with service.client(service.new_key(project="beta", scope="read")) as other:
        assert other.get("/v1/stats").json() == {"runs": []}


@pytest.fixture
def bank(api):
    bank = api.post("/v1/memory-banks", json={"name": "b", "dim": 3, "capacity": 100, "policy": "none"}).json()
    keys = np.random.default_rng(0).standard_normal((30, 3)).tolist()
    items = [{"key": key, "label": i % 3, "confidence": 0.5} for i, key in enumerate(keys)]
    written = api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items})
    assert written.status_code == 200, written.text
    return bank["id"], np.asarray(keys), written.json()["ids"]


def test_bank_items_page_by_label_and_count_labels(api, bank):
    bank_id, _, ids = bank
    body = api.get(f"/v1/memory-banks/{bank_id}/items", params={"label": 1, "limit": 4}).json()
    assert [item["id"] for item in body["items"]] == ids[1::3][:4]
    assert body["next_after_id"] == ids[1::3][3]
    assert body["labels"] == [{"label": label, "items": 10} for label in range(3)]


def test_item_neighbours_are_the_nearest_by_cosine_without_itself(api, bank):
    bank_id, keys, ids = bank
    body = api.get(f"/v1/memory-banks/{bank_id}/items/{ids[0]}/neighbours", params={"k": 5}).json()
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    similarity = unit @ unit[0]
    expected = [ids[i] for i in np.argsort(-similarity)[1:6]]
    assert body["ids"] == expected
    np.testing.assert_allclose(body["scores"], np.sort(similarity)[::-1][1:6], rtol=1e-4)


def test_projection_is_the_first_two_principal_components_of_a_sample(api, bank):
    bank_id, keys, ids = bank
    body = api.get(f"/v1/memory-banks/{bank_id}/projection", params={"sample": 10}).json()
    assert body["size"] == 30 and len(body["ids"]) == len(body["x"]) == 10 and set(body["ids"]) <= set(ids)
    whole = api.get(f"/v1/memory-banks/{bank_id}/projection").json()
    centred = keys - keys.mean(axis=0)
    variance = np.linalg.svd(centred, compute_uv=False) ** 2
    np.testing.assert_allclose(whole["explained_variance"], variance[:2] / variance.sum(), rtol=1e-4)


def test_projection_of_a_large_bank_draws_the_sample_from_its_pages_and_says_its_size(api):
    """A bank many times the sample is read as a block sample: still `sample` distinct stored keys, and
    the bank's full size, so the page can say "200 sampled of 4,000"."""
    bank = api.post("/v1/memory-banks", json={"name": "wide", "dim": 16, "capacity": 4000, "policy": "none"}).json()
    keys = np.random.default_rng(1).standard_normal((4000, 16)).round(3)
    items = [{"key": key, "label": i % 5} for i, key in enumerate(keys.tolist())]
    written = api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items})
    assert written.status_code == 200, written.text
    ids = written.json()["ids"]
    body = api.get(f"/v1/memory-banks/{bank['id']}/projection", params={"sample": 200}).json()
    assert body["size"] == 4000
    assert len(body["x"]) == len(body["y"]) == len(set(body["ids"])) == 200 and set(body["ids"]) <= set(ids)
    assert body["ids"] == sorted(body["ids"]) and set(body["labels"]) == set(range(5))
    assert (
        0 < body["explained_variance"][1] <= body["explained_variance"][0] < 0.2
    )  # isotropic keys: no axis stands out


@pytest.fixture
def large(api):
    """A layer of 12,000 rows x 4 units (steps 0..11, 1,000 rows each, labels 0..3), above the sampling budget."""
    run_id, layer_id = make_layer(api, dim=4, run="large")
    rng = np.random.default_rng(3)
    values = []
    for step in range(12):
        ids = np.arange(step * 1000, (step + 1) * 1000)
        rows = random_rows(
            1000, 4, seed=step, sample_id=ids, step=step, epoch=step // 6, label=rng.integers(0, 4, 1000)
        )
        rows.values[:, 1] += step  # unit 1 drifts with the step
        assert post_arrow(api, run_id, layer_id, rows).status_code == 201
        values.append(rows.values)
    return run_id, layer_id, np.concatenate(values)


def test_a_large_layer_is_read_through_a_block_sample_and_the_answer_says_so(api, large):
    run_id, layer_id, values = large
    base = f"/v1/runs/{run_id}/layers/{layer_id}"
    body = api.get(f"{base}/histogram", params={"unit": 1, "bins": 10}).json()
    assert body["sampled"] is True and body["layer_rows"] == 12_000
    assert body["sample_percent"] == pytest.approx(100 * SAMPLE_ROWS / 12_000, rel=1e-4)
    assert 0 < body["rows"] < 12_000 and sum(body["counts"]) == body["rows"]
    again = api.get(f"{base}/histogram", params={"unit": 1, "bins": 10}).json()
    assert again == body  # the same pages on every call: a refresh does not jitter

    exact = api.get(f"{base}/histogram", params={"unit": 1, "bins": 10, "sample": "false"}).json()
    counts, edges = np.histogram(values[:, 1], bins=10)
    assert exact["sampled"] is False and exact["rows"] == 12_000 and exact["counts"] == counts.tolist()
    np.testing.assert_allclose(exact["edges"], edges, rtol=1e-5)

    bands = api.get(f"{base}/distribution", params={"unit": 1, "buckets": 12}).json()
    assert bands["sampled"] is True and sum(b["rows"] for b in bands["buckets"]) < 12_000
    medians = [b["values"][4] for b in bands["buckets"]]
    assert medians == sorted(medians)  # the drift survives the sample

    summary = api.get(f"{base}/summary", params={"sample": "true"}).json()
    assert summary["sampled"] is True and summary["rows"] < 12_000 and summary["layer_rows"] == 12_000
    whole = api.get(f"{base}/summary").json()
    assert whole["rows"] == 12_000 and "sampled" not in whole  # the default reads every row, as before
    np.testing.assert_allclose(summary["mean"], whole["mean"], atol=0.5)


def test_a_sample_that_matches_no_row_falls_back_to_every_row(api, large):
    run_id, layer_id, _ = large
    path = f"/v1/runs/{run_id}/layers/{layer_id}/histogram"
    answers = [api.get(path, params={"unit": 0, "sample_id": i}).json() for i in range(0, 12_000, 1000)]
    assert all(answer["rows"] == 1 for answer in answers)  # in the sample, or read from every row
    assert any(answer["sampled"] is False for answer in answers)  # a sample without the row was not the answer
    assert any(answer["sampled"] is True for answer in answers)
    assert error_of(api.get(path, params={"unit": 0, "sample": "maybe"}))["field"] == "sample"


def test_quantile_sets_are_listed_newest_first_without_boundaries(service, api, stored):
    run_id, layer_id, _ = stored
    base = f"/v1/runs/{run_id}/layers/{layer_id}"
    assert api.get(f"{base}/quantiles").json() == {"sets": []}
    first = api.post(f"{base}/quantiles", json={"n_quantiles": 4, "task": "A"}).json()
    second = api.post(f"{base}/quantiles", json={"n_quantiles": 10}).json()
    listed = api.get(f"{base}/quantiles").json()["sets"]
    assert [s["id"] for s in listed] == [second["id"], first["id"]]
    assert [(s["version"], s["n_quantiles"], s["rows"], s["filter"]) for s in listed] == [
        (2, 10, 400, {}),
        (1, 4, 200, {"task": "A"}),
    ]
    assert "boundaries" not in listed[0]
    assert [s["id"] for s in api.get(f"{base}/quantiles", params={"limit": 1}).json()["sets"]] == [second["id"]]
    with service.client(service.new_key(project="beta", scope="read")) as other:
        assert other.get(f"{base}/quantiles").status_code == 404


def test_bank_fill_is_the_size_after_every_change_in_time_order(api):
    bank = api.post("/v1/memory-banks", json={"name": "f", "dim": 2, "capacity": 10, "policy": "fifo"}).json()
    path = f"/v1/memory-banks/{bank['id']}"
    assert api.get(f"{path}/fill").json()["versions"] == []
    rng = np.random.default_rng(0)
    for _ in range(3):  # 6, then 10 (full), then 10: the third write replaces the oldest
        items = [{"key": key, "label": 0} for key in rng.standard_normal((6, 2)).tolist()]
        assert api.post(f"{path}/items", json={"items": items}).status_code == 200
    held = api.get(f"{path}/items", params={"limit": 100}).json()["items"]
    assert api.delete(f"{path}/items/{held[0]['id']}").status_code == 200

    fill = api.get(f"{path}/fill").json()
    assert (fill["version"], fill["size"], fill["capacity"]) == (4, 9, 10)
    assert fill["versions"] == [1, 2, 3, 4]
    assert fill["sizes"] == [6, 10, 10, 9]
    assert fill["times"] == sorted(fill["times"]) and fill["times"][-1] <= time.time() + 1
    coarse = api.get(f"{path}/fill", params={"points": 2}).json()
    assert (coarse["versions"], coarse["sizes"]) == ([2, 4], [10, 9])
    assert error_of(api.get(f"{path}/fill", params={"points": 0}))["field"] == "points"
