"""The exception hierarchy: every error sitq raises derives from :class:`SitqError`.

Driver errors (``sqlite3``, ``psycopg``) are translated at the backend boundary into
:class:`BackendError` with the original kept as ``__cause__``.
"""

from __future__ import annotations


class SitqError(Exception):
    """Root of every exception sitq raises."""


class ValidationError(SitqError, ValueError):
    """An argument given to the public API is invalid (bad ``eta``, unknown option...)."""


class SerializationError(SitqError, ValueError):
    """A task, its arguments or its result cannot be serialized or deserialized."""


class BackendError(SitqError):
    """The storage backend failed (database unreachable, locked, corrupt...)."""


class StorageUnavailableError(BackendError):
    """The storage could not be reached in time, or cannot take the call now
    (PostgreSQL down, out of connections, read-only, cancelling statements past its
    timeouts or in conflicts past the retries; an SQLite file locked past the wait,
    its disk full or failing): the same call may succeed later. Other
    ``BackendError`` are the storage refusing the call itself."""


class TaskNotFoundError(SitqError, LookupError):
    """No task or message has the given id."""


class LeaseLostError(SitqError):
    """The consumer no longer holds the message: its visibility timeout ran out and
    another consumer dequeued it, or it was archived, released or deleted."""


class ResultTimeoutError(SitqError, TimeoutError):
    """``get_result(timeout=...)`` gave up before the task finished."""


class TaskTimeoutError(SitqError, TimeoutError):
    """A task ran longer than its ``timeout``; recorded as the task's failure."""

    def __init__(self, seconds: float) -> None:
        # The timeout as given (``:g`` printed 1234567 as 1.23457e+06), without ".0".
        shown = repr(float(seconds)).removesuffix(".0")
        super().__init__(f"task timed out after {shown} s")
        self.seconds = seconds


class WorkerError(SitqError):
    """The worker was used wrongly (started twice, stopped before starting...)."""


class SyncClientError(SitqError, RuntimeError):
    """``SyncTaskQueue`` was called from inside a running event loop."""


class Retry(SitqError):  # noqa: N818 - reads as an instruction: raise Retry(delay=5)
    """Raise from inside a task to ask for another attempt.

    ``delay`` (seconds) overrides the backoff policy for this retry. The retry counts
    against the task's ``max_retries`` unless the task has none left, in which case
    the task fails with this exception.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or "task asked to be retried")
        if delay is not None:
            # Imported here because sitq.scheduling imports this module. Checked now so
            # a bad delay fails the task that raised it, not the worker computing when
            # to run it again.
            from sitq.scheduling import seconds_from

            delay = seconds_from(delay, "Retry delay").total_seconds()
        self.delay = delay
