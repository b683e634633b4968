"""Serializers turn task calls and results into bytes and back.

The default, :class:`CloudpickleSerializer`, handles functions defined anywhere
(lambdas and closures included). :class:`JsonSerializer` is for payloads that other
languages must read; it is what messages use.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, runtime_checkable

import cloudpickle

from sitq.errors import SerializationError


@runtime_checkable
class Serializer(Protocol):
    """Turns Python objects into bytes and back."""

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class CloudpickleSerializer:
    """Pickles with cloudpickle: any function, any picklable argument."""

    def dumps(self, obj: Any) -> bytes:
        try:
            data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            return data
        except Exception as exc:
            raise SerializationError(f"cannot pickle {_describe(obj)}: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(f"cannot unpickle stored data: {exc}") from exc


class JsonSerializer:
    """Compact UTF-8 JSON; rejects anything JSON cannot represent exactly."""

    def dumps(self, obj: Any) -> bytes:
        try:
            return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"payload is not JSON-serializable: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError as exc:
            raise SerializationError(f"stored data is not valid JSON: {exc}") from exc


def _describe(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:197] + "..."


DEFAULT_SERIALIZER: Serializer = CloudpickleSerializer()
