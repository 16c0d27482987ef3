"""The OpenAPI schema fuzzed with schemathesis over HTTP: no 5xx, and every answer as documented.

Binary bodies are fuzzed with real content: for the ingest route, schemathesis generates the
logical batch (the JSON form's schema) and custom serializers turn it into an Arrow IPC
stream or a .npy array, so the server's Arrow and .npy parsers meet out-of-range integers,
odd types, odd text and ragged rows, not only garbage bytes.
"""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from app.settings import Settings
from eidetic.wire.formats import ARROW_STREAM, NPY
from tests.conftest import start_service, stop_service

BINARY_MEDIA = (ARROW_STREAM, NPY)


def _batch(value: Any) -> tuple[list[dict], str | None] | None:
    if isinstance(value, dict) and isinstance(value.get("rows"), list):
        rows = [row for row in value["rows"] if isinstance(row, dict)]
        batch_id = value.get("batch_id")
        return rows, batch_id if isinstance(batch_id, str) else None
    return None


@schemathesis.serializer(ARROW_STREAM)
def arrow_body(ctx, value) -> bytes:
    """The generated batch as an Arrow IPC stream (columns as pyarrow infers them)."""
    batch = _batch(value)
    if batch is None:
        return value if isinstance(value, bytes) else json.dumps(value, default=str).encode()
    rows, batch_id = batch
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        return json.dumps(value, default=str).encode("utf-8", "surrogatepass")  # not Arrow: must be a 400
    if batch_id is not None:
        table = table.replace_schema_metadata({b"batch_id": batch_id.encode("utf-8", "surrogatepass")})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


@schemathesis.serializer(NPY)
def npy_body(ctx, value) -> bytes:
    """The generated batch as .npy: a structured array when its columns allow one, else the matrix."""
    batch = _batch(value)
    if batch is None:
        return value if isinstance(value, bytes) else json.dumps(value, default=str).encode()
    rows, _ = batch
    buffer = io.BytesIO()
    try:
        values = np.asarray([row.get("values") for row in rows], dtype=np.float64)
        labels = [row.get("label") for row in rows]
        if values.ndim == 2 and rows and all(isinstance(label, int) and abs(label) < 2**63 for label in labels):
            array = np.zeros(len(rows), dtype=[("values", np.float64, (values.shape[1],)), ("label", np.int64)])
            array["values"], array["label"] = values, labels
        else:
            array = values
        np.save(buffer, array, allow_pickle=False)
    except (ValueError, TypeError, OverflowError):
        return json.dumps(value, default=str).encode("utf-8", "surrogatepass")
    return buffer.getvalue()


def _schema_with_logical_binary_bodies(schema: dict) -> dict:
    """For fuzzing only: the Arrow and .npy bodies of ingest generated from the JSON batch's schema."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                for media in BINARY_MEDIA:
                    if media in content:
                        content[media] = {"schema": content["application/json"]["schema"]}
    return schema


def fuzz_with_body(operation, media: str, path_parameters: dict[str, int], checks: list):
    """A hypothesis test of one operation whose body is sent as `media` to an existing layer."""

    @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(media_type=media))
    def fuzz(case):
        case.path_parameters = dict(path_parameters)
        case.media_type = media  # as_strategy picks any documented media type; pin this one
        case.call_and_validate(checks=checks)

    return fuzz


@pytest.fixture
def open_service(database_url):
    """The service with auth off (loopback), so generated requests reach the routes' own checks."""
    settings = Settings(no_auth=True, max_body_bytes=1024 * 1024, max_rows_per_batch=1000)
    server, thread, base_url = start_service(settings, database_url)
    yield base_url
    stop_service(server, thread)


@pytest.fixture
def small_layer(open_service) -> dict[str, int]:
    """A layer of two units, so generated batches get past the dimension check to the parsers' others."""
    run = httpx.post(f"{open_service}/v1/runs", json={"name": "fuzz"}).json()
    layer = httpx.post(f"{open_service}/v1/runs/{run['id']}/layers", json={"name": "l", "dim": 2}).json()
    return {"run_id": run["id"], "layer_id": layer["id"]}


def test_no_generated_input_produces_a_server_error_or_an_undocumented_answer(open_service, small_layer):
    document = _schema_with_logical_binary_bodies(httpx.get(f"{open_service}/openapi.json").json())
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=open_service)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # every route of the contract is in the schema
    binary = [op for op in operations if set(BINARY_MEDIA) <= {m.media_type for m in op.body}]
    assert binary, "the ingest route documents Arrow and .npy bodies"
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    failures = []
    for operation in operations:

        @hsettings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(checks=checks)

        try:
            fuzz()
        except Exception as error:  # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {str(error)[:600]}")
    for operation in binary:
        for media in BINARY_MEDIA:
            try:
                fuzz_with_body(operation, media, small_layer, checks)()
            except Exception as error:
                failures.append(f"{operation.label} as {media}: {str(error)[:600]}")
    assert not failures, "\n\n".join(failures)
