"""Message payloads: JSON only, checked at enqueue so a consumer never gets a surprise."""

from __future__ import annotations

import math
from typing import Any

from sitq.errors import SerializationError
from sitq.serialization import JsonSerializer, stored_bytes

JSON = JsonSerializer()

#: How deep lists and dicts may nest in a payload. Fixed, so what is accepted does not
#: depend on how deep the caller's stack is, and low enough that any consumer can read
#: it back: Python's parser recurses once per level, against the recursion limit.
MAX_PAYLOAD_DEPTH = 200


def encode_payload(payload: Any) -> bytes:
    """The payload as compact JSON bytes; raise ``SerializationError`` if it is not JSON.

    Only what comes back *equal* from JSON is accepted: ``None``, ``bool``, ``int``,
    finite ``float``, ``str``, ``list`` and ``dict`` with ``str`` keys. A tuple, a
    set, a datetime or a dict with int keys would come back different (or not at all)
    in the consumer, so they are rejected here rather than surprising it there.
    """
    _check_json(payload, "payload", 0)
    return stored_bytes(JSON.dumps(payload), "the payload")


def payload_or_bytes(data: bytes | None) -> Any:
    """A stored payload's JSON value, or the bytes themselves when they are not JSON
    (a body written by something other than sitq), for listings that must show it."""
    if data is None:
        return None
    try:
        return JSON.loads(data)
    except SerializationError:
        return data


def _check_json(value: Any, path: str, depth: int) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SerializationError(f"{path} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, list | dict) and depth == MAX_PAYLOAD_DEPTH:
        raise SerializationError(
            f"payload nests lists and dicts more than {MAX_PAYLOAD_DEPTH} deep (or is circular)"
        )
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SerializationError(
                    f"{path} has a {type(key).__name__} key {key!r}; JSON keys are strings"
                )
            _check_json(item, f"{path}[{key!r}]", depth + 1)
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    raise SerializationError(
        f"{path} is a {type(value).__name__}, which is not JSON{hint}; "
        "payloads are None, bool, int, float, str, list or dict with str keys"
    )
