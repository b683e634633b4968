"""The plain data that flows between the public API, the worker and the backends."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal


class TaskStatus(StrEnum):
    """Where a job is in its life.

    ``pending`` covers both ready and scheduled jobs (a scheduled job is a pending job
    whose ``available_at`` is in the future). ``failed`` after the last attempt and
    ``dead`` (a message read more than ``max_deliveries`` times) are the dead-letter
    states: kept, listable, and re-queueable.
    """

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset(
    {TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DEAD}
)

JobKind = Literal["task", "message"]


@dataclass(frozen=True, slots=True)
class Task:
    """A stored job as inspection sees it (``get_task``, ``list_tasks``)."""

    id: str
    queue: str
    kind: JobKind
    status: TaskStatus
    priority: int
    attempts: int
    max_attempts: int
    enqueued_at: datetime
    available_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    interval: timedelta | None
    series_id: str | None
    error: str | None
    traceback: str | None
    result: bytes | None
    #: The stored payload (a message's JSON, a task's serialized call), in listings
    #: that ask for it (``TaskQuery(payloads=True)``); ``None`` otherwise.
    payload: bytes | None = None

    @property
    def eta(self) -> datetime:
        """When the job is (or was) due: its ``eta``, retry time or interval slot."""
        return self.available_at

    @property
    def max_retries(self) -> int:
        return self.max_attempts - 1


@dataclass(frozen=True, slots=True)
class ReservedTask:
    """A job claimed by a worker or consumer: it holds the lease until it finishes."""

    id: str
    queue: str
    kind: JobKind
    payload: bytes
    priority: int
    attempts: int
    max_attempts: int
    available_at: datetime
    enqueued_at: datetime
    lease_expires_at: datetime
    interval: timedelta | None
    series_id: str | None
    #: When this run was scheduled: a retry moves ``available_at``, not this, so a
    #: recurring series computes its next slot from here.
    scheduled_at: datetime
    #: A cancel was asked for while an earlier run held the job, and that run ended
    #: with its worker (lost): the job is to be recorded cancelled, not run again.
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of a finished task.

    ``value`` is the serialized return value (use ``TaskQueue.deserialize_result``);
    ``error`` and ``traceback`` are set when ``status`` is ``"failed"`` (or
    ``"cancelled"`` with a reason). ``attempts`` counts every run, retries included.
    """

    task_id: str
    status: Literal["success", "failed", "cancelled"]
    value: bytes | None
    error: str | None
    traceback: str | None
    enqueued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.status == "success"


@dataclass(frozen=True, slots=True)
class Message:
    """A JSON message handed to a :class:`~sitq.messages.Consumer`."""

    id: str
    queue: str
    payload: Any
    enqueued_at: datetime
    visible_at: datetime
    read_count: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was read ``max_deliveries`` times without being finished (or
    whose stored body was not JSON), as :meth:`Consumer.dead_letters` lists it."""

    id: str
    queue: str
    #: The JSON value; the stored bytes if they are not valid JSON (which only a
    #: writer other than sitq can produce).
    payload: Any
    enqueued_at: datetime
    read_count: int
    error: str | None
    died_at: datetime | None
