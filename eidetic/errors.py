"""Errors as data: every failure the API reports is one of these, mapped to one JSON shape."""

from __future__ import annotations


class EideticError(Exception):
    """A failure with a stable machine-readable code, a message for people and the field at fault."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class InvalidInput(EideticError):
    status_code = 422
    code = "invalid_input"


class DimensionMismatch(InvalidInput):
    code = "dimension_mismatch"


class NonFiniteValue(InvalidInput):
    code = "non_finite_value"


class ZeroVector(InvalidInput):
    """Cosine similarity is undefined for a vector of length zero."""

    code = "zero_vector"


class VectorTooLarge(InvalidInput):
    code = "vector_too_large"


class MalformedBody(EideticError):
    status_code = 400
    code = "malformed_body"


class UnsupportedMediaType(EideticError):
    status_code = 415
    code = "unsupported_media_type"


class PayloadTooLarge(EideticError):
    status_code = 413
    code = "payload_too_large"


class NotFound(EideticError):
    status_code = 404
    code = "not_found"


class Conflict(EideticError):
    status_code = 409
    code = "conflict"


class Unauthenticated(EideticError):
    status_code = 401
    code = "unauthenticated"


class Forbidden(EideticError):
    status_code = 403
    code = "forbidden"


class Unavailable(EideticError):
    status_code = 503
    code = "unavailable"


class DeadlineExceeded(Unavailable):
    """The request's deadline passed; like every 503, the outcome of a write is unknown: retry it."""

    code = "deadline_exceeded"
