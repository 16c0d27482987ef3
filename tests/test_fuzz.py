"""The OpenAPI schema fuzzed with schemathesis over HTTP: no generated input may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hsettings
from schemathesis.checks import not_a_server_error

from app.settings import Settings
from tests.conftest import start_service, stop_service


@schemathesis.serializer("application/vnd.apache.arrow.stream", "application/x-npy")
def raw_bytes(ctx, value) -> bytes:
    """Binary bodies are sent as generated: mostly garbage, which must come back as a 4xx."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture
def open_service(database_url):
    """The service with auth off (loopback), so generated requests reach the routes' own checks."""
    settings = Settings(no_auth=True, max_body_bytes=1024 * 1024, max_rows_per_batch=1000)
    server, thread, base_url = start_service(settings, database_url)
    yield base_url
    stop_service(server, thread)


def test_no_generated_input_produces_a_server_error(open_service):
    schema = schemathesis.openapi.from_url(f"{open_service}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # every route of the contract is in the schema
    failures = []
    for operation in operations:

        @hsettings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error])

        try:
            fuzz()
        except Exception as error:  # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {str(error)[:600]}")
    assert not failures, "\n\n".join(failures)
