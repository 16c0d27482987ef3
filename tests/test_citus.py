"""The store on a real Citus cluster (a coordinator and 2 workers): schema, routing and the API."""

from __future__ import annotations

import psycopg


def test_the_cluster_has_a_coordinator_and_two_workers(citus_cluster):
    url = citus_cluster.create_database("eidetic_citus_probe")
    try:
        with psycopg.connect(url) as conn:
            workers = conn.execute("SELECT count(*) FROM citus_get_active_worker_nodes()").fetchone()
            version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'").fetchone()
        assert workers == (2,)
        assert version is not None and version[0].startswith("14.")
    finally:
        citus_cluster.drop_database("eidetic_citus_probe")
