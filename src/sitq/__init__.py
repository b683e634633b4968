"""sitq: a task queue that runs on one SQLite file or on PostgreSQL, correct under crashes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sitq.backends.base import Backend
from sitq.backends.memory import MemoryBackend
from sitq.backends.sqlite import SQLiteBackend
from sitq.clock import Clock, FakeClock, SystemClock
from sitq.core import DeadLetter, Message, ReservedTask, Result, Task, TaskStatus
from sitq.errors import (
    BackendError,
    LeaseLostError,
    ResultTimeoutError,
    Retry,
    SerializationError,
    SitqError,
    StorageUnavailableError,
    SyncClientError,
    TaskNotFoundError,
    TaskTimeoutError,
    ValidationError,
    WorkerError,
)
from sitq.messages import Consumer, Producer
from sitq.metrics import QueueMetrics
from sitq.queue import TaskQueue
from sitq.scheduling import RetryPolicy
from sitq.serialization import CloudpickleSerializer, JsonSerializer, Serializer
from sitq.sync import SyncTaskQueue
from sitq.worker import Worker

if TYPE_CHECKING:
    from sitq.backends.postgres import PostgresBackend


def __getattr__(name: str) -> object:
    # PostgresBackend needs psycopg (the `postgres` extra): import it only when asked.
    if name == "PostgresBackend":
        from sitq.backends.postgres import PostgresBackend

        return PostgresBackend
    raise AttributeError(f"module 'sitq' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BackendError",
    "Clock",
    "CloudpickleSerializer",
    "Consumer",
    "DeadLetter",
    "FakeClock",
    "JsonSerializer",
    "LeaseLostError",
    "MemoryBackend",
    "Message",
    "PostgresBackend",
    "Producer",
    "QueueMetrics",
    "ReservedTask",
    "Result",
    "ResultTimeoutError",
    "Retry",
    "RetryPolicy",
    "SQLiteBackend",
    "SerializationError",
    "Serializer",
    "SitqError",
    "StorageUnavailableError",
    "SyncClientError",
    "SyncTaskQueue",
    "SystemClock",
    "Task",
    "TaskNotFoundError",
    "TaskQueue",
    "TaskStatus",
    "TaskTimeoutError",
    "ValidationError",
    "Worker",
    "WorkerError",
]
