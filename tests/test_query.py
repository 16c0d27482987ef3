"""Query: filters, keyset pages that cover every row once, Arrow streams, per-unit summaries."""

import numpy as np
import pyarrow as pa
import pytest

from eidetic.wire.rows import ActivationRows
from tests.helpers import activations_path, error_of, make_layer, post_arrow


@pytest.fixture
def filled(api):
    """A layer holding 12 batches of 250 rows: tasks A then B, labels 0..9, steps 0..11, epochs 0..2."""
    run_id, layer_id = make_layer(api, dim=6)
    rng = np.random.default_rng(7)
    matrices = []
    for batch in range(12):
        values = rng.standard_normal((250, 6)).astype(np.float32)
        matrices.append(values)
        rows = ActivationRows.build(
            values,
            sample_id=np.arange(250) + 250 * batch,
            step=batch,
            epoch=batch // 4,
            label=np.arange(250) % 10,
            task="A" if batch < 6 else "B",
        )
        assert post_arrow(api, run_id, layer_id, rows, batch_id=f"b{batch}").status_code == 201
    return run_id, layer_id, np.concatenate(matrices)


def all_pages(api, path, **params):
    rows, cursor, pages = [], None, 0
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = api.get(path, params=query)
        assert page.status_code == 200, page.text
        rows += page.json()["rows"]
        cursor = page.json()["next_cursor"]
        pages += 1
        if cursor is None:
            return rows, pages


def test_keyset_pages_return_every_row_once_in_order(api, filled):
    run_id, layer_id, matrix = filled
    rows, pages = all_pages(api, activations_path(run_id, layer_id), limit=700)
    assert pages == 5  # 3000 rows in pages of 700
    assert [r["sample_id"] for r in rows] == list(range(3000))
    np.testing.assert_array_equal(np.array([r["values"] for r in rows], dtype=np.float32), matrix)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"task": "B"}, lambda s: s >= 1500),
        ({"label": 3}, lambda s: s % 10 == 3),
        ({"epoch": 1}, lambda s: (s // 250) // 4 == 1),
        ({"step_min": 2, "step_max": 4}, lambda s: 2 <= s // 250 <= 4),
        ({"task": "A", "label": 9, "step_min": 5}, lambda s: s < 1500 and s % 10 == 9 and s // 250 >= 5),
    ],
)
def test_filters_select_exactly_the_matching_rows(api, filled, params, expected):
    run_id, layer_id, _ = filled
    rows, _ = all_pages(api, activations_path(run_id, layer_id), limit=97, **params)
    assert [r["sample_id"] for r in rows] == [s for s in range(3000) if expected(s)]


def test_sample_ids_are_looked_up(api, filled):
    run_id, layer_id, matrix = filled
    response = api.get(activations_path(run_id, layer_id), params={"sample_id": [5, 2999, 1234]})
    rows = response.json()["rows"]
    assert [r["sample_id"] for r in rows] == [5, 1234, 2999]
    np.testing.assert_array_equal(np.array(rows[1]["values"], dtype=np.float32), matrix[1234])


def test_a_sparse_filter_pages_across_many_batches(api, filled):
    run_id, layer_id, _ = filled
    rows, _ = all_pages(api, activations_path(run_id, layer_id), limit=1, label=7, step_min=10)
    assert [r["sample_id"] for r in rows] == [s for s in range(2500, 3000) if s % 10 == 7]


def test_arrow_stream_of_everything_comes_in_bounded_record_batches(api, filled):
    run_id, layer_id, matrix = filled
    response = api.get(activations_path(run_id, layer_id), params={"format": "arrow", "task": "A"})
    assert response.headers["content-type"] == "application/vnd.apache.arrow.stream"
    reader = pa.ipc.open_stream(response.content)
    batches = list(reader)
    table = pa.Table.from_batches(batches)
    assert table.num_rows == 1500
    assert table.column("sample_id").to_pylist() == list(range(1500))
    values = np.stack(table.column("values").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(values, matrix[:1500])
    assert table.schema.field("values").type == pa.list_(pa.float32(), 6)


def test_arrow_with_a_limit_returns_that_many(api, filled):
    run_id, layer_id, _ = filled
    response = api.get(activations_path(run_id, layer_id), params={"format": "arrow", "limit": 321})
    assert pa.ipc.open_stream(response.content).read_all().num_rows == 321


def test_summary_matches_numpy(api, filled):
    run_id, layer_id, matrix = filled
    summary = api.get(f"/v1/runs/{run_id}/layers/{layer_id}/summary").json()
    assert summary["rows"] == 3000
    np.testing.assert_allclose(summary["mean"], matrix.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(summary["std"], matrix.std(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(np.array(summary["min"], dtype=np.float32), matrix.min(axis=0))
    np.testing.assert_array_equal(np.array(summary["max"], dtype=np.float32), matrix.max(axis=0))
    only_b = api.get(f"/v1/runs/{run_id}/layers/{layer_id}/summary", params={"task": "B"}).json()
    assert only_b["rows"] == 1500
    np.testing.assert_allclose(only_b["mean"], matrix[1500:].mean(axis=0), rtol=1e-6, atol=1e-7)


def test_summary_of_an_empty_layer(api):
    run_id, layer_id = make_layer(api, dim=3)
    summary = api.get(f"/v1/runs/{run_id}/layers/{layer_id}/summary").json()
    assert summary == {"rows": 0, "mean": [None] * 3, "std": [None] * 3, "min": [None] * 3, "max": [None] * 3}
    assert api.get(activations_path(run_id, layer_id)).json() == {"rows": [], "next_cursor": None}


@pytest.mark.parametrize(
    "params, field",
    [
        ({"limit": 0}, "limit"),
        ({"limit": -5}, "limit"),
        ({"limit": 10_000_000}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"step_min": 5, "step_max": 1}, "step_min"),
        ({"label": 2**40}, "label"),
        ({"format": "csv"}, "format"),
    ],
)
def test_bad_query_parameters_are_named(api, filled, params, field):
    run_id, layer_id, _ = filled
    response = api.get(activations_path(run_id, layer_id), params=params)
    assert response.status_code in (400, 422)
    assert error_of(response)["field"] == field
