"""Text from requests: the one check that a string can be stored in PostgreSQL as it is.

JSON may carry lone UTF-16 surrogates ("\\ud800") and Arrow may carry bytes that are not
UTF-8; PostgreSQL refuses both (and NUL) only when the row is written, far from the field
that caused it. Every text field is checked here first, so the error names the field.
"""

from __future__ import annotations

MAX_NAME_LENGTH = 200


def text_problem(value: str, max_length: int = MAX_NAME_LENGTH) -> str | None:
    """Why `value` cannot be stored, or None when it can."""
    if not value:
        return "may not be empty"
    if len(value) > max_length:
        return f"has at most {max_length} characters, not {len(value)}"
    if "\x00" in value:
        return "may not hold NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    return None
