"""Kernel records over HTTP: one set per (task, layer) of a run, read back whole, ranked by change or
importance; bad input is refused by name, and another project's run does not exist."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from eidetic.client import EideticAPIError, EideticClient
from tests.helpers import error_of


def new_run(api, name: str = "hebbian") -> int:
    response = api.post("/v1/runs", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def records_path(run_id: int) -> str:
    return f"/v1/runs/{run_id}/kernel-records"


def record(api, run_id: int, task: int, layer: str, change, importance, intervals: int = 4):
    body = {"task": task, "layer": layer, "change": change, "importance": importance, "intervals": intervals}
    return api.post(records_path(run_id), json=body)


def test_a_record_set_is_stored_per_task_and_layer_and_read_back_in_kernel_order(api):
    run_id = new_run(api)
    written = record(api, run_id, 0, "block0", [0.5, 0.25, 2.0], [10.0, 30.0, 20.0], intervals=8)
    assert written.status_code == 201
    assert written.json() == {"task": 0, "layer": "block0", "kernels": 3, "intervals": 8}
    record(api, run_id, 0, "block1", [1.0, 1.0], [0.0, 1.0])
    record(api, run_id, 1, "block0", [0.1, 0.2, 0.3], [3.0, 2.0, 1.0])

    everything = api.get(records_path(run_id)).json()["records"]
    assert [(r["task"], r["layer"]) for r in everything] == [(0, "block0"), (0, "block1"), (1, "block0")]
    first = everything[0]
    assert (first["change"], first["importance"], first["intervals"]) == ([0.5, 0.25, 2.0], [10.0, 30.0, 20.0], 8)
    only = api.get(records_path(run_id), params={"task": 1, "layer": "block0"}).json()["records"]
    assert [(r["task"], r["layer"], r["change"]) for r in only] == [(1, "block0", [0.1, 0.2, 0.3])]
    assert len(api.get(records_path(run_id), params={"layer": "block0"}).json()["records"]) == 2
    assert api.get(records_path(run_id), params={"task": 7}).json()["records"] == []


def test_recording_a_task_again_replaces_its_set_whole(api):
    run_id = new_run(api)
    record(api, run_id, 0, "block0", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert record(api, run_id, 0, "block0", [9.0, 8.0], [7.0, 6.0], intervals=2).status_code == 201
    (found,) = api.get(records_path(run_id)).json()["records"]
    assert (found["change"], found["importance"], found["intervals"]) == ([9.0, 8.0], [7.0, 6.0], 2)


def test_top_kernels_by_count_or_share_largest_first_ties_to_the_lower_index(api):
    run_id = new_run(api)
    record(api, run_id, 2, "block0", [0.4, 0.1, 0.9, 0.9, 0.0], [5.0, 50.0, 1.0, 7.0, 7.0])
    top = api.get(records_path(run_id) + "/top", params={"task": 2, "layer": "block0", "k": 2}).json()
    assert top == {
        "task": 2,
        "layer": "block0",
        "by": "importance",
        "n_kernels": 5,
        "kernels": [1, 3],
        "values": [50.0, 7.0],
    }
    by_change = api.get(
        records_path(run_id) + "/top", params={"task": 2, "layer": "block0", "ratio": 0.5, "by": "change"}
    ).json()
    assert by_change["kernels"] == [2, 3, 0]  # ceil(0.5 x 5) = 3; 0.9 twice: kernel 2 before kernel 3
    everything = api.get(records_path(run_id) + "/top", params={"task": 2, "layer": "block0", "k": 99}).json()
    assert everything["kernels"] == [1, 3, 4, 0, 2]
    smallest_share = api.get(records_path(run_id) + "/top", params={"task": 2, "layer": "block0", "ratio": 0.01})
    assert smallest_share.json()["kernels"] == [1]  # at least one kernel


@pytest.mark.parametrize(
    "body, field",
    [
        ({"task": 0, "layer": "b", "change": [1.0, 2.0], "importance": [1.0]}, "importance"),
        ({"task": -1, "layer": "b", "change": [1.0], "importance": [1.0]}, "task"),
        ({"task": 0, "layer": "", "change": [1.0], "importance": [1.0]}, "layer"),
        ({"task": 0, "layer": "b", "change": [], "importance": []}, "change"),
        ({"task": 0, "layer": "b", "change": ["1.0"], "importance": [1.0]}, "change.0"),
        ({"task": "0", "layer": "b", "change": [1.0], "importance": [1.0]}, "task"),
        ({"task": 0, "layer": "b", "change": [1.0], "importance": [1.0], "intervals": -2}, "intervals"),
        ({"task": 0, "layer": "b", "change": [1.0], "importance": [1.0], "kernel": 3}, "kernel"),
    ],
)
def test_malformed_record_sets_are_refused_by_field(api, body, field):
    run_id = new_run(api)
    response = api.post(records_path(run_id), json=body)
    assert response.status_code == 422
    assert error_of(response)["field"] == field
    assert api.get(records_path(run_id)).json()["records"] == []


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused(api, literal):
    run_id = new_run(api)
    body = f'{{"task": 0, "layer": "b", "change": [1.0, {literal}], "importance": [1.0, 2.0]}}'
    response = api.post(records_path(run_id), content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_of(response) | {"message": None} == {"code": "non_finite_value", "message": None, "field": "change[1]"}
    assert api.get(records_path(run_id)).json()["records"] == []


def test_a_top_query_takes_exactly_one_of_k_and_ratio_and_valid_values(api):
    run_id = new_run(api)
    record(api, run_id, 0, "b", [1.0, 2.0], [1.0, 2.0])
    top = records_path(run_id) + "/top"
    for params, field in [
        ({"task": 0, "layer": "b"}, "k"),
        ({"task": 0, "layer": "b", "k": 1, "ratio": 0.5}, "k"),
        ({"task": 0, "layer": "b", "k": 0}, "k"),
        ({"task": 0, "layer": "b", "ratio": 1.5}, "ratio"),
        ({"task": 0, "layer": "b", "ratio": "nan"}, "ratio"),
        ({"task": 0, "layer": "b", "k": 1, "by": "size"}, "by"),
        ({"layer": "b", "k": 1}, "task"),
        ({"task": 0, "layer": "b", "k": 1, "tsk": 0}, "tsk"),
    ]:
        response = api.get(top, params=params)
        assert response.status_code == 422, params
        assert error_of(response)["field"] == field, params


def test_unknown_runs_and_unrecorded_sets_are_not_found(api):
    assert record(api, 999_999, 0, "b", [1.0], [1.0]).status_code == 404
    assert api.get(records_path(999_999)).status_code == 404
    run_id = new_run(api)
    record(api, run_id, 0, "b", [1.0], [1.0])
    for params in ({"task": 1, "layer": "b", "k": 1}, {"task": 0, "layer": "c", "k": 1}):
        response = api.get(records_path(run_id) + "/top", params=params)
        assert response.status_code == 404
        assert error_of(response)["code"] == "not_found"


def test_another_projects_run_is_not_found_and_keeps_its_records(service, api):
    run_id = new_run(api)
    record(api, run_id, 0, "b", [1.0, 2.0], [3.0, 4.0])
    with service.client(service.new_key("beta")) as other:
        assert other.get(records_path(run_id)).status_code == 404
        assert other.get(records_path(run_id) + "/top", params={"task": 0, "layer": "b", "k": 1}).status_code == 404
        assert record(other, run_id, 0, "b", [0.0, 0.0], [0.0, 0.0]).status_code == 404
    assert api.get(records_path(run_id)).json()["records"][0]["change"] == [1.0, 2.0]


def test_a_read_key_reads_but_does_not_write(service, api):
    run_id = new_run(api)
    record(api, run_id, 0, "b", [1.0], [1.0])
    with service.client(service.new_key("alpha", "read")) as reader:
        assert reader.get(records_path(run_id)).status_code == 200
        assert record(reader, run_id, 1, "b", [1.0], [1.0]).status_code == 403


def test_deleting_the_run_deletes_its_records(service, api):
    run_id = new_run(api)
    record(api, run_id, 0, "b", [1.0], [1.0])
    assert api.delete(f"/v1/runs/{run_id}").status_code == 204
    with psycopg.connect(service.database_url) as conn:
        left = conn.execute("SELECT count(*) FROM kernel_records WHERE run_id = %s", (run_id,)).fetchone()[0]
    assert left == 0


def test_the_client_writes_reads_and_ranks_records(service):
    with EideticClient(service.base_url, service.write_key) as client:
        run = client.create_run("client-records")
        change = np.array([0.1, 0.7, 0.3], dtype=np.float32)  # float32 values come back exactly
        importance = np.array([2.0, 1.0, 3.0], dtype=np.float32)
        client.write_kernel_records(run.id, 0, "block0", change, importance, intervals=5)
        (found,) = client.kernel_records(run.id, task=0, layer="block0")
        assert found.intervals == 5
        assert np.array_equal(found.change.astype(np.float32), change)
        assert np.array_equal(found.importance.astype(np.float32), importance)
        assert client.top_kernels(run.id, 0, "block0", k=1)["kernels"] == [2]
        assert client.top_kernels(run.id, 0, "block0", ratio=2 / 3, by="change")["kernels"] == [1, 2]
        with pytest.raises(EideticAPIError) as refused:
            client.top_kernels(run.id, 0, "block0")
        assert refused.value.status == 422 and refused.value.field == "k"
