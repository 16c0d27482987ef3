"""API keys: hashed, scoped and confined to their project."""

import hashlib

import httpx
import psycopg
import pytest

from tests.helpers import error_of, make_layer


def test_every_v1_route_needs_a_bearer_key(service):
    with service.client(key="eid_nope_nope") as stranger:
        response = stranger.get("/v1/runs")
    assert response.status_code == 401
    assert error_of(response)["field"] == "Authorization"

    response = httpx.get(f"{service.base_url}/v1/runs")
    assert response.status_code == 401
    assert error_of(response)["code"] == "unauthenticated"


def test_health_needs_no_key(service):

    assert httpx.get(f"{service.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{service.base_url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"


def test_keys_are_stored_hashed_never_plain(service):
    with psycopg.connect(service.database_url) as conn:
        stored = conn.execute("SELECT key_hash FROM api_keys").fetchall()
    assert hashlib.sha256(service.write_key.encode()).digest() in {bytes(row[0]) for row in stored}
    with psycopg.connect(service.database_url) as conn:
        dump = conn.execute("SELECT string_agg(t::text, ' ') FROM api_keys t").fetchone()[0]
    assert service.write_key not in dump


def test_a_read_key_reads_but_cannot_write(service, api):
    run_id, _ = make_layer(api)
    with service.client(service.new_key("alpha", "read")) as reader:
        assert reader.get(f"/v1/runs/{run_id}").status_code == 200
        response = reader.post("/v1/runs", json={"name": "nope"})
        assert response.status_code == 403
        assert error_of(response)["code"] == "forbidden"
        assert reader.delete(f"/v1/runs/{run_id}").status_code == 403
    assert api.get(f"/v1/runs/{run_id}").status_code == 200


@pytest.mark.parametrize("method, suffix", [("get", ""), ("delete", ""), ("get", "/layers"), ("post", "/layers")])
def test_another_projects_run_is_not_found(service, api, method, suffix):
    run_id, _ = make_layer(api)
    with service.client(service.new_key("beta", "admin")) as other:
        kwargs = {"json": {"name": "x", "dim": 2}} if method == "post" else {}
        response = getattr(other, method)(f"/v1/runs/{run_id}{suffix}", **kwargs)
        assert response.status_code == 404
        assert error_of(response)["code"] == "not_found"
        assert other.get("/v1/runs").json() == {"runs": []}
    assert api.get(f"/v1/runs/{run_id}").status_code == 200


def test_a_revoked_key_is_refused(service, api):
    from app import keys

    key = service.new_key("alpha", "write")
    with service.client(key) as client:
        assert client.get("/v1/runs").status_code == 200
        with psycopg.connect(service.database_url) as conn:
            assert keys.revoke_key(conn, key.split("_")[1])
        assert client.get("/v1/runs").status_code == 401
