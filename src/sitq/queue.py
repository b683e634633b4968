"""TaskQueue: the async client that enqueues tasks, waits for results and inspects jobs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from sitq.backends.base import Backend, NewJob, QueueStats, TaskQuery
from sitq.clock import Clock, clock_or_system
from sitq.core import FINISHED_STATUSES, Result, Task, TaskStatus
from sitq.errors import ResultTimeoutError, ValidationError
from sitq.result_watch import ResultWatch
from sitq.scheduling import RetryPolicy, due_time, interval_from, seconds_from
from sitq.serialization import DEFAULT_SERIALIZER, Serializer, checked
from sitq.task_call import TaskCall
from sitq.validation import INT32_MAX, INT32_MIN, int_in_range, storable_text

DEFAULT_QUEUE = "default"

#: Keyword arguments of ``enqueue`` that are options, not the task's own arguments.
#: A function whose parameters use these names is enqueued with ``enqueue_call``.
RESERVED_OPTIONS = frozenset(
    {"eta", "delay", "interval", "queue", "priority", "max_retries", "retry", "timeout"}
)

#: Jobs deleted per transaction, by ``purge`` and by workers pruning old results.
PURGE_BATCH = 5_000
#: The latest due time, as an aware datetime.
_LATEST = datetime.max.replace(tzinfo=UTC)
#: Finished statuses ``purge`` removes by default.
PURGEABLE = (TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.DEAD)


def new_id() -> str:
    """A new job id: 32 hex digits, the time in microseconds then 72 random bits.

    Ids made later sort later (as UUIDv7's do), so an index on them grows at its
    right edge: inserting a batch touches a few pages instead of one per job.
    """
    return f"{time.time_ns() // 1000:014x}{os.urandom(9).hex()}"


@dataclass(frozen=True, slots=True)
class _Options:
    """Validated per-task options, resolved against the queue's defaults."""

    now: datetime
    available_at: datetime
    interval: timedelta | None
    queue: str
    priority: int
    retry: RetryPolicy
    timeout: float | None


class TaskQueue:
    """Enqueue tasks and read their results.

    Args:
        backend: where jobs are stored (``SQLiteBackend``, ``MemoryBackend``...).
        serializer: turns calls and results into bytes; cloudpickle by default.
        default_queue: the queue ``enqueue`` uses when none is given.
        retry: the retry policy of tasks that set none themselves.
        queue_retry: retry policies per queue name, overriding ``retry``.
        clock: where "now" comes from (tests pass a ``FakeClock``).
    """

    def __init__(
        self,
        backend: Backend,
        serializer: Serializer | None = None,
        *,
        default_queue: str = DEFAULT_QUEUE,
        retry: RetryPolicy | None = None,
        queue_retry: Mapping[str, RetryPolicy] | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(backend, Backend):
            raise ValidationError(f"backend must be a sitq Backend, got {type(backend).__name__}")
        self.backend = backend
        self.serializer = DEFAULT_SERIALIZER if serializer is None else checked(serializer)
        self.default_queue = queue_name(default_queue)
        self.retry_policy = RetryPolicy() if retry is None else _policy(retry, "retry")
        if queue_retry is not None and not isinstance(queue_retry, Mapping):
            raise ValidationError(
                "queue_retry must map queue names to RetryPolicy objects, "
                f"got {type(queue_retry).__name__}"
            )
        self.queue_retry = {
            queue_name(name): _policy(policy, f"queue_retry[{name!r}]")
            for name, policy in (queue_retry or {}).items()
        }
        self.clock = clock_or_system(clock)
        # get_result's shared reader, one per event loop while it has waiters.
        self._watches: dict[asyncio.AbstractEventLoop, ResultWatch] = {}

    async def __aenter__(self) -> TaskQueue:
        await self.backend.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the backend's connections."""
        await self.backend.close()

    # -- enqueueing ------------------------------------------------------------------

    async def enqueue(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        eta: datetime | None = None,
        delay: float | timedelta | None = None,
        interval: timedelta | int | None = None,
        queue: str | None = None,
        priority: int = 0,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Store a call of ``func(*args, **kwargs)`` and return its task id.

        Options (every other keyword goes to ``func``):
            eta: aware datetime to run at (a past one runs at once).
            delay: seconds or ``timedelta`` from now; exclusive with ``eta``.
            interval: re-run every ``timedelta`` (or int milliseconds) from the due time.
            queue: queue name; priority: higher runs first among due tasks.
            max_retries / retry: how often and how late a failure is retried.
            timeout: seconds the task may run before it is failed.
        """
        options = self._options(eta, delay, interval, queue, priority, max_retries, retry, timeout)
        job = self._job(func, args, kwargs, options)
        await self.backend.enqueue([job])
        return job.id

    async def enqueue_call(
        self,
        func: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Like ``enqueue`` with the call's arguments given explicitly, so a function
        whose parameters are named like an option (``queue``, ``timeout``...) can
        still receive them."""
        job = self._job(func, args, {} if kwargs is None else kwargs, self._resolve(options))
        await self.backend.enqueue([job])
        return job.id

    async def enqueue_many(
        self,
        calls: Iterable[Callable[..., Any] | tuple[Any, ...]],
        **options: Any,
    ) -> list[str]:
        """Store many calls in one transaction; the same options apply to each.

        Each call is a function, ``(func, args)`` or ``(func, args, kwargs)``.
        """
        if isinstance(calls, Mapping | str | bytes) or not isinstance(calls, Iterable):
            # A mapping iterates its keys: {add: (1, 2)} was stored as add(), no args.
            raise ValidationError(
                "calls must be an iterable of functions, (func, args) or (func, args, kwargs)"
                f" tuples, got {type(calls).__name__}"
            )
        resolved = self._resolve(options)
        jobs = [self._job(*_split_call(call), resolved) for call in calls]
        if jobs:
            await self.backend.enqueue(jobs)
        return [job.id for job in jobs]

    def _resolve(self, options: Mapping[str, Any]) -> _Options:
        unknown = set(options) - RESERVED_OPTIONS
        if unknown:
            raise ValidationError(f"unknown enqueue options: {', '.join(sorted(unknown))}")
        return self._options(
            options.get("eta"),
            options.get("delay"),
            options.get("interval"),
            options.get("queue"),
            options.get("priority", 0),
            options.get("max_retries"),
            options.get("retry"),
            options.get("timeout"),
        )

    def _options(
        self,
        eta: object,
        delay: object,
        interval: object,
        queue: str | None,
        priority: object,
        max_retries: object,
        retry: RetryPolicy | None,
        timeout: object,
    ) -> _Options:
        chosen = self.default_queue if queue is None else queue_name(queue)
        rank = int_in_range(priority, "priority", INT32_MIN, INT32_MAX)
        if retry is not None:
            policy = _policy(retry, "retry")
        else:
            policy = self.queue_retry.get(chosen, self.retry_policy)
        if max_retries is not None:
            if isinstance(max_retries, bool) or not isinstance(max_retries, int):
                raise ValidationError(f"max_retries must be an int, got {max_retries!r}")
            policy = RetryPolicy(
                max_retries, policy.backoff, policy.factor, policy.max_backoff, policy.jitter
            )
        seconds: float | None = None
        if timeout is not None:
            seconds = seconds_from(timeout, "timeout").total_seconds()
            if seconds <= 0:
                # A float under a microsecond rounds to a zero timedelta.
                raise ValidationError(f"timeout must be at least 1 microsecond, got {timeout!r}")
        now = self.clock.now()
        available_at = due_time(now, eta, delay)
        every = interval_from(interval)
        if every is not None and available_at > _LATEST - every:
            # The worker could not compute the run after the first one.
            raise ValidationError(
                f"eta {available_at.isoformat()} is too late for a series: its next run "
                f"would fall after {_LATEST.isoformat()}"
            )
        return _Options(
            now=now,
            available_at=available_at,
            interval=every,
            queue=chosen,
            priority=rank,
            retry=policy,
            timeout=seconds,
        )

    def _job(
        self,
        func: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: _Options,
    ) -> NewJob:
        if not callable(func):
            raise ValidationError(f"a task must be callable, got {type(func).__name__}")
        # Checked here, not at run time: a str would run as one argument per character,
        # and a non-str key cannot be passed as a keyword.
        if not isinstance(args, tuple | list):
            raise ValidationError(f"args must be a tuple or list, got {type(args).__name__}")
        if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
            raise ValidationError(f"kwargs must be a dict with str keys, got {kwargs!r}")
        call = TaskCall(func, tuple(args), dict(kwargs), options.timeout, options.retry)
        job_id = new_id()
        return NewJob(
            id=job_id,
            queue=options.queue,
            kind="task",
            payload=call.dumps(self.serializer),
            enqueued_at=options.now,
            available_at=options.available_at,
            priority=options.priority,
            max_attempts=options.retry.max_attempts,
            interval=options.interval,
            series_id=job_id if options.interval is not None else None,
        )

    # -- results -------------------------------------------------------------------

    async def get_result(self, task_id: str, timeout: float | None = None) -> Result | None:
        """Wait until the task is finished and return its result.

        Returns ``None`` at once for an unknown id. While a retry is pending the task
        is not finished, so this keeps waiting. Raises ``ResultTimeoutError`` (a
        ``TimeoutError``) when ``timeout`` seconds pass first.
        """
        task_id = checked_id(task_id)
        seconds = None if timeout is None else seconds_from(timeout, "timeout").total_seconds()
        started = time.monotonic()
        # One look whatever the timeout (timeout=0 means "look, do not wait").
        task = await self._task(task_id)
        if task is None or task.status in FINISHED_STATUSES:
            return None if task is None else _result(task)
        left = None if seconds is None else max(0.0, seconds - (time.monotonic() - started))
        # The rest of the timeout bounds the wait, its reads included: in a storage
        # outage a read waits for a connection.
        try:
            found = await asyncio.wait_for(self._finished(task_id), left)
        except TimeoutError:
            raise ResultTimeoutError(
                f"task {task_id} did not finish within {timeout} s (status: {task.status.value})"
            ) from None
        return None if found is None else _result(found)

    async def _finished(self, task_id: str) -> Task | None:
        """The task once finished, or ``None`` once gone, through this loop's shared
        reader (see ResultWatch)."""
        loop = asyncio.get_running_loop()
        watch = self._watches.get(loop)
        if watch is None:
            watch = self._watches[loop] = ResultWatch(self.backend)
        finished = watch.wait(task_id)
        try:
            return await finished
        finally:
            watch.forget(task_id, finished)
            if watch.idle and self._watches.get(loop) is watch:
                # Gone with its last waiter: kept, it would keep a finished loop alive.
                del self._watches[loop]

    def deserialize_result(self, result: Result) -> Any:
        """The task's return value from a successful ``Result``."""
        if result.status != "success":
            raise ValidationError(
                f"task {result.task_id} has no value: its status is {result.status!r}"
            )
        if result.value is None:
            return None
        return self.serializer.loads(result.value)

    # -- control and inspection ------------------------------------------------------

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task: pending or scheduled ones never run; a running async task is
        cancelled cooperatively; a recurring series stops. ``False`` if the task is
        unknown or already finished."""
        task_id = checked_id(task_id)
        if await self._task(task_id) is None:
            return False
        return await self.backend.cancel(task_id, self.clock.now())

    async def retry(self, task_id: str) -> bool:
        """Re-queue a failed, dead or cancelled task with fresh attempts."""
        task_id = checked_id(task_id)
        if await self._task(task_id) is None:
            return False
        return await self.backend.requeue(task_id, self.clock.now())

    async def get_task(self, task_id: str) -> Task | None:
        return await self._task(checked_id(task_id))

    async def _task(self, task_id: str) -> Task | None:
        """The task with this id; ``None`` for a message's id, which is the messages
        API's to handle (a job's kind never changes, so checking first is safe)."""
        job = await self.backend.get(task_id)
        return job if job is not None and job.kind == "task" else None

    async def list_tasks(
        self,
        status: TaskStatus | str | None = None,
        queue: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Tasks newest first, optionally filtered by status and queue."""
        int_in_range(limit, "limit", 1, INT32_MAX)
        return await self.backend.list_jobs(
            TaskQuery(
                status=_status(status),
                queue=None if queue is None else queue_name(queue),
                kind="task",
                limit=limit,
            )
        )

    async def counts(self, queue: str | None = None) -> dict[str, int]:
        """How many jobs are in each status (all queues, or one)."""
        if queue is not None:
            queue_name(queue)
        totals = {status.value: 0 for status in TaskStatus}
        for stats in await self.backend.queue_stats(self.clock.now()):
            if queue is None or stats.queue == queue:
                for status, count in stats.counts.items():
                    totals[status.value] += count
        return totals

    async def queue_stats(self) -> list[QueueStats]:
        return await self.backend.queue_stats(self.clock.now())

    async def purge(
        self,
        older_than: float | timedelta = 0,
        statuses: Iterable[TaskStatus | str] = PURGEABLE,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        """Delete finished jobs that finished more than ``older_than`` ago; count them.

        Deletes ``PURGE_BATCH`` jobs per transaction, so purging a large backlog never
        holds the database's write lock for long; ``progress`` is called with each
        batch's count.
        """
        if isinstance(statuses, str):
            # Iterating it would look up each character as a status.
            raise ValidationError(f"statuses must be a list of statuses, got the str {statuses!r}")
        wanted = [_status(status) for status in statuses]
        if any(status not in FINISHED_STATUSES for status in wanted):
            raise ValidationError("purge only removes finished jobs")
        if progress is not None and not callable(progress):
            # Checked before the first batch goes: calling it after would fail with
            # one batch deleted and the rest left.
            raise ValidationError(f"progress must be callable, got {progress!r}")
        cutoff = self.clock.now() - seconds_from(older_than, "older_than")
        chosen = [s for s in wanted if s is not None]
        total = 0
        while True:
            removed = await self.backend.purge(cutoff, chosen, PURGE_BATCH)
            total += removed
            if progress is not None and (removed or not total):
                progress(removed)
            if removed < PURGE_BATCH:
                return total


def _policy(value: object, name: str) -> RetryPolicy:
    if not isinstance(value, RetryPolicy):
        raise ValidationError(f"{name} must be a RetryPolicy, got {value!r}")
    return value


def _result(task: Task) -> Result:
    status = "success" if task.status is TaskStatus.SUCCESS else task.status.value
    if task.status is TaskStatus.DEAD:
        status = "failed"
    return Result(
        task_id=task.id,
        status=status,  # type: ignore[arg-type]
        value=task.result,
        error=task.error,
        traceback=task.traceback,
        enqueued_at=task.enqueued_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        attempts=task.attempts,
    )


def _status(value: TaskStatus | str | None) -> TaskStatus | None:
    if value is None or isinstance(value, TaskStatus):
        return value
    try:
        return TaskStatus(value)
    except ValueError:
        names = ", ".join(status.value for status in TaskStatus)
        raise ValidationError(f"unknown status {value!r}; expected one of {names}") from None


def queue_name(name: object) -> str:
    text = storable_text(name, "queue")
    if not text or len(text) > 200:
        raise ValidationError(f"queue must be a non-empty string of at most 200 chars: {text!r}")
    return text


def checked_id(value: object, name: str = "task_id") -> str:
    """A task or message id given by the caller: any str every backend can look up
    (an unknown one is simply not found)."""
    return storable_text(value, name)


def _split_call(
    call: Callable[..., Any] | tuple[Any, ...],
) -> tuple[Callable[..., Any], Sequence[Any], Mapping[str, Any]]:
    if callable(call):
        return call, (), {}
    if isinstance(call, tuple) and 1 <= len(call) <= 3:
        func = call[0]
        args = call[1] if len(call) > 1 else ()
        kwargs = call[2] if len(call) > 2 else {}
        return func, args, kwargs
    raise ValidationError(
        f"each call must be a function, (func, args) or (func, args, kwargs); got {call!r}"
    )
