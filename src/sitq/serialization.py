"""Serializers turn task calls and results into bytes and back.

The default, :class:`CloudpickleSerializer`, handles functions defined anywhere
(lambdas and closures included). :class:`JsonSerializer` is for payloads that other
languages must read; it is what messages use.
"""

from __future__ import annotations

import json
import pickle
import reprlib
from typing import Any, Protocol, cast, runtime_checkable

import cloudpickle

from sitq.errors import SerializationError
from sitq.validation import implementation


@runtime_checkable
class Serializer(Protocol):
    """Turns Python objects into bytes and back."""

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


#: The most bytes sitq stores for one task call, result or message payload. Past
#: about 512 MiB PostgreSQL can store a bytea it cannot send back (it goes out as
#: hex text, twice the size, over its 1 GiB limit), and SQLite rewrites a job's whole
#: row at each lease renewal: a worker renewing a 100 MB task's lease blocked its
#: loop for 0.6 s. Data that large belongs elsewhere, passed by reference.
MAX_PAYLOAD_BYTES = 64 * 2**20


def stored_bytes(data: object, what: str) -> bytes:
    """What a serializer's ``dumps`` returned for ``what``, if sitq can store it:
    ``bytes`` (a custom serializer's str or int was stored as something else, or
    refused, depending on the backend) of at most ``MAX_PAYLOAD_BYTES``."""
    if not isinstance(data, bytes):
        raise SerializationError(
            f"{what}: the serializer's dumps returned {type(data).__name__}, not bytes"
        )
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SerializationError(
            f"{what} is {len(data):,} bytes serialized, over sitq's limit of "
            f"{MAX_PAYLOAD_BYTES:,}: store large data elsewhere and pass a reference"
        )
    return data


def checked(serializer: object) -> Serializer:
    """``serializer`` if it is an object with the Serializer methods; ValidationError if
    not (a class has them too, unbound)."""
    return cast(Serializer, implementation(serializer, "serializer", ("dumps", "loads")))


class CloudpickleSerializer:
    """Pickles with cloudpickle: any function, any picklable argument.

    Most task calls and results need none of cloudpickle's powers: a function
    importable by name, ids and strings as arguments. Those go through the standard
    library's C pickler, which cloudpickle itself falls back on for everything it
    pickles by reference (so the payload means the same), faster: measured here,
    5 us instead of 9 us to serialize a task call, 2.3 us instead of 4.3 us for a
    ``None`` result.
    """

    def dumps(self, obj: Any) -> bytes:
        if obj is None:  # what most tasks return
            return _PICKLED_NONE
        try:
            data = _by_reference_only(obj)
            if data is None:
                data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
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
        except RecursionError:
            # Written by something other than sitq, which limits the depth it stores.
            raise SerializationError("stored JSON is nested too deeply to read") from None


_PICKLED_NONE = pickle.dumps(None, protocol=pickle.HIGHEST_PROTOCOL)


def _by_reference_only(obj: Any) -> bytes | None:
    """``obj`` pickled by the standard pickler, or None where cloudpickle must do it.

    The standard pickler refuses what only cloudpickle can pickle (lambdas, local
    functions and classes) and pickles every function and class it accepts by
    reference: module and name. cloudpickle does the same, except for two kinds of
    module whose functions and classes it pickles by value: ``__main__``, which a
    worker in another process does not share, and modules registered with
    ``cloudpickle.register_pickle_by_value``. A pickle naming either is discarded
    (a chance match in an argument's text only costs the fast path).
    """
    try:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None
    if b"__main__" in data:
        return None
    by_value = cloudpickle.list_registry_pickle_by_value()  # usually empty
    if by_value and any(name.encode() in data for name in by_value):
        return None
    return data


_SHORT_REPR = reprlib.Repr()  # its limits as attributes: Python 3.11 takes no arguments
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = 160


def _describe(obj: Any) -> str:
    """A short repr of ``obj`` for an error message. Never raises: the message says
    why ``obj`` could not be pickled, and a failing ``repr`` (an int past Python's
    digit limit, a broken ``__repr__``) must not take its place."""
    try:
        text = _SHORT_REPR.repr(obj)  # bounded: a huge list is not rendered whole
    except BaseException:  # SystemExit from a __repr__ too
        return f"a {type(obj).__name__} object"
    return text if len(text) <= 200 else text[:197] + "..."


DEFAULT_SERIALIZER: Serializer = CloudpickleSerializer()
