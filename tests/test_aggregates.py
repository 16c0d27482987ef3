"""The aggregate routes the dashboard reads, checked against numpy over the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import error_of, make_layer, post_arrow, random_rows


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
