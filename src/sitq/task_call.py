"""What a task's payload holds: the call, plus the options the worker needs to run it.

The envelope is a plain dict so that payloads written by one sitq version stay
readable by the next (unknown keys are ignored, missing ones take defaults).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sitq.errors import SerializationError
from sitq.scheduling import RetryPolicy
from sitq.serialization import Serializer, stored_bytes


@dataclass(frozen=True, slots=True)
class TaskCall:
    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout: float | None
    retry: RetryPolicy

    def dumps(self, serializer: Serializer) -> bytes:
        envelope = {
            "func": self.func,
            "args": self.args,
            "kwargs": self.kwargs,
            "timeout": self.timeout,
            "retry": (
                self.retry.max_retries,
                self.retry.backoff,
                self.retry.factor,
                self.retry.max_backoff,
                self.retry.jitter,
            ),
        }
        try:
            return stored_bytes(serializer.dumps(envelope), "the call")
        except SerializationError as exc:
            raise SerializationError(
                f"cannot enqueue {_name(self.func)}: its function or arguments cannot be "
                f"serialized ({exc}); nothing was stored"
            ) from exc

    @classmethod
    def loads(cls, data: bytes, serializer: Serializer) -> TaskCall:
        envelope = serializer.loads(data)
        return cls(
            func=envelope["func"],
            args=tuple(envelope["args"]),
            kwargs=dict(envelope["kwargs"]),
            timeout=envelope.get("timeout"),
            retry=_retry_policy(*envelope["retry"]),
        )


@functools.lru_cache(maxsize=64)
def _retry_policy(
    max_retries: int, backoff: float, factor: float, max_backoff: float, jitter: bool
) -> RetryPolicy:
    """The (frozen, so shareable) policy of a task: most tasks share a few, and
    building one validates every field."""
    return RetryPolicy(max_retries, backoff, factor, max_backoff, jitter)


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
