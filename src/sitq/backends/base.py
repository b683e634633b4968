"""The storage contract every backend implements.

A backend moves job rows; it makes no decisions. What to store, when a job is due,
whether a failure is retried and when an interval series runs next are decided by the
callers (``TaskQueue``, ``Worker``, ``Consumer``) with the pure functions of
:mod:`sitq.scheduling`, and handed over as small frozen parameter objects.

Guarantees every implementation must keep (the conformance suite checks them):

* ``claim`` is atomic: a job is handed to one owner at a time, as a lease that
  expires at ``now + lease``. A running job whose lease expired is claimable again,
  with ``attempts`` counted, so a dead worker's jobs are never lost.
* Writes from an owner whose lease was taken over are rejected (``finish`` and
  ``reschedule`` return ``False``).
* ``finish`` stores the outcome and, for a recurring job, inserts the next run in the
  same transaction, unless the series was cancelled.
* All datetimes in and out are aware UTC. Backends use the ``now`` they are given,
  never their own clock, so tests can control time.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sitq.core import JobKind, ReservedTask, Task, TaskStatus
from sitq.wakeup import Wakeup


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to insert."""

    id: str
    queue: str
    kind: JobKind
    payload: bytes
    enqueued_at: datetime
    available_at: datetime
    priority: int = 0
    max_attempts: int = 1
    max_deliveries: int | None = None
    interval: timedelta | None = None
    series_id: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Claim up to ``limit`` due jobs of ``kind`` from ``queues`` (all queues if None)."""

    owner: str
    kind: JobKind
    limit: int
    lease: timedelta
    now: datetime
    queues: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """Record a final outcome for a job the owner holds."""

    id: str
    owner: str
    status: TaskStatus
    now: datetime
    result: bytes | None = None
    error: str | None = None
    traceback: str | None = None
    next_run: NewJob | None = None


@dataclass(frozen=True, slots=True)
class Reschedule:
    """Put a held job back to ``pending`` until ``available_at`` (a retry or a release).

    ``undo_attempt`` gives back the attempt the claim counted: a message released
    without being processed, or a task handed back at shutdown before it started.
    ``now`` is when this was decided: the finish time should a cancel requested
    meanwhile make the job ``cancelled`` instead (``None``: ``available_at``, for a
    job given back at once).
    """

    id: str
    owner: str
    available_at: datetime
    error: str | None = None
    traceback: str | None = None
    undo_attempt: bool = False
    now: datetime | None = None

    @property
    def finished_at_if_cancelled(self) -> datetime:
        return self.available_at if self.now is None else self.now


Outcome = Finish | Reschedule


@dataclass(frozen=True, slots=True)
class Settled:
    """What :meth:`Backend.settle` did: one flag per outcome, and the claimed jobs."""

    accepted: list[bool]
    claimed: list[ReservedTask]


@dataclass(frozen=True, slots=True)
class LeaseReport:
    """What a heartbeat learned: leases lost to another owner, cancellations asked for."""

    lost: frozenset[str] = frozenset()
    cancel_requested: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TaskQuery:
    """A filter for :meth:`Backend.list_jobs`, newest first."""

    status: TaskStatus | None = None
    queue: str | None = None
    kind: JobKind | None = None
    #: Only the jobs with these ids (at most ``MAX_IDS_PER_QUERY``).
    ids: tuple[str, ...] | None = None
    #: Only jobs in one of these statuses (with ``status``, in both).
    statuses: tuple[TaskStatus, ...] | None = None
    limit: int = 100
    #: Also return each job's stored payload (``Task.payload``).
    payloads: bool = False


#: The most ids one :class:`TaskQuery` may name: well under SQLite's oldest limit on
#: the parameters of a statement (999).
MAX_IDS_PER_QUERY = 500


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Per-queue counts of stored statuses. ``scheduled`` are pending jobs not yet due;
    ``expired`` are running jobs whose lease has run out (their worker or consumer is
    gone or late, and the next claim takes them). ``oldest_pending_at`` is when the
    longest-waiting claimable job became claimable: a due pending job's due time or an
    expired job's lease end."""

    queue: str
    counts: dict[TaskStatus, int] = field(default_factory=dict)
    scheduled: int = 0
    expired: int = 0
    oldest_pending_at: datetime | None = None

    @property
    def pending(self) -> int:
        """Jobs a claim could take now: due pending ones and expired running ones."""
        return self.counts.get(TaskStatus.PENDING, 0) - self.scheduled + self.expired

    @property
    def running(self) -> int:
        """Running jobs whose lease still holds."""
        return self.counts.get(TaskStatus.RUNNING, 0) - self.expired


def task_from_row(row: Sequence[Any], moment: Callable[[Any], datetime]) -> Task:
    """A ``Task`` from the columns the SQL backends select for it, in this order: id,
    queue, kind, status, priority, attempts, max_attempts, enqueued_at, available_at,
    started_at, finished_at, interval (microseconds), series_id, error, traceback,
    result, and optionally payload. ``moment`` turns a stored time into an aware UTC
    datetime."""
    return Task(
        id=row[0],
        queue=row[1],
        kind=row[2],
        status=TaskStatus(row[3]),
        priority=row[4],
        attempts=row[5],
        max_attempts=row[6],
        enqueued_at=moment(row[7]),
        available_at=moment(row[8]),
        started_at=None if row[9] is None else moment(row[9]),
        finished_at=None if row[10] is None else moment(row[10]),
        interval=None if row[11] is None else timedelta(microseconds=row[11]),
        series_id=row[12],
        error=row[13],
        traceback=row[14],
        result=None if row[15] is None else bytes(row[15]),
        payload=bytes(row[16]) if len(row) > 16 else None,
    )


def stats_from_counts(
    rows: Iterable[tuple[str, str, int, int | None, int | None, datetime | None]],
) -> list[QueueStats]:
    """Fold ``(queue, status, count, scheduled, expired, oldest claimable)`` rows, as a
    ``GROUP BY queue, status`` query returns them, into one ``QueueStats`` per queue.
    ``scheduled`` counts pending jobs not yet due, ``expired`` running jobs past their
    lease; ``oldest claimable`` is the earliest due time or lease end among the rest."""
    stats: dict[str, QueueStats] = {}
    for queue, status, count, scheduled, expired, oldest in rows:
        current = stats.setdefault(queue, QueueStats(queue=queue))
        current.counts[TaskStatus(status)] = count
        earliest = current.oldest_pending_at
        if oldest is not None and (earliest is None or oldest < earliest):
            earliest = oldest
        stats[queue] = replace(
            current,
            scheduled=current.scheduled + (scheduled or 0),
            expired=current.expired + (expired or 0),
            oldest_pending_at=earliest,
        )
    return [stats[name] for name in sorted(stats)]


class Backend(abc.ABC):
    """Storage for jobs. Subclasses document what they cannot do in their docstring."""

    #: Can a write in another process wake this process's workers at once?
    pushes_wakeups: bool = False
    #: Can several processes share this backend's storage?
    multi_process: bool = True

    def __init__(self) -> None:
        self.wakeup = Wakeup()

    async def open(self) -> None:  # noqa: B027 - optional hook, most backends need it
        """Connect and create the schema if needed. Each open() is matched by a
        close(); a backend shared by a client and a worker stays open until both
        have closed it."""

    async def ensure_open(self) -> None:
        """Open if not yet open in this event loop, without a close() to match: for
        clients that open on first use and leave closing to their caller (Producer,
        Consumer). Backends that count opens override it."""
        await self.open()

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Match an open(); the last releases the connections. The backend may be
        opened again."""

    async def watch_work(self) -> None:  # noqa: B027 - optional hook
        """Make :attr:`wakeup` hear of new work from other processes, where the backend
        can: called by workers and consumers before each wait on it, so it must be
        cheap once listening. A backend starts listening here, not in :meth:`open`, so a
        process that only enqueues is never woken."""

    async def watch_finished(self) -> Wakeup:
        """The wake-up set when jobs finish, for callers waiting on a result.

        By default :attr:`wakeup`, which finishes set too (watched as for work). A
        backend that announces finishes apart from new work returns another one.
        """
        await self.watch_work()
        return self.wakeup

    @abc.abstractmethod
    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        """Insert jobs in one transaction (all or none)."""

    @abc.abstractmethod
    async def claim(self, request: ClaimRequest) -> list[ReservedTask]:
        """Lease due jobs: highest priority first, then earliest due."""

    @abc.abstractmethod
    async def extend_leases(
        self, owner: str, ids: Sequence[str], lease: timedelta, now: datetime
    ) -> LeaseReport:
        """Push the held leases to ``now + lease``; report lost ones and cancel requests."""

    @abc.abstractmethod
    async def finish(self, finish: Finish) -> bool:
        """Record an outcome; ``False`` if ``owner`` no longer holds the job."""

    @abc.abstractmethod
    async def reschedule(self, reschedule: Reschedule) -> bool:
        """Return a held job to ``pending``; ``False`` if ``owner`` no longer holds it."""

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        """Record outcomes, then claim: the worker's one round trip per loop turn.

        Backends that can should do it in one transaction (the default makes one call
        per outcome). An outcome is accepted only if its owner still held the job.
        """
        accepted = [
            await (self.finish(o) if isinstance(o, Finish) else self.reschedule(o))
            for o in outcomes
        ]
        claimed = await self.claim(claim) if claim is not None else []
        return Settled(accepted, claimed)

    @abc.abstractmethod
    async def cancel(self, job_id: str, now: datetime) -> bool:
        """Cancel a pending job, or flag a running one; ``False`` if finished or unknown."""

    @abc.abstractmethod
    async def requeue(self, job_id: str, now: datetime) -> bool:
        """Make a failed, dead or cancelled job pending again with fresh attempts."""

    @abc.abstractmethod
    async def delete(self, job_id: str) -> bool:
        """Remove a job whatever its state; ``False`` if unknown."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Task | None:
        """The job with its outcome, or ``None``."""

    @abc.abstractmethod
    async def list_jobs(self, query: TaskQuery) -> list[Task]:
        """Jobs matching ``query``, newest first."""

    @abc.abstractmethod
    async def queue_stats(self, now: datetime) -> list[QueueStats]:
        """Counts per queue, sorted by queue name."""

    @abc.abstractmethod
    async def next_due(self, kind: JobKind, queues: tuple[str, ...] | None) -> datetime | None:
        """When a claim may next find a job: the earliest ``available_at`` among pending
        jobs or ``lease_expires_at`` among running ones (a dead worker's job is claimable
        when its lease runs out), or ``None`` if there are neither."""

    @abc.abstractmethod
    async def purge(
        self,
        finished_before: datetime,
        statuses: Sequence[TaskStatus],
        limit: int | None = None,
        *,
        kind: JobKind | None = None,
        queues: tuple[str, ...] | None = None,
    ) -> int:
        """Delete jobs in ``statuses`` that finished before the given time, at most
        ``limit`` of them (all when ``None``), in one transaction; count them. Only
        jobs of ``kind`` and in ``queues``, when given."""
