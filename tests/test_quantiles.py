"""Quantiles: exact equals numpy's inverted CDF; sketches keep their stated rank error; buckets count
boundaries below."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app import quantiles, runs
from app.database import connect
from app.ingest import ingest
from app.keys import ensure_project
from app.query import ActivationFilter
from app.settings import Settings
from app.sketches import DEFAULT_K, catch_up, merged_sketches
from eidetic.wire.rows import ActivationRows
from tests.helpers import error_of, make_layer, post_arrow, random_rows

MEMORY = 1 << 30
CAUGHT_UP = quantiles.SketchOptions(wait_for_s=30)  # every committed batch folded in before the answer


def numpy_boundaries(matrix: np.ndarray, n_quantiles: int) -> np.ndarray:
    levels = np.arange(1, n_quantiles) / n_quantiles
    return np.quantile(matrix, levels, axis=0, method="inverted_cdf").T.astype(np.float32)


@pytest.fixture
def conn(database_url):
    with connect(database_url, Settings()) as connection:
        yield connection


def new_layer(conn, dim: int, name: str) -> runs.Layer:
    project_id = ensure_project(conn, "alpha")
    run = runs.create_run(conn, project_id, name, {})
    return runs.create_layer(conn, project_id, run.id, "fc", dim, "activations")


# ------------------------------------------------------------------ in-memory semantics

matrices = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 60), st.integers(1, 5)),
    elements=st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.5]), st.floats(-1e6, 1e6, width=32)),
)


@given(matrix=matrices, n_quantiles=st.integers(2, 40))
def test_exact_boundaries_equal_numpy_inverted_cdf(matrix, n_quantiles):
    np.testing.assert_array_equal(
        quantiles.exact_boundaries_of(matrix, n_quantiles), numpy_boundaries(matrix, n_quantiles)
    )


@given(
    boundaries=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 4), st.integers(1, 9)), elements=st.floats(-10, 10, width=32)
    ),
    data=st.data(),
)
def test_bucket_is_the_number_of_boundaries_strictly_below(boundaries, data):
    boundaries = np.sort(boundaries, axis=1)
    units = boundaries.shape[0]
    values = data.draw(
        hnp.arrays(
            np.float32,
            st.tuples(st.integers(1, 20), st.just(units)),
            elements=st.one_of(st.sampled_from(boundaries.ravel().tolist()), st.floats(-12, 12, width=32)),
        )
    )
    buckets = quantiles.bucketize(boundaries, values)
    expected = np.stack([np.searchsorted(boundaries[u], values[:, u], side="left") for u in range(units)], axis=1)
    np.testing.assert_array_equal(buckets, expected)
    assert buckets.min() >= 0 and buckets.max() <= boundaries.shape[1]


def test_buckets_match_torch_bucketize():
    torch = pytest.importorskip(
        "torch", reason="torch is the [train] extra; the semantics are checked above without it"
    )
    rng = np.random.default_rng(1)
    boundaries = np.sort(rng.standard_normal((3, 9)).astype(np.float32), axis=1)
    values = np.concatenate([rng.standard_normal((50, 3)).astype(np.float32), boundaries[:, :3].T])
    expected = np.stack(
        [
            torch.bucketize(
                torch.from_numpy(np.ascontiguousarray(values[:, u])), torch.from_numpy(boundaries[u]), right=False
            ).numpy()
            for u in range(3)
        ],
        axis=1,
    )
    np.testing.assert_array_equal(quantiles.bucketize(boundaries, values), expected)


# ------------------------------------------------------------------ against the database


@hsettings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    matrix=matrices,
    n_quantiles=st.integers(2, 12),
    tasks=st.lists(st.sampled_from(["A", "B"]), min_size=60, max_size=60),
)
def test_stored_exact_quantiles_equal_numpy(conn, matrix, n_quantiles, tasks):
    layer = new_layer(conn, matrix.shape[1], f"run-{np.random.default_rng().integers(1 << 62)}")
    task = np.array(tasks[: len(matrix)])
    ingest(conn, layer, "b0", ActivationRows.build(matrix, task=list(task), step=np.arange(len(matrix))))
    found = quantiles.compute(conn, layer, n_quantiles, "exact", ActivationFilter(), MEMORY)
    assert found.rows == len(matrix) and found.version == 1
    np.testing.assert_array_equal(found.boundaries, numpy_boundaries(matrix, n_quantiles))
    if (task == "B").any():
        only_b = quantiles.compute(conn, layer, n_quantiles, "exact", ActivationFilter(task="B"), MEMORY)
        assert only_b.version == 2 and only_b.rows == int((task == "B").sum())
        np.testing.assert_array_equal(only_b.boundaries, numpy_boundaries(matrix[task == "B"], n_quantiles))


def test_exact_quantiles_in_several_passes_when_memory_is_short(conn):
    matrix = np.random.default_rng(3).standard_normal((2000, 10)).astype(np.float32)
    layer = new_layer(conn, 10, "passes")
    ingest(conn, layer, "b0", ActivationRows.build(matrix))
    # room for 3 units per pass: 4 passes over subvectors of the stored rows
    found = quantiles.compute(conn, layer, 7, "exact", ActivationFilter(), 2000 * 8 * 3)
    np.testing.assert_array_equal(found.boundaries, numpy_boundaries(matrix, 7))
    with pytest.raises(Exception, match="use method=sketch"):
        quantiles.compute(conn, layer, 7, "exact", ActivationFilter(), 100)


def test_a_constant_unit_and_a_single_row(conn):
    layer = new_layer(conn, 2, "single")
    ingest(conn, layer, "b0", ActivationRows.build(np.array([[3.0, -1.0]], dtype=np.float32)))
    found = quantiles.compute(conn, layer, 4, "exact", ActivationFilter(), MEMORY)
    np.testing.assert_array_equal(found.boundaries, [[3, 3, 3], [-1, -1, -1]])


def test_sketches_keep_their_rank_error_on_a_million_values(conn):
    rng = np.random.default_rng(11)
    layer = new_layer(conn, 2, "million")
    parts = []
    for batch in range(5):  # 5 x 100,000 rows x 2 units = a million values
        values = np.stack([rng.standard_normal(100_000), rng.exponential(size=100_000)], axis=1).astype(np.float32)
        parts.append(values)
        ingest(conn, layer, f"b{batch}", ActivationRows.build(values, task="A" if batch % 2 else "B"))
    matrix = np.concatenate(parts)
    sketched = quantiles.compute(conn, layer, 100, "sketch", ActivationFilter(), MEMORY, sketch=CAUGHT_UP)
    assert sketched.rows == 500_000 and 0 < sketched.rank_error <= 0.01
    worst = 0.0
    for unit in range(2):
        column = np.sort(matrix[:, unit])
        below = np.searchsorted(column, sketched.boundaries[unit], side="left") / len(column)
        at_most = np.searchsorted(column, sketched.boundaries[unit], side="right") / len(column)
        levels = np.arange(1, 100) / 100
        # the boundary's true rank interval must come within the bound of its level
        distance = np.maximum(0, np.maximum(below - levels, levels - at_most))
        worst = max(worst, float(distance.max()))
    assert worst <= sketched.rank_error, (worst, sketched.rank_error)


def test_sketches_describe_exactly_the_committed_rows(conn):
    layer = new_layer(conn, 3, "committed")
    rows = ActivationRows.build(np.ones((40, 3), dtype=np.float32), task="A")
    ingest(conn, layer, "b0", rows)
    ingest(conn, layer, "b0", rows)  # a retry: acknowledged, not counted twice
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("ALTER TABLE activations ADD CONSTRAINT no_label_7 CHECK (label IS DISTINCT FROM 7)")
        ingest(conn, layer, "b1", ActivationRows.build(np.ones((10, 3), dtype=np.float32), label=7, task="A"))
    catch_up(conn, layer, DEFAULT_K, 1 << 20, 10)
    merged, _ = merged_sketches(conn, layer, None)
    assert merged[0].n == 40
    ingest(conn, layer, "b2", ActivationRows.build(np.zeros((5, 3), dtype=np.float32), task="B"))
    catch_up(conn, layer, DEFAULT_K, 1 << 20, 10)
    assert merged_sketches(conn, layer, "B")[0][0].n == 5
    assert merged_sketches(conn, layer, None)[0][0].n == 45


# ------------------------------------------------------------------ over HTTP


def test_quantile_routes(api):
    run_id, layer_id = make_layer(api, dim=6)
    rows = random_rows(1000, 6, task="B", label=np.arange(1000) % 4)
    assert post_arrow(api, run_id, layer_id, rows).status_code == 201
    base = f"/v1/runs/{run_id}/layers/{layer_id}/quantiles"
    exact = api.post(base, json={"n_quantiles": 10, "method": "exact", "task": "B"})
    assert exact.status_code == 201, exact.text
    body = exact.json()
    assert (body["version"], body["method"], body["rows"], body["rank_error"]) == (1, "exact", 1000, None)
    np.testing.assert_array_equal(np.array(body["boundaries"], dtype=np.float32), numpy_boundaries(rows.values, 10))
    sketch = api.post(base, json={"n_quantiles": 10, "method": "sketch", "wait_for": 10}).json()
    assert sketch["version"] == 2 and sketch["rank_error"] > 0
    assert api.get(f"{base}/latest").json()["id"] == sketch["id"]
    assert api.get(f"{base}/latest", params={"method": "exact"}).json()["id"] == body["id"]
    got = api.get(f"/v1/quantile-sets/{body['id']}")
    assert got.status_code == 200, got.text
    assert got.json()["boundaries"] == body["boundaries"]
    labelled = api.post(base, json={"n_quantiles": 4, "label": 2}).json()
    np.testing.assert_array_equal(
        np.array(labelled["boundaries"], dtype=np.float32), numpy_boundaries(rows.values[np.arange(1000) % 4 == 2], 4)
    )
    bucketed = api.post(f"/v1/quantile-sets/{body['id']}/bucketize", json={"values": rows.values[:50].tolist()})
    expected = quantiles.bucketize(np.array(body["boundaries"], dtype=np.float32), rows.values[:50])
    assert bucketed.json()["buckets"] == expected.tolist()


def test_quantile_errors(service, api):
    run_id, layer_id = make_layer(api, dim=3)
    base = f"/v1/runs/{run_id}/layers/{layer_id}/quantiles"
    assert error_of(api.post(base, json={"n_quantiles": 4}))["field"] == "filter"  # nothing stored yet
    assert api.get(f"{base}/latest").status_code == 404
    post_arrow(api, run_id, layer_id, random_rows(20, 3))
    assert error_of(api.post(base, json={"n_quantiles": 1}))["field"] == "n_quantiles"
    assert error_of(api.post(base, json={"n_quantiles": 2000}))["field"] == "n_quantiles"
    assert error_of(api.post(base, json={"n_quantiles": 4, "method": "median"}))["field"] == "method"
    assert error_of(api.post(base, json={"n_quantiles": 4, "method": "sketch", "label": 1}))["field"] == "label"
    set_id = api.post(base, json={"n_quantiles": 4}).json()["id"]
    bucketize = f"/v1/quantile-sets/{set_id}/bucketize"
    assert error_of(api.post(bucketize, json={"values": [[1, 2]]}))["field"] == "values[0]"
    assert (
        error_of(
            api.post(bucketize, content=b'{"values": [[1, NaN, 2]]}', headers={"content-type": "application/json"})
        )["code"]
        == "non_finite_value"
    )
    assert api.post(bucketize, json={"values": []}).status_code == 422
    assert api.get("/v1/quantile-sets/999999").status_code == 404
    with service.client(service.new_key("beta", "admin")) as other:
        assert other.get(f"/v1/quantile-sets/{set_id}").status_code == 404
        assert other.post(bucketize, json={"values": [[1, 2, 3]]}).status_code == 404
