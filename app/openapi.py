"""The OpenAPI schema as the service really answers: one error envelope for every error status.

FastAPI documents its own `{"detail": ...}` validation error, which this service never
sends; the schema is rewritten once, when first asked for, so clients generated from it
(and the schema fuzz test) see the `{"error": {...}}` envelope every 4xx and 5xx carries.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas import ActivationBatchIn, ErrorOut, ItemsIn

ERROR_REF = "#/components/schemas/ErrorOut"
ERROR_DESCRIPTIONS = {
    400: "The body is not readable (malformed JSON, Arrow or .npy).",
    401: "No valid API key: checked before the body is read.",
    403: "The key's scope does not allow this.",
    404: "No such route or resource in the caller's project.",
    409: "Conflicts with what is stored (e.g. `batch_id_conflict`: a used batch id with other content).",
    413: "The body or batch is over the service's limits.",
    415: "The body's media type is not one this route reads.",
    422: "A value is invalid (unknown field or parameter, wrong type, range, dimension, NaN, zero vector...).",
    503: "The database is unavailable or the deadline passed: the outcome is unknown, retry (ingest: "
    "with the same batch id).",
}
_EVERY_ROUTE = (422,)
_V1_ROUTES = (401, 403, 404, 503)
_WITH_BODY = (400, 413)
# Documented by the route itself (beside its own answers), not assumed for all: 409, 415.
_MODELS_REFERENCED_FROM_EXTRA = (ActivationBatchIn, ItemsIn)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route has beyond the common ones."""
    return {status: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = _with_error_envelope(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _with_error_envelope(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorOut"] = ErrorOut.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(components["ErrorOut"].pop("$defs", {}))
    for model in _MODELS_REFERENCED_FROM_EXTRA:
        described = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(described.pop("$defs", {}))
        components[model.__name__] = described
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            statuses = set(_EVERY_ROUTE)
            if path.startswith("/v1/"):
                statuses.update(_V1_ROUTES)
                if "requestBody" in operation:
                    statuses.update(_WITH_BODY)
            responses = operation.setdefault("responses", {})
            statuses.update(int(status) for status in responses if status.isdigit() and int(status) >= 400)
            for status in sorted(statuses):
                if path == "/readyz" and status == 503:
                    continue  # readiness answers with its own body, for load balancers
                responses[str(status)] = {
                    "description": ERROR_DESCRIPTIONS.get(status, "An error."),
                    "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
