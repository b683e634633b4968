"""Argument checks shared by the public API: each raises a ValidationError naming the
argument, before anything is stored, and enforces the strictest backend's limits so
that what one backend accepts, every backend accepts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sitq.errors import ValidationError

T = TypeVar("T")

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


def implementation(value: T, name: str, methods: Sequence[str]) -> T:
    """``value`` if it is an object (not a class) with the callable ``methods``: a
    class passed for its instance has them too, as unbound functions, and failed
    only at first use (a worker failed every task it claimed)."""
    if isinstance(value, type) or not all(callable(getattr(value, m, None)) for m in methods):
        wanted = " and ".join(f"{method}()" for method in methods)
        raise ValidationError(
            f"{name} must be an object with {wanted} methods (an instance, not a class), "
            f"got {value!r}"
        )
    return value


def worker_name(value: object, name: str = "name") -> str:
    """A worker's or consumer's name: storable text, not empty, without control
    characters. Its holder string joins name, kind and queue with a control
    character; one inside a name let a consumer settle jobs another one held."""
    text = storable_text(value, name)
    if not text:
        raise ValidationError(f"{name} must not be empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ValidationError(f"{name} must not contain control characters, got {text!r}")
    return text
