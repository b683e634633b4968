"""Argument checks shared by the public API: each raises a ValidationError naming the
argument, before anything is stored, and enforces the strictest backend's limits so
that what one backend accepts, every backend accepts."""

from __future__ import annotations

from sitq.errors import ValidationError

#: The range of PostgreSQL's ``integer``, the column type of priorities and attempt
#: and delivery counts.
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def int_in_range(value: object, name: str, low: int, high: int) -> int:
    """An int (not a bool) from ``low`` to ``high`` inclusive."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValidationError(f"{name} must be between {low} and {high}, got {value}")
    return value


def storable_text(value: object, name: str) -> str:
    """A str every backend stores as given: PostgreSQL's text refuses NUL, and a lone
    surrogate has no UTF-8 encoding (so neither SQLite nor PostgreSQL can take it)."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(f"{name} must not contain NUL characters, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            f"{name} must be valid Unicode (no lone surrogates), got {value!r}"
        ) from None
    return value
