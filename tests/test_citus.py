"""The store on a real Citus cluster (a coordinator and 2 workers): the layout, routing, and the API.

One distributed database serves the module; each test gets a project of its own, so the
store's own API tests (imported below and run here unchanged) see a store of their own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import psycopg
import pytest

from app import distribute, keys, migrate
from app.database import one_row
from app.ingest import ingest
from app.runs import find_layer
from app.settings import Settings
from tests.conftest import Service, start_service, stop_service
from tests.helpers import make_layer, post_arrow, random_rows, stored_batches, stored_rows

# The store's API tests that matter, run here against the cluster through the service.
from tests.test_ingest import (  # noqa: F401
    test_a_batch_id_reused_for_different_rows_is_a_conflict,
    test_a_retried_batch_is_acknowledged_and_stored_once,
    test_arrow_batch_is_stored_with_its_metadata,
    test_the_same_batch_raced_by_two_writers_is_stored_once,
    test_two_writers_ingest_into_one_layer_at_once,
)
from tests.test_island_store import (  # noqa: F401
    client,
    stored,
    table,
    test_deleting_a_run_deletes_its_island_banks_and_no_others,
    test_nearest_islands_through_the_index_equal_the_exact_scan,
)
from tests.test_memory import (  # noqa: F401
    test_capacity_holds_and_versions_only_grow_under_four_concurrent_writers,
    test_exact_search_is_the_true_top_k,
    test_fifo_replaces_the_oldest,
    test_hnsw_search_agrees_with_exact_and_a_label_filter_never_comes_back_short,
    test_least_confident_replaces_the_least_confident_item,
    test_same_class_lowest_similarity_replaces_within_the_class,
    test_search_counts_hits_of_the_nearest_item,
    test_snapshot_streams_the_whole_bank_with_its_version,
    test_the_change_feed_follows_every_change_in_version_order,
    test_the_change_feed_pages_at_version_boundaries,
)
from tests.test_processes import test_two_service_processes_hold_every_invariant  # noqa: F401
from tests.test_quantiles import test_quantile_routes  # noqa: F401
from tests.test_query import (  # noqa: F401
    filled,
    test_keyset_pages_return_every_row_once_in_order,
)
from tests.test_streams import (  # noqa: F401
    WINDOW_ROWS,
    big_bank,
    rest_client,
    test_a_complete_snapshot_ends_with_its_row_count_and_the_client_accepts_it,
    test_a_complete_stream_ends_with_its_row_count_and_the_client_accepts_it,
    test_a_snapshot_whose_backend_is_killed_midway_breaks_off_instead_of_ending,
    test_a_statement_timeout_after_the_200_breaks_the_stream_off,
    test_a_stream_blocked_in_the_database_aborts_at_the_deadline_and_its_statement_stops,
    test_a_stream_its_reader_stalls_past_the_deadline_is_broken_off_not_resumed,
    test_a_stream_whose_backend_is_killed_midway_breaks_off_instead_of_ending,
    test_the_client_refuses_a_stream_without_a_true_end,
)

DATABASE = "eidetic_citus"


@pytest.fixture(scope="module")
def citus_database(citus_cluster) -> Iterator[str]:
    """A database on the cluster, migrated to head and distributed (twice: the step is idempotent)."""
    url = citus_cluster.create_database(DATABASE)
    migrate.upgrade(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert distribute.distribute(conn)
        assert distribute.distribute(conn)
    yield url
    citus_cluster.drop_database(DATABASE)


@pytest.fixture
def database_url(citus_database: str) -> str:
    return citus_database


@pytest.fixture(scope="module")
def citus_service_url(citus_database: str) -> Iterator[str]:
    # the stream tests' window (tests.test_streams.settings): streams of many record batches
    settings = Settings(
        database_url=None,
        no_auth=False,
        max_body_bytes=8 * 1024 * 1024,
        max_rows_per_batch=50_000,
        stream_window_rows=WINDOW_ROWS,
    )
    server, thread, base_url = start_service(settings, citus_database)
    yield base_url
    stop_service(server, thread)


@pytest.fixture
def service(citus_service_url: str, citus_database: str) -> Service:
    """The service on the cluster with a write key of a project made for this test."""
    with psycopg.connect(citus_database) as conn:
        write_key = keys.create_key(conn, f"p{uuid.uuid4().hex[:12]}", "write")
    return Service(base_url=citus_service_url, database_url=citus_database, write_key=write_key)


@pytest.fixture
def api(service: Service) -> Iterator[httpx.Client]:
    with service.client() as http:
        yield http


def test_the_cluster_has_a_coordinator_and_two_workers(citus_database):
    with psycopg.connect(citus_database) as conn:
        workers = conn.execute("SELECT count(*) FROM citus_get_active_worker_nodes()").fetchone()
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'").fetchone()
    assert workers == (2,)
    assert version is not None and version[0].startswith("14.")


def test_the_layout_is_reference_and_colocated_distributed_tables(citus_database):
    with psycopg.connect(citus_database) as conn:
        rows = conn.execute(
            "SELECT table_name::text, citus_table_type, distribution_column, colocation_id FROM citus_tables"
        ).fetchall()
    layout = {name: (kind, column, group) for name, kind, column, group in rows}
    assert layout["projects"][0] == layout["api_keys"][0] == "reference"
    by_run = {
        t: layout[t]
        for t in ("layers", "ingest_batches", "quantile_sets", "layer_sketches", "sketch_backlog", "activations")
    }
    assert all(kind == "distributed" and column == "run_id" for kind, column, _ in by_run.values())
    assert {group for _, _, group in by_run.values()} == {layout["runs"][2]}
    assert layout["runs"][:2] == ("distributed", "id")
    by_bank = {
        t: layout[t]
        for t in ("memory_items", "memory_tombstones", "memory_hits", "memory_segments", "memory_bank_sizes")
    }
    assert all(kind == "distributed" and column == "bank_id" for kind, column, _ in by_bank.values())
    assert {group for _, _, group in by_bank.values()} == {layout["memory_banks"][2]}


def test_distribute_on_plain_postgresql_changes_nothing(server_url, template_database):
    from tests.conftest import database_url_for

    with psycopg.connect(database_url_for(server_url, template_database), autocommit=True) as conn:
        before = conn.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint ORDER BY 1, 2").fetchall()
        assert distribute.distribute(conn) is False
        after = conn.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint ORDER BY 1, 2").fetchall()
    assert before == after


def test_a_run_and_a_bank_name_stay_unique_in_their_project(api):
    assert api.post("/v1/runs", json={"name": "twice"}).status_code == 201
    assert api.post("/v1/runs", json={"name": "twice"}).status_code == 409
    bank = {"name": "twice", "dim": 3, "metric": "l2", "capacity": 3, "policy": "fifo", "similarity_threshold": 0.9}
    assert api.post("/v1/memory-banks", json=bank).status_code == 201
    assert api.post("/v1/memory-banks", json=bank).status_code == 409


def test_a_batch_that_fails_on_its_worker_midway_leaves_nothing_behind(api, service):
    """The ledger row and the rows commit together on the run's worker, or neither does."""
    run_id, layer_id = make_layer(api, dim=4)
    partition = f"activations_r{run_id}_l{layer_id}"
    with psycopg.connect(service.database_url) as conn:
        layer = find_layer(conn, layer_id)
        # on this layer's partition only: the database is shared by the module's tests
        conn.execute(f"ALTER TABLE {partition} ADD CONSTRAINT label_small CHECK (label IS NULL OR label < 100)")
        conn.commit()
        with pytest.raises(psycopg.Error, match="label_small"):  # the worker's error, relayed
            ingest(conn, layer, "half", random_rows(500, 4, label=np.arange(500)))
        conn.rollback()
    assert stored_rows(service.database_url, layer_id) == 0
    assert stored_batches(service.database_url, layer_id) == 0
    assert post_arrow(api, run_id, layer_id, random_rows(50, 4), batch_id="half").status_code == 201
    assert stored_rows(service.database_url, layer_id) == 50


def _explain(conn: psycopg.Connection, statement: str, params: tuple = ()) -> str:
    return "\n".join(row[0] for row in conn.execute("EXPLAIN (COSTS OFF) " + statement, params))


def test_a_run_filtered_read_and_quantiles_push_down_to_one_worker(api, service):
    run_id, layer_id = make_layer(api, dim=4)
    assert post_arrow(api, run_id, layer_id, random_rows(200, 4, step=3), batch_id="b").status_code == 201
    partition = f"activations_r{run_id}_l{layer_id}"
    with psycopg.connect(service.database_url) as conn:
        read = _explain(
            conn,
            f"SELECT b.batch_id, a.row_no, a.values FROM {partition} a "
            "JOIN ingest_batches b ON b.run_id = a.run_id AND b.id = a.batch_seq "
            "WHERE a.run_id = %s AND a.step >= 0 ORDER BY a.batch_seq, a.row_no LIMIT 100",
            (run_id,),
        )
        exact = _explain(
            conn,
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY a.step) FROM activations a "
            "WHERE a.run_id = %s AND a.layer_id = %s",
            (run_id, layer_id),
        )
        summary = _explain(conn, "SELECT count(*) FROM activations a WHERE a.run_id = %s", (run_id,))
    for plan in (read, exact, summary):
        assert "Task Count: 1" in plan, plan


def test_a_searchs_ef_search_reaches_the_worker(api, service):
    """The search sets hnsw.ef_search for its transaction; on the worker an HNSW scan returns at most
    ef_search rows, so 100 rows from one scan show the worker searched with the service's setting, not 40."""
    bank = api.post(
        "/v1/memory-banks",
        json={"name": "ef", "dim": 3, "metric": "l2", "capacity": 500, "policy": "none", "merge_threshold": 0},
    ).json()
    items = [{"key": [float(i), float(i % 7), 1.0], "label": i % 3} for i in range(300)]
    assert api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items}).status_code == 200
    with psycopg.connect(service.database_url) as conn:
        assert conn.execute("SHOW citus.propagate_set_commands").fetchone() == ("local",)
        conn.execute("SET LOCAL hnsw.ef_search = 100")
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        conn.execute("SET LOCAL enable_sort = off")
        statement = (
            f"SELECT count(*) FROM (SELECT id FROM memory_items_b{bank['id']} WHERE bank_id = %s "
            "ORDER BY key::vector(3) <-> '[1,1,1]'::vector(3) LIMIT 150) s"
        )
        assert conn.execute(statement, (bank["id"],)).fetchone() == (100,)


def test_a_bank_search_goes_to_its_shard_and_uses_its_hnsw_index(api, service):
    bank = api.post(
        "/v1/memory-banks",
        json={
            "name": "b",
            "dim": 3,
            "metric": "l2",
            "capacity": 50,
            "policy": "none",
            "similarity_threshold": 0.9,
            "merge_threshold": 0,  # one live index over the bank's partition
        },
    ).json()
    items = [{"key": [float(i), 1.0, 0.0], "label": i % 3} for i in range(40)]
    assert api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items}).status_code == 200
    with psycopg.connect(service.database_url) as conn:
        # a 40-row bank would be scanned: the worker is told to prefer indexes for this transaction
        conn.execute("SET LOCAL citus.propagate_set_commands TO 'local'")
        conn.execute("SET LOCAL enable_seqscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        conn.execute("SET LOCAL enable_sort = off")
        plan = _explain(
            conn,
            f"SELECT id FROM memory_items_b{bank['id']} WHERE bank_id = %s "
            "ORDER BY key::vector(3) <-> '[1,1,0]'::vector(3) LIMIT 5",
            (bank["id"],),
        )
    assert "Task Count: 1" in plan, plan
    assert f"memory_items_b{bank['id']}_hnsw" in plan, plan


def _temp_bytes(url: str) -> int:
    """Bytes the coordinator's backends spilled to temporary files in this database so far."""
    with psycopg.connect(url, autocommit=True) as conn:
        return one_row(conn.execute("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()"))[0]


def test_a_snapshot_streams_through_the_coordinator_without_materialising_the_bank(api, service):
    """A coordinator materialises a server-side cursor's whole result before its first fetch; the
    snapshot reads keyset chunks instead, so the coordinator holds a chunk, never the bank."""
    bank_id = big_bank(api)  # 24 MB of items: six times the coordinator's work_mem
    time.sleep(1.1)  # backends report to the statistics at most once a second
    before = _temp_bytes(service.database_url)
    with rest_client(service) as eidetic_client:
        assert eidetic_client.snapshot_table(bank_id).num_rows == 1500
    time.sleep(1.1)
    assert _temp_bytes(service.database_url) - before < 1 << 20
