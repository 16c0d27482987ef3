"""Runs and layers: created, listed, read, and a run deleted in O(1) by dropping its partition."""

import psycopg

from tests.helpers import error_of, make_layer, post_arrow, random_rows, stored_rows


def test_create_read_and_list_runs(api):
    created = api.post("/v1/runs", json={"name": "mnist-a-b", "config": {"lr": 1.0}})
    assert created.status_code == 201
    run = created.json()
    assert run["name"] == "mnist-a-b" and run["config"] == {"lr": 1.0} and run["status"] == "running"
    assert run["metrics"] == {}
    assert api.get(f"/v1/runs/{run['id']}").json() == run
    api.post("/v1/runs", json={"name": "second"})
    names = [r["name"] for r in api.get("/v1/runs").json()["runs"]]
    assert names == ["mnist-a-b", "second"]
    assert [r["name"] for r in api.get("/v1/runs", params={"limit": 1, "offset": 1}).json()["runs"]] == ["second"]


def test_a_run_name_is_unique_in_its_project(api):
    assert api.post("/v1/runs", json={"name": "same"}).status_code == 201
    again = api.post("/v1/runs", json={"name": "same"})
    assert again.status_code == 409
    assert error_of(again)["field"] == "name"


def test_a_run_is_marked_finished_and_records_its_metrics(api):
    run_id = api.post("/v1/runs", json={"name": "r"}).json()["id"]
    assert api.patch(f"/v1/runs/{run_id}", json={"metrics": {"acc": 0.5, "bwt": -0.1}}).json()["status"] == "running"
    updated = api.patch(f"/v1/runs/{run_id}", json={"status": "finished", "metrics": {"acc": 0.9}}).json()
    assert updated["status"] == "finished" and updated["metrics"] == {"acc": 0.9, "bwt": -0.1}
    assert api.patch(f"/v1/runs/{run_id}", json={"status": "exploded"}).status_code == 422


def test_layers_have_a_name_and_a_dimension(api):
    run_id, layer_id = make_layer(api, dim=36, layer="eidetic")
    layer = api.get(f"/v1/runs/{run_id}/layers/{layer_id}").json()
    assert (layer["name"], layer["dim"], layer["run_id"]) == ("eidetic", 36, run_id)
    assert api.post(f"/v1/runs/{run_id}/layers", json={"name": "eidetic", "dim": 3}).status_code == 409
    assert api.post(f"/v1/runs/{run_id}/layers", json={"name": "wide", "dim": 0}).status_code == 422
    assert api.post(f"/v1/runs/{run_id}/layers", json={"name": "huge", "dim": 16_001}).status_code == 422
    assert [layer["name"] for layer in api.get(f"/v1/runs/{run_id}/layers").json()["layers"]] == ["eidetic"]


def test_deleting_a_run_drops_its_partition_and_keeps_other_runs(service, api):
    run_id, layer_id = make_layer(api, dim=4, run="doomed")
    keep_run, keep_layer = make_layer(api, dim=4, run="kept")
    assert post_arrow(api, run_id, layer_id, random_rows(500, 4)).status_code == 201
    assert post_arrow(api, keep_run, keep_layer, random_rows(300, 4)).status_code == 201
    assert api.delete(f"/v1/runs/{run_id}").status_code == 204
    assert api.get(f"/v1/runs/{run_id}").status_code == 404
    with psycopg.connect(service.database_url) as conn:
        partitions = {
            row[0]
            for row in conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'activations_r%%'").fetchall()
        }
        ledger = conn.execute("SELECT count(*) FROM ingest_batches WHERE run_id = %s", (run_id,)).fetchone()[0]
    assert f"activations_r{run_id}" not in partitions and f"activations_r{run_id}_l{layer_id}" not in partitions
    assert f"activations_r{keep_run}_l{keep_layer}" in partitions
    assert ledger == 0
    assert stored_rows(service.database_url, keep_layer) == 300
    assert api.delete(f"/v1/runs/{run_id}").status_code == 404


def test_unknown_ids_are_not_found(api):
    assert error_of(api.get("/v1/runs/999999"))["code"] == "not_found"
    run_id, _ = make_layer(api)
    assert api.get(f"/v1/runs/{run_id}/layers/999999").status_code == 404
    assert api.get(f"/v1/runs/{2**63}").status_code == 422
    assert api.get("/v1/runs/abc").status_code == 422
