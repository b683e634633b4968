"""Message payloads: JSON only, checked at enqueue so a consumer never gets a surprise."""

from __future__ import annotations

import math
from typing import Any

from sitq.errors import SerializationError
from sitq.serialization import JsonSerializer

JSON = JsonSerializer()


def encode_payload(payload: Any) -> bytes:
    """The payload as compact JSON bytes; raise ``SerializationError`` if it is not JSON.

    Only what comes back *equal* from JSON is accepted: ``None``, ``bool``, ``int``,
    finite ``float``, ``str``, ``list`` and ``dict`` with ``str`` keys. A tuple, a
    set, a datetime or a dict with int keys would come back different (or not at all)
    in the consumer, so they are rejected here rather than surprising it there.
    """
    try:
        _check_json(payload, "payload")
        return JSON.dumps(payload)
    except RecursionError:
        raise SerializationError("payload is nested too deeply (or is circular)") from None


def payload_or_bytes(data: bytes | None) -> Any:
    """A stored payload's JSON value, or the bytes themselves when they are not JSON
    (a body written by something other than sitq), for listings that must show it."""
    if data is None:
        return None
    try:
        return JSON.loads(data)
    except SerializationError:
        return data


def _check_json(value: Any, path: str) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SerializationError(f"{path} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SerializationError(
                    f"{path} has a {type(key).__name__} key {key!r}; JSON keys are strings"
                )
            _check_json(item, f"{path}[{key!r}]")
        return
    hint = " (use a list)" if isinstance(value, tuple) else ""
    raise SerializationError(
        f"{path} is a {type(value).__name__}, which is not JSON{hint}; "
        "payloads are None, bool, int, float, str, list or dict with str keys"
    )
