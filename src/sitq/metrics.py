"""Queue metrics: per-queue job counts and the age of the oldest visible pending job.

Messages and tasks are the same jobs, so the counts cover both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sitq.backends.base import Backend, QueueStats
from sitq.clock import SYSTEM_CLOCK, Clock
from sitq.core import TaskStatus


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """Counts of one queue's jobs (messages and tasks together).

    ``pending`` are visible now (including jobs whose consumer or worker let the
    visibility timeout run out); ``scheduled`` are pending but not yet visible;
    ``running`` are dequeued (or being run by a worker) with their visibility timeout
    still running; ``archived`` are finished
    successfully; ``dead`` are dead letters. ``oldest_pending_age`` is how long the
    oldest visible pending job has been waiting since it became visible.
    """

    queue: str
    pending: int = 0
    scheduled: int = 0
    running: int = 0
    archived: int = 0
    failed: int = 0
    cancelled: int = 0
    dead: int = 0
    oldest_pending_age: timedelta | None = None


def metrics_from(stats: QueueStats, now: datetime) -> QueueMetrics:
    """Turn a backend's :class:`QueueStats` into :class:`QueueMetrics` as of ``now``."""
    counts = stats.counts
    oldest = stats.oldest_pending_at
    return QueueMetrics(
        queue=stats.queue,
        pending=stats.pending,
        scheduled=stats.scheduled,
        running=stats.running,
        archived=counts.get(TaskStatus.SUCCESS, 0),
        failed=counts.get(TaskStatus.FAILED, 0),
        cancelled=counts.get(TaskStatus.CANCELLED, 0),
        dead=counts.get(TaskStatus.DEAD, 0),
        # A clock a little behind the writer's must not report a negative age.
        oldest_pending_age=None if oldest is None else max(now - oldest, timedelta(0)),
    )


async def queue_metrics(backend: Backend, clock: Clock | None = None) -> list[QueueMetrics]:
    """Metrics of every queue that holds jobs, sorted by queue name."""
    now = (clock or SYSTEM_CLOCK).now()
    return [metrics_from(stats, now) for stats in await backend.queue_stats(now)]


async def metrics_of(backend: Backend, queue: str, clock: Clock | None = None) -> QueueMetrics:
    """Metrics of one queue; zeros when it holds no jobs."""
    for metrics in await queue_metrics(backend, clock):
        if metrics.queue == queue:
            return metrics
    return QueueMetrics(queue=queue)
