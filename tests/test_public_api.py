"""The public surface is what the docs promise, and it is typed."""

from __future__ import annotations

from pathlib import Path

import sitq

# The names the docs (README, docs/*.md, spec 000/003/004) use from `sitq`.
DOCUMENTED = {
    "TaskQueue", "SyncTaskQueue", "Worker", "SQLiteBackend", "MemoryBackend",
    "PostgresBackend", "Result", "Task", "ReservedTask", "TaskStatus", "RetryPolicy",
    "Retry", "FakeClock", "Producer", "Consumer", "Message", "DeadLetter", "SitqError",
    "ValidationError", "SerializationError", "ResultTimeoutError", "SyncClientError",
    "TaskTimeoutError", "LeaseLostError", "TaskNotFoundError",
}  # fmt: skip


def test_every_documented_name_is_exported() -> None:
    assert DOCUMENTED <= set(sitq.__all__)
    for name in sitq.__all__:
        assert getattr(sitq, name) is not None


def test_every_exception_shares_one_root() -> None:
    errors = [
        getattr(sitq, name)
        for name in sitq.__all__
        if isinstance(getattr(sitq, name), type) and issubclass(getattr(sitq, name), Exception)
    ]
    assert errors and all(issubclass(error, sitq.SitqError) for error in errors)


def test_timeout_errors_are_builtin_timeouts_and_bad_input_is_a_value_error() -> None:
    assert issubclass(sitq.ResultTimeoutError, TimeoutError)
    assert issubclass(sitq.ValidationError, ValueError)


def test_package_is_typed() -> None:
    assert (Path(sitq.__file__).parent / "py.typed").is_file()
