"""Scheduling semantics on every backend (the ``backend`` fixture): delay and eta,
interval series, retries with backoff, timeouts, cancellation, inspection, named
queues and priorities, retention.

Time is a ``FakeClock``: tests move "now" and wait (with a deadline) for the worker
to record what it did, instead of sleeping. Only timeouts use real (short) time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from helpers import wait_until
from sitq import (
    Consumer,
    FakeClock,
    MemoryBackend,
    Producer,
    ResultTimeoutError,
    Retry,
    RetryPolicy,
    Task,
    TaskQueue,
    TaskStatus,
    TaskTimeoutError,
    ValidationError,
    Worker,
    WorkerError,
)
from sitq.backends.base import Backend, ClaimRequest, TaskQuery
from sitq.core import JobKind
from sitq.serialization import DEFAULT_SERIALIZER
from sitq.worker import MAX_LOST_RUNS

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def offset(moment: datetime | None) -> float:
    assert moment is not None
    return (moment - T0).total_seconds()


# -- shared state the task functions report to ---------------------------------------
# Task functions are module level so cloudpickle stores them by reference and, when the
# worker runs them in this process, they see this module's STATE.


@dataclass
class _State:
    clock: FakeClock = field(default_factory=FakeClock)
    log: list[Any] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    calls: int = 0
    gate: asyncio.Event | None = None
    thread_gate: threading.Event = field(default_factory=threading.Event)
    thread_done: threading.Event = field(default_factory=threading.Event)


STATE = _State()


def record(label: str) -> str:
    STATE.log.append(label)
    return label


def process_item(item_id: str) -> dict[str, str]:
    """Spec 001's example task, logging the (fake) time it ran at."""
    STATE.log.append((item_id, offset(STATE.clock.now())))
    return {"item_id": item_id, "status": "completed"}


async def tick(label: str) -> str:
    """Log the time the run started, then "take" the next of STATE.durations seconds."""
    STATE.log.append((label, offset(STATE.clock.now())))
    if STATE.durations:
        STATE.clock.advance(STATE.durations.pop(0))
    return label


async def tick_or_fail(label: str) -> str:
    """Fail every second call (the 2nd, 4th...)."""
    STATE.calls += 1
    STATE.log.append((label, offset(STATE.clock.now())))
    if STATE.calls % 2 == 0:
        raise RuntimeError(f"run {STATE.calls} broke")
    return label


def fail_numbered() -> None:
    STATE.calls += 1
    raise ValueError(f"attempt {STATE.calls} failed")


def fail_once() -> str:
    STATE.calls += 1
    if STATE.calls == 1:
        raise ValueError("first attempt failed")
    return "ok"


def _retry_the_first_call() -> str:
    STATE.calls += 1
    if STATE.calls == 1:
        raise Retry(delay=3)
    return "done"


async def retry_once_later() -> str:
    return _retry_the_first_call()


def retry_once_later_in_a_thread() -> str:
    return _retry_the_first_call()


async def always_retry() -> None:
    STATE.calls += 1
    raise Retry(delay=3, reason=f"not yet ({STATE.calls})")


async def hold(label: str) -> str:
    """Run until STATE.gate is set (an async task the worker can cancel)."""
    STATE.log.append(label)
    assert STATE.gate is not None
    await STATE.gate.wait()
    return label


def hold_sync(label: str) -> str:
    """Block a worker thread until STATE.thread_gate is set (at most 10 s)."""
    STATE.log.append(label)
    try:
        STATE.thread_gate.wait(10)
    finally:
        STATE.thread_done.set()
    return label


def echo_options(queue: str, timeout: int) -> tuple[str, int]:
    return queue, timeout


# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
def state() -> Iterator[_State]:
    STATE.__init__()  # type: ignore[misc]
    STATE.clock = FakeClock(T0)
    STATE.gate = asyncio.Event()
    yield STATE
    # Let blocked worker threads finish so none outlives the test.
    STATE.thread_gate.set()
    STATE.gate.set()


@pytest.fixture
def clock(state: _State) -> FakeClock:
    return state.clock


@pytest.fixture
def queue(backend: Backend, clock: FakeClock) -> TaskQueue:
    return TaskQueue(backend, clock=clock)


def fake_worker(backend: Backend, clock: FakeClock, **options: Any) -> Worker:
    """A worker on fake time. Its leases are long so advancing the clock while a task
    runs never makes the task look abandoned."""
    options.setdefault("visibility_timeout", 3600)
    return Worker(backend, clock=clock, **options)


@contextlib.asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[Worker]:
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(timeout=5)


async def settled(queue: TaskQueue) -> bool:
    """Nothing is due or running: the worker has recorded everything it can do now."""
    return all(
        stats.pending == 0 and stats.counts.get(TaskStatus.RUNNING, 0) == 0
        for stats in await queue.queue_stats()
    )


async def series_of(queue: TaskQueue, series_id: str) -> list[Task]:
    tasks = await queue.list_tasks(limit=1000)
    return sorted(
        (task for task in tasks if task.series_id == series_id),
        key=lambda task: task.available_at,
    )


def advance_to(clock: FakeClock, moment: datetime) -> None:
    assert moment >= clock.now()
    clock.advance(moment - clock.now())


async def test_a_task_that_falls_due_while_the_worker_goes_idle_runs_at_once(
    backend: Backend,
    queue: TaskQueue,
    clock: FakeClock,
    state: _State,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clock moves between the worker's empty claim and its sleep: the task that
    became due meanwhile must run without waiting for the clock to move again."""
    task_id = await queue.enqueue(record, "due", eta=at(10))
    purge = backend.purge

    async def purge_then_move_the_clock(*args: Any, **kwargs: Any) -> int:
        if clock.now() < at(10):
            advance_to(clock, at(10))  # the worker prunes right before it goes idle
        return await purge(*args, **kwargs)

    monkeypatch.setattr(backend, "purge", purge_then_move_the_clock)
    async with serving(fake_worker(backend, clock, retention=timedelta(days=1))):
        result = await queue.get_result(task_id, timeout=5)
    assert result is not None and result.status == "success"
    assert result.started_at == at(10)
    assert state.log == ["due"]


# -- delay and eta ---------------------------------------------------------------------


async def test_delay_is_the_relative_twin_of_eta(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    by_seconds = await queue.enqueue(record, "seconds", delay=30)
    by_timedelta = await queue.enqueue(record, "timedelta", delay=timedelta(minutes=2))
    by_eta = await queue.enqueue(record, "eta", eta=at(30))
    by_fraction = await queue.enqueue(record, "fraction", delay=0.25)
    many = await queue.enqueue_many([(record, ("m1",)), (record, ("m2",))], delay=45)
    called = await queue.enqueue_call(record, args=("call",), delay=timedelta(seconds=45))

    async def due(task_id: str) -> datetime:
        task = await queue.get_task(task_id)
        assert task is not None
        return task.available_at

    assert await due(by_seconds) == await due(by_eta) == at(30)
    assert await due(by_timedelta) == at(120)
    assert await due(by_fraction) == at(0.25)
    assert [await due(task_id) for task_id in [*many, called]] == [at(45)] * 3

    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 0
    clock.advance(0.25)
    assert await worker.serve(burst=True) == 1
    clock.advance(29.74)
    assert await worker.serve(burst=True) == 0, "a delayed task ran early"
    clock.advance(0.01)
    assert await worker.serve(burst=True) == 2
    assert sorted(state.log) == ["eta", "fraction", "seconds"]
    clock.advance(90)
    assert await worker.serve(burst=True) == 4
    assert sorted(state.log[3:]) == ["call", "m1", "m2", "timedelta"]


async def test_eta_and_delay_are_validated(queue: TaskQueue) -> None:
    with pytest.raises(ValidationError, match="either eta or delay"):
        await queue.enqueue(record, "x", eta=at(10), delay=10)
    with pytest.raises(ValidationError, match="either eta or delay"):
        await queue.enqueue_call(record, args=("x",), eta=at(10), delay=10)
    for bad in (-1, -0.001, timedelta(seconds=-1)):
        with pytest.raises(ValidationError, match="delay must not be negative"):
            await queue.enqueue(record, "x", delay=bad)
    for bad_type in ("5", True, float("inf")):
        with pytest.raises(ValidationError, match="delay"):
            await queue.enqueue(record, "x", delay=bad_type)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="eta must be timezone-aware"):
        await queue.enqueue(record, "x", eta=datetime(2030, 1, 1, 12))
    assert sum((await queue.counts()).values()) == 0, "a rejected enqueue stored a job"


async def test_huge_durations_and_far_etas_are_rejected_naming_the_argument(
    backend: Backend, queue: TaskQueue
) -> None:
    # Each would overflow datetime arithmetic at enqueue or, later, in the worker.
    latest = datetime.max.replace(tzinfo=UTC)
    west = timezone(timedelta(hours=-1))
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("delay", lambda: queue.enqueue(record, "x", delay=1e12)),
        ("timeout", lambda: queue.enqueue(record, "x", timeout=1e300)),
        ("interval", lambda: queue.enqueue(record, "x", interval=2**62)),
        ("interval", lambda: queue.enqueue(record, "x", interval=timedelta(days=3_000_000))),
        ("eta", lambda: queue.enqueue(record, "x", eta=datetime.max.replace(tzinfo=west))),
        ("eta .* series", lambda: queue.enqueue(record, "x", eta=latest, interval=60_000)),
        ("older_than", lambda: queue.purge(older_than=1e12)),
    ]
    for name, call in calls:
        with pytest.raises(ValidationError, match=name):
            await call()
    for bad in ("1", True, -1, float("nan"), 1e12):
        with pytest.raises(ValidationError, match="timeout"):
            await queue.get_result("x", timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="visibility_timeout"):
        Worker(backend, visibility_timeout=1e12)
    for limit in (0, 2**63):  # 2**63 overflowed SQLite and PostgreSQL differently
        with pytest.raises(ValidationError, match="limit must be between 1 and"):
            await queue.list_tasks(limit=limit)
    assert sum((await queue.counts()).values()) == 0, "a rejected enqueue stored a job"
    # A far eta without an interval stays allowed.
    task = await queue.get_task(await queue.enqueue(record, "x", eta=latest))
    assert task is not None and task.available_at == latest


async def test_eta_in_another_timezone_is_stored_as_utc(queue: TaskQueue) -> None:
    plus_two = timezone(timedelta(hours=2))
    task_id = await queue.enqueue(record, "x", eta=datetime(2030, 1, 1, 2, 0, 30, tzinfo=plus_two))
    task = await queue.get_task(task_id)
    assert task is not None
    assert task.available_at == at(30)
    assert task.available_at.utcoffset() == timedelta(0)


async def test_past_eta_runs_at_once(backend: Backend, queue: TaskQueue, clock: FakeClock) -> None:
    task_id = await queue.enqueue(record, "late", eta=at(-3600))
    assert await fake_worker(backend, clock).serve(burst=True) == 1
    result = await queue.get_result(task_id, timeout=5)
    assert result is not None and result.status == "success"


# -- intervals -----------------------------------------------------------------------------


async def test_interval_accepts_timedelta_or_int_milliseconds(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    by_ms = await queue.enqueue(tick, "ms", interval=500)
    by_delta = await queue.enqueue(tick, "delta", interval=timedelta(seconds=2))
    first_ms = await queue.get_task(by_ms)
    first_delta = await queue.get_task(by_delta)
    assert first_ms is not None and first_delta is not None
    assert first_ms.interval == timedelta(milliseconds=500), "interval=500 is 500 ms"
    assert first_delta.interval == timedelta(seconds=2)
    assert first_ms.series_id == by_ms and first_delta.series_id == by_delta

    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 2
    clock.advance(0.5)
    assert await worker.serve(burst=True) == 1  # only the 500 ms series is due
    runs = await series_of(queue, by_ms)
    assert [offset(run.available_at) for run in runs] == [0, 0.5, 1.0]
    assert all(run.interval == timedelta(milliseconds=500) for run in runs)
    assert [offset(run.available_at) for run in await series_of(queue, by_delta)] == [0, 2]


async def test_bad_intervals_are_rejected(queue: TaskQueue) -> None:
    for bad in (0, -500, timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValidationError, match="interval must be positive"):
            await queue.enqueue(record, "x", interval=bad)
    for bad_type in (1.5, True, "10"):
        with pytest.raises(ValidationError, match="interval must be a timedelta or an int"):
            await queue.enqueue(record, "x", interval=bad_type)  # type: ignore[arg-type]
    assert sum((await queue.counts()).values()) == 0


async def test_interval_series_stays_on_its_grid_over_100_runs(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(tick, "run", interval=timedelta(seconds=10))
    latenesses = [k % 4 for k in range(100)]  # the worker starts a run up to 3 s late...
    durations = [(k * 7) % 6 + 0.5 for k in range(100)]  # ...and it takes up to 5.5 s
    async with serving(fake_worker(backend, clock)):
        for k in range(100):
            state.durations.append(durations[k])
            advance_to(clock, at(10 * k + latenesses[k]))
            await wait_until(lambda k=k: len(state.log) == k + 1 and settled(queue))

    runs = await series_of(queue, first)
    assert len(runs) == 101
    assert runs[0].id == first
    assert len({run.id for run in runs}) == 101, "each run is a new task id"
    assert [run.available_at for run in runs] == [at(10 * k) for k in range(101)], "drift"
    assert [run.status for run in runs] == [TaskStatus.SUCCESS] * 100 + [TaskStatus.PENDING]
    assert [run.started_at for run in runs[:100]] == [
        at(10 * k + latenesses[k]) for k in range(100)
    ]
    assert [run.finished_at for run in runs[:100]] == [
        at(10 * k + latenesses[k] + durations[k]) for k in range(100)
    ]
    assert state.log == [("run", 10 * k + latenesses[k]) for k in range(100)]


async def test_a_series_that_fell_behind_catches_up_once(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(tick, "run", interval=timedelta(seconds=10))
    state.durations.extend([35, 0, 0])  # the first run overruns three slots
    worker = fake_worker(backend, clock)
    # The run at 0 ends at 35: the slot at 30 is due at once, 10 and 20 are skipped.
    assert await worker.serve(burst=True) == 2
    runs = await series_of(queue, first)
    assert [offset(run.available_at) for run in runs] == [0, 30, 40]
    assert [offset(run.started_at) for run in runs[:2]] == [0, 35]
    assert runs[2].status is TaskStatus.PENDING
    clock.advance(4.9)
    assert await worker.serve(burst=True) == 0
    clock.advance(0.1)
    assert await worker.serve(burst=True) == 1
    assert [offset(run.available_at) for run in await series_of(queue, first)] == [
        0,
        30,
        40,
        50,
    ]
    assert state.log == [("run", 0), ("run", 35), ("run", 40)]


async def test_a_run_finishing_exactly_on_the_next_slot_keeps_the_grid(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(tick, "run", interval=timedelta(seconds=10))
    state.durations.extend([10, 0])
    assert await fake_worker(backend, clock).serve(burst=True) == 2
    runs = await series_of(queue, first)
    assert [offset(run.available_at) for run in runs] == [0, 10, 20]
    assert state.log == [("run", 0), ("run", 10)]


async def test_a_failing_run_does_not_stop_the_series(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(tick_or_fail, "run", interval=timedelta(seconds=10))
    worker = fake_worker(backend, clock)
    for k in range(5):
        advance_to(clock, at(10 * k))
        assert await worker.serve(burst=True) == 1
    runs = await series_of(queue, first)
    assert [run.status for run in runs] == [
        TaskStatus.SUCCESS,
        TaskStatus.FAILED,
        TaskStatus.SUCCESS,
        TaskStatus.FAILED,
        TaskStatus.SUCCESS,
        TaskStatus.PENDING,
    ]
    assert [offset(run.available_at) for run in runs] == [0, 10, 20, 30, 40, 50]
    assert runs[1].error == "RuntimeError: run 2 broke"
    assert runs[1].traceback is not None and "tick_or_fail" in runs[1].traceback
    failed = await queue.get_result(runs[3].id, timeout=5)
    assert failed is not None and failed.status == "failed"
    assert failed.error == "RuntimeError: run 4 broke"


async def test_eta_plus_interval_starts_the_series_later(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(tick, "run", eta=at(100), interval=timedelta(seconds=10))
    task = await queue.get_task(first)
    assert task is not None
    assert task.eta == at(100) and task.interval == timedelta(seconds=10)
    worker = fake_worker(backend, clock)
    clock.advance(99.9)
    assert await worker.serve(burst=True) == 0, "the series started before its eta"
    for moment in (100, 110, 120):
        advance_to(clock, at(moment))
        assert await worker.serve(burst=True) == 1
    runs = await series_of(queue, first)
    assert [offset(run.available_at) for run in runs] == [100, 110, 120, 130]
    assert state.log == [("run", 100), ("run", 110), ("run", 120)]


async def test_cancelling_the_pending_next_run_stops_the_series(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(tick, "run", interval=timedelta(seconds=10))
    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 1
    pending = await queue.list_tasks(status="pending")
    assert len(pending) == 1 and pending[0].series_id == first
    assert await queue.cancel(pending[0].id) is True
    clock.advance(100)
    assert await worker.serve(burst=True) == 0
    runs = await series_of(queue, first)
    assert [run.status for run in runs] == [TaskStatus.SUCCESS, TaskStatus.CANCELLED]
    result = await queue.get_result(pending[0].id, timeout=5)
    assert result is not None and result.status == "cancelled"
    assert state.log == [("run", 0)]


async def test_cancelling_a_running_async_run_stops_the_series(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(hold, "run", interval=timedelta(seconds=10))
    worker = fake_worker(backend, clock, visibility_timeout=0.3, poll_interval=0.05)
    async with serving(worker):
        await wait_until(lambda: state.log == ["run"])
        assert await queue.cancel(first) is True
        result = await queue.get_result(first, timeout=10)
        assert result is not None and result.status == "cancelled"
        clock.advance(100)
        await wait_until(lambda: settled(queue))
    assert [task.id for task in await queue.list_tasks()] == [first], "the series went on"
    assert state.log == ["run"]


async def test_cancelling_a_running_sync_run_stops_the_series(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(hold_sync, "run", interval=timedelta(seconds=10))
    worker = fake_worker(backend, clock, visibility_timeout=0.3, poll_interval=0.05)
    async with serving(worker):
        await wait_until(lambda: state.log == ["run"])
        assert await queue.cancel(first) is True
        # A thread cannot be interrupted: the run completes, but nothing follows it.
        state.thread_gate.set()
        result = await queue.get_result(first, timeout=10)
        assert result is not None and result.status == "success"
        clock.advance(100)
        await wait_until(lambda: settled(queue))
    assert [task.id for task in await queue.list_tasks()] == [first], "the series went on"
    assert state.log == ["run"]


async def test_a_retried_interval_run_keeps_the_grid(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(
        fail_once,
        interval=timedelta(seconds=10),
        max_retries=1,
        retry=RetryPolicy(backoff=3, jitter=False),
    )
    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 1
    clock.advance(3)
    assert await worker.serve(burst=True) == 1
    runs = await series_of(queue, first)
    assert runs[-1].status is TaskStatus.PENDING
    assert runs[-1].available_at == at(10), "the series moved by the retry delay"


async def test_spec_001_complete_example_schedule(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    """Spec 001's example on a fake clock: an eta task at +5 and an interval task
    every 2 s, one worker, 10 s. The interval's first run is due at enqueue time."""
    eta_task_id = await queue.enqueue(process_item, "delayed-item", eta=at(5))
    interval_task_id = await queue.enqueue(
        process_item, "interval-item", interval=timedelta(seconds=2)
    )
    async with serving(fake_worker(backend, clock, max_concurrency=1)):
        await wait_until(lambda: settled(queue))
        for _ in range(10):
            clock.advance(1)
            await wait_until(lambda: settled(queue))

    assert state.log == [
        ("interval-item", 0),
        ("interval-item", 2),
        ("interval-item", 4),
        ("delayed-item", 5),
        ("interval-item", 6),
        ("interval-item", 8),
        ("interval-item", 10),
    ]
    result = await queue.get_result(eta_task_id, timeout=5)
    assert result is not None and result.status == "success"
    assert queue.deserialize_result(result) == {"item_id": "delayed-item", "status": "completed"}
    runs = await series_of(queue, interval_task_id)
    assert [offset(run.available_at) for run in runs] == [0, 2, 4, 6, 8, 10, 12]
    assert [run.status for run in runs] == [TaskStatus.SUCCESS] * 6 + [TaskStatus.PENDING]


# -- retries ---------------------------------------------------------------------------------


async def test_max_retries_gives_n_plus_one_attempts_on_the_backoff_schedule(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    task_id = await queue.enqueue(
        fail_numbered, max_retries=3, retry=RetryPolicy(backoff=2, factor=3, jitter=False)
    )
    # A waiter started now must sleep through every retry and see only the final result.
    waiter = asyncio.create_task(queue.get_result(task_id, timeout=30))
    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 1
    for attempt, wait in ((1, 2), (2, 6), (3, 18)):
        task = await queue.get_task(task_id)
        assert task is not None
        # A retry is pending: not failed, and it carries the previous attempt's error.
        assert task.status is TaskStatus.PENDING
        assert task.attempts == attempt
        assert task.available_at == clock.now() + timedelta(seconds=wait)
        assert task.error == f"ValueError: attempt {attempt} failed"
        assert task.traceback is not None and f"attempt {attempt} failed" in task.traceback
        with pytest.raises(ResultTimeoutError):
            await queue.get_result(task_id, timeout=0)
        assert (await queue.counts())["failed"] == 0
        assert not waiter.done()
        clock.advance(wait - 0.5)
        assert await worker.serve(burst=True) == 0, "retried before its backoff"
        clock.advance(0.5)
        assert await worker.serve(burst=True) == 1

    assert state.calls == 4
    result = await queue.get_result(task_id, timeout=5)
    assert result is not None
    assert result.status == "failed"
    assert result.attempts == 4
    assert result.error == "ValueError: attempt 4 failed"
    assert result.traceback is not None
    assert "fail_numbered" in result.traceback and "attempt 4 failed" in result.traceback
    assert result.finished_at == at(2 + 6 + 18)
    assert await waiter == result
    clock.advance(3600)
    assert await worker.serve(burst=True) == 0, "a finally failed task ran again"


async def test_retry_backoff_with_jitter_stays_in_bounds_and_spreads(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    policy = RetryPolicy(max_retries=2, backoff=10, factor=2, jitter=True)
    ids = [await queue.enqueue(fail_numbered, retry=policy) for _ in range(6)]
    worker = fake_worker(backend, clock, max_concurrency=6)
    assert await worker.serve(burst=True) == 6
    firsts = [task.available_at for task in [await queue.get_task(i) for i in ids] if task]
    assert len(firsts) == 6
    assert all(at(5) <= due <= at(10) for due in firsts), firsts
    assert len(set(firsts)) > 1, "jitter did not spread the retries"
    advance_to(clock, at(10))
    assert await worker.serve(burst=True) == 6
    seconds = [task for task in [await queue.get_task(i) for i in ids] if task]
    assert all(task.status is TaskStatus.PENDING and task.attempts == 2 for task in seconds)
    assert all(at(20) <= task.available_at <= at(30) for task in seconds)


async def test_per_queue_retry_policy(backend: Backend, clock: FakeClock, state: _State) -> None:
    queue = TaskQueue(
        backend,
        clock=clock,
        retry=RetryPolicy(max_retries=1, backoff=0),
        queue_retry={"flaky": RetryPolicy(max_retries=2, backoff=0)},
    )
    in_default = await queue.enqueue(fail_numbered)
    in_flaky = await queue.enqueue(fail_numbered, queue="flaky")
    in_other = await queue.enqueue(fail_numbered, queue="other")
    flaky_overridden = await queue.enqueue(fail_numbered, queue="flaky", max_retries=0)
    assert await fake_worker(backend, clock).serve(burst=True) == 2 + 3 + 2 + 1
    attempts = {}
    for name, task_id in [
        ("default", in_default),
        ("flaky", in_flaky),
        ("other", in_other),
        ("overridden", flaky_overridden),
    ]:
        result = await queue.get_result(task_id, timeout=5)
        assert result is not None and result.status == "failed"
        attempts[name] = result.attempts
    assert attempts == {"default": 2, "flaky": 3, "other": 2, "overridden": 1}
    task = await queue.get_task(in_flaky)
    assert task is not None and task.max_retries == 2


@pytest.mark.parametrize(
    "func", [retry_once_later, retry_once_later_in_a_thread], ids=["async", "sync"]
)
async def test_raising_retry_reschedules_after_its_delay(
    backend: Backend,
    queue: TaskQueue,
    clock: FakeClock,
    state: _State,
    func: Callable[[], Any],
) -> None:
    # Retry(delay=3) overrides the (much longer) backoff of the policy.
    task_id = await queue.enqueue(
        func, max_retries=1, retry=RetryPolicy(backoff=1000, jitter=False)
    )
    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 1
    task = await queue.get_task(task_id)
    assert task is not None
    assert task.status is TaskStatus.PENDING and task.available_at == at(3)
    assert task.error is not None and task.error.startswith("Retry:")
    clock.advance(2.9)
    assert await worker.serve(burst=True) == 0
    clock.advance(0.1)
    assert await worker.serve(burst=True) == 1
    result = await queue.get_result(task_id, timeout=5)
    assert result is not None and result.status == "success" and result.attempts == 2
    assert queue.deserialize_result(result) == "done"


async def test_raising_retry_with_no_retries_left_fails(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    no_retries = await queue.enqueue(always_retry)
    one_retry = await queue.enqueue(always_retry, max_retries=1)
    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 2
    result = await queue.get_result(no_retries, timeout=5)
    assert result is not None and result.status == "failed" and result.attempts == 1
    assert result.error is not None and result.error.startswith("Retry: not yet")
    task = await queue.get_task(one_retry)
    assert task is not None and task.status is TaskStatus.PENDING
    assert task.available_at == at(3)
    clock.advance(3)
    assert await worker.serve(burst=True) == 1
    result = await queue.get_result(one_retry, timeout=5)
    assert result is not None and result.status == "failed" and result.attempts == 2


# -- timeouts --------------------------------------------------------------------------------


async def test_async_task_over_its_timeout_is_cancelled_and_failed(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    task_id = await queue.enqueue(hold, "slow", timeout=0.2)
    after = await queue.enqueue(record, "after")
    assert await fake_worker(backend, clock).serve(burst=True) == 2
    result = await queue.get_result(task_id, timeout=5)
    assert result is not None and result.status == "failed"
    assert result.error == f"TaskTimeoutError: {TaskTimeoutError(0.2)}"
    assert result.error == "TaskTimeoutError: task timed out after 0.2 s"
    assert result.attempts == 1
    other = await queue.get_result(after, timeout=5)
    assert other is not None and other.status == "success"
    assert state.log == ["slow", "after"]


async def test_sync_task_over_its_timeout_is_abandoned_and_the_worker_goes_on(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    stuck = await queue.enqueue(hold_sync, "stuck", timeout=0.2)
    after = await queue.enqueue(record, "after")
    try:
        worker = fake_worker(backend, clock, max_concurrency=1)
        assert await worker.serve(burst=True) == 2
        result = await queue.get_result(stuck, timeout=5)
        assert result is not None and result.status == "failed"
        assert result.error == "TaskTimeoutError: task timed out after 0.2 s"
        other = await queue.get_result(after, timeout=5)
        assert other is not None and other.status == "success"
        assert state.log == ["stuck", "after"]
        assert not state.thread_done.is_set(), "the stuck thread was not still running"
    finally:
        state.thread_gate.set()
        await wait_until(state.thread_done.is_set)


async def test_each_abandoned_thread_is_counted_in_a_warning(
    backend: Backend,
    queue: TaskQueue,
    clock: FakeClock,
    state: _State,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sync call that never returns keeps its thread for the life of the process, and
    # nothing said how many had piled up: the soak probe saw 121 threads and no word.
    first = await queue.enqueue(hold_sync, "first", timeout=0.2)
    second = await queue.enqueue(hold_sync, "second", timeout=0.2)
    try:
        with caplog.at_level("WARNING", logger="sitq.worker"):
            worker = fake_worker(backend, clock, max_concurrency=1)
            assert await worker.serve(burst=True) == 2
        warnings = [record.getMessage() for record in caplog.records]
        assert [message.split(" timed out")[0] for message in warnings] == [
            f"task {first}",
            f"task {second}",
        ]
        assert "(1 threads" in warnings[0] and "(2 threads" in warnings[1]
    finally:
        state.thread_gate.set()


async def test_a_replaced_pool_s_idle_threads_are_not_counted_as_running_on(
    backend: Backend,
    queue: TaskQueue,
    clock: FakeClock,
    state: _State,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The warning counted the replaced pool's threads not yet exited: its idle ones,
    # told to exit an instant before, had not yet, and it said 2 ran on, not 1.
    try:
        async with serving(fake_worker(backend, clock, max_concurrency=2)):
            await queue.enqueue(hold_sync, "a")
            await queue.enqueue(hold_sync, "b")
            await wait_until(lambda: len(state.log) == 2)  # the pool has two threads
            state.thread_gate.set()
            await wait_until(lambda: settled(queue))  # both idle
            state.thread_gate.clear()
            with caplog.at_level("WARNING", logger="sitq.worker"):
                await queue.enqueue(hold_sync, "stuck", timeout=0.2)
                await wait_until(lambda: "timed out" in caplog.text)
        assert "(1 threads of pools replaced" in caplog.text
    finally:
        state.thread_gate.set()


async def test_timeout_must_be_positive(queue: TaskQueue) -> None:
    for bad in (0, -1, timedelta(0)):
        with pytest.raises(ValidationError, match="timeout"):
            await queue.enqueue(record, "x", timeout=bad)  # type: ignore[arg-type]
    # Positive, but under the microsecond a timedelta can hold.
    with pytest.raises(ValidationError, match="timeout must be at least 1 microsecond"):
        await queue.enqueue(record, "x", timeout=1e-9)
    assert sum((await queue.counts()).values()) == 0


# -- cancel --------------------------------------------------------------------------------


async def test_cancelled_pending_and_scheduled_tasks_never_run(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    ready = await queue.enqueue(record, "ready")
    scheduled = await queue.enqueue(record, "scheduled", delay=60)
    kept = await queue.enqueue(record, "kept")
    assert await queue.cancel(ready) is True
    assert await queue.cancel(scheduled) is True
    assert await queue.cancel(scheduled) is False, "cancelled twice"
    clock.advance(120)
    assert await fake_worker(backend, clock).serve(burst=True) == 1
    assert state.log == ["kept"]
    for task_id in (ready, scheduled):
        task = await queue.get_task(task_id)
        assert task is not None and task.status is TaskStatus.CANCELLED
        assert task.attempts == 0 and task.finished_at == at(0)
        result = await queue.get_result(task_id, timeout=5)
        assert result is not None and result.status == "cancelled"
    assert await queue.cancel(kept) is False, "cancelled a finished task"
    assert await queue.cancel("no-such-task") is False


async def test_cancelling_a_running_async_task(backend: Backend, state: _State) -> None:
    queue = TaskQueue(backend)  # real time: the heartbeat sees the request within 0.05 s
    task_id = await queue.enqueue(hold, "running")
    worker = Worker(backend, visibility_timeout=0.3, poll_interval=0.05)
    async with serving(worker):
        await wait_until(lambda: state.log == ["running"])
        task = await queue.get_task(task_id)
        assert task is not None and task.status is TaskStatus.RUNNING
        assert await queue.cancel(task_id) is True
        result = await queue.get_result(task_id, timeout=10)
    assert result is not None and result.status == "cancelled"
    assert result.error == "cancelled while running"
    assert result.attempts == 1
    assert await queue.cancel(task_id) is False
    assert (await queue.counts())["cancelled"] == 1


# -- inspection ----------------------------------------------------------------------------


async def test_get_task_list_tasks_and_counts(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    a = await queue.enqueue(record, "a", queue="a", priority=3, max_retries=2, eta=at(60))
    clock.advance(1)
    b = await queue.enqueue(record, "b", queue="b", interval=1500)
    clock.advance(1)
    c = await queue.enqueue(record, "c")

    task_a = await queue.get_task(a)
    assert task_a is not None
    assert (task_a.id, task_a.queue, task_a.kind) == (a, "a", "task")
    assert (task_a.status, task_a.priority, task_a.attempts) == (TaskStatus.PENDING, 3, 0)
    assert (task_a.max_attempts, task_a.max_retries) == (3, 2)
    assert task_a.enqueued_at == at(0)
    assert task_a.eta == task_a.available_at == at(60)
    assert task_a.started_at is None and task_a.finished_at is None
    assert task_a.interval is None and task_a.series_id is None
    assert task_a.error is None and task_a.result is None
    task_b = await queue.get_task(b)
    assert task_b is not None
    assert task_b.interval == timedelta(milliseconds=1500) and task_b.series_id == b
    assert task_b.queue == "b" and task_b.eta == at(1)

    assert [t.id for t in await queue.list_tasks()] == [c, b, a]
    assert [t.id for t in await queue.list_tasks(limit=2)] == [c, b]
    assert [t.id for t in await queue.list_tasks(queue="a")] == [a]
    assert await queue.list_tasks(queue="nothing") == []

    assert await fake_worker(backend, clock).serve(burst=True) == 2  # b then c
    task_c = await queue.get_task(c)
    assert task_c is not None
    assert (task_c.status, task_c.attempts) == (TaskStatus.SUCCESS, 1)
    assert task_c.started_at == task_c.finished_at == at(2)
    pending = await queue.list_tasks(status="pending")
    assert len(pending) == 2 and pending[1].id == a
    b_next = pending[0]
    assert b_next.series_id == b and b_next.available_at == at(2.5)
    assert [t.id for t in await queue.list_tasks(status=TaskStatus.SUCCESS)] == [c, b]
    assert [t.id for t in await queue.list_tasks(status="success", queue="b")] == [b]
    assert [t.id for t in await queue.list_tasks()] == [b_next.id, c, b, a]

    assert await queue.counts() == {
        "pending": 2,
        "running": 0,
        "success": 2,
        "failed": 0,
        "cancelled": 0,
        "dead": 0,
    }
    assert (await queue.counts(queue="a"))["pending"] == 1
    assert (await queue.counts(queue="a"))["success"] == 0
    assert await queue.get_task("no-such-task") is None
    assert await queue.get_result("no-such-task", timeout=1) is None
    with pytest.raises(ValidationError, match="unknown status"):
        await queue.list_tasks(status="bogus")
    with pytest.raises(ValidationError, match="limit"):
        await queue.list_tasks(limit=0)


async def test_list_tasks_breaks_ties_newest_first(queue: TaskQueue) -> None:
    ids = await queue.enqueue_many([(record, (str(n),)) for n in range(5)])
    assert [t.id for t in await queue.list_tasks()] == ids[::-1]


# -- named queues and priorities -----------------------------------------------------------


async def test_a_worker_serves_only_its_queues(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    await queue.enqueue(record, "a1", queue="a")
    await queue.enqueue(record, "b1", queue="b")
    await queue.enqueue(record, "d1")
    await queue.enqueue(record, "a2", queue="a")
    assert await fake_worker(backend, clock, queues=["a"]).serve(burst=True) == 2
    assert state.log == ["a1", "a2"]
    assert (await queue.counts(queue="b"))["pending"] == 1
    assert (await queue.counts(queue="default"))["pending"] == 1
    assert await fake_worker(backend, clock, queues=["b", "default"]).serve(burst=True) == 2
    assert sorted(state.log[2:]) == ["b1", "d1"]
    with pytest.raises(ValidationError, match="queues"):
        Worker(backend, queues="a")  # type: ignore[arg-type]


async def test_priority_first_then_due_time(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    await queue.enqueue(record, "low", eta=at(-30))
    await queue.enqueue(record, "high-late", priority=5, eta=at(-10))
    await queue.enqueue(record, "negative", priority=-1, eta=at(-50))
    await queue.enqueue(record, "mid", priority=1, eta=at(-40))
    await queue.enqueue(record, "high-early", priority=5, eta=at(-20))
    await queue.enqueue(record, "future", priority=9, eta=at(10))
    await queue.enqueue(record, "low-later", eta=at(-5))
    worker = fake_worker(backend, clock, max_concurrency=1)
    assert await worker.serve(burst=True) == 6
    assert state.log == ["high-early", "high-late", "mid", "low", "low-later", "negative"]
    clock.advance(10)
    assert await worker.serve(burst=True) == 1
    assert state.log[-1] == "future"
    with pytest.raises(ValidationError, match="priority"):
        await queue.enqueue(record, "x", priority=1.5)  # type: ignore[arg-type]


async def test_priority_and_max_retries_fit_a_postgresql_integer_on_every_backend(
    queue: TaskQueue,
) -> None:
    for priority in (2**31, -(2**31) - 1, 2**63):
        with pytest.raises(ValidationError, match="priority must be between"):
            await queue.enqueue(record, "x", priority=priority)
    with pytest.raises(ValidationError, match="max_retries must be between"):
        await queue.enqueue(record, "x", max_retries=2**31 - 1)
    assert sum((await queue.counts()).values()) == 0
    for priority in (2**31 - 1, -(2**31)):
        task_id = await queue.enqueue(record, "x", priority=priority, max_retries=2**31 - 2)
        task = await queue.get_task(task_id)
        assert task is not None and task.priority == priority


async def test_equal_priority_and_due_time_run_in_enqueue_order(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    labels = [f"job-{n}" for n in range(8)]
    await queue.enqueue_many([(record, (label,)) for label in labels])
    assert await fake_worker(backend, clock, max_concurrency=1).serve(burst=True) == 8
    assert state.log == labels


# -- retention -------------------------------------------------------------------------------


async def test_purge_removes_only_finished_tasks_older_than_the_cutoff(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    old_success = await queue.enqueue(record, "ok")
    old_failed = await queue.enqueue(fail_numbered)
    old_cancelled = await queue.enqueue(record, "never", delay=1000)
    assert await queue.cancel(old_cancelled)
    pending = await queue.enqueue(record, "later", delay=1000)
    worker = fake_worker(backend, clock)
    assert await worker.serve(burst=True) == 2  # both finish at 0
    clock.advance(50)
    recent = await queue.enqueue(record, "recent")
    assert await worker.serve(burst=True) == 1  # finishes at 50
    clock.advance(50)  # now 100

    with pytest.raises(ValidationError, match="finished"):
        await queue.purge(older_than=0, statuses=["pending"])
    for one_status in ("success", TaskStatus.SUCCESS):
        with pytest.raises(ValidationError, match="statuses must be a list"):
            await queue.purge(statuses=one_status)
    assert await queue.purge(older_than=60, statuses=["failed"]) == 1
    assert await queue.get_task(old_failed) is None
    assert await queue.purge(older_than=timedelta(seconds=60)) == 2
    remaining = {task.id for task in await queue.list_tasks()}
    assert remaining == {pending, recent}
    assert old_success not in remaining and old_cancelled not in remaining
    assert await queue.purge(older_than=51) == 0, "purged a task finished 50 s ago"
    assert await queue.purge(older_than=49) == 1
    assert {task.id for task in await queue.list_tasks()} == {pending}


async def cancel_tasks(queue: TaskQueue, count: int) -> None:
    """``count`` finished (cancelled) tasks, finished now."""
    for task_id in await queue.enqueue_many([(record, ("x",))] * count):
        assert await queue.cancel(task_id)


async def test_purge_works_in_batches_and_reports_each(
    queue: TaskQueue, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sitq.queue

    monkeypatch.setattr(sitq.queue, "PURGE_BATCH", 2)
    await cancel_tasks(queue, 5)
    clock.advance(timedelta(seconds=1))
    batches: list[int] = []
    assert await queue.purge(progress=batches.append) == 5
    assert batches == [2, 2, 1]
    assert await queue.purge(progress=batches.append) == 0
    assert batches == [2, 2, 1, 0]


async def test_worker_prunes_a_large_backlog_a_batch_per_idle_turn(
    backend: Backend, queue: TaskQueue, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sitq.worker

    monkeypatch.setattr(sitq.worker, "PURGE_BATCH", 2)
    await cancel_tasks(queue, 5)
    clock.advance(timedelta(hours=2))
    purged: list[int] = []
    purge = backend.purge

    async def counting_purge(*args: Any, **kwargs: Any) -> int:
        removed = await purge(*args, **kwargs)
        purged.append(removed)
        return removed

    monkeypatch.setattr(backend, "purge", counting_purge)
    worker = fake_worker(backend, clock, retention=timedelta(hours=1), poll_interval=1)

    async def all_gone() -> bool:
        if await queue.list_tasks():
            clock.advance(timedelta(seconds=1))  # the next idle turn
            return False
        return True

    started = clock.now()
    async with serving(worker):
        await wait_until(all_gone)
    assert purged[:3] == [2, 2, 1]
    # Batch after batch at idle turns, not one batch per PRUNE_EVERY.
    assert clock.now() - started < sitq.worker.PRUNE_EVERY


async def test_worker_retention_prunes_as_time_passes(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    old = await queue.enqueue(record, "old")
    never = await queue.enqueue(record, "never", delay=timedelta(hours=10))
    worker = fake_worker(backend, clock, retention=timedelta(hours=1))
    async with serving(worker):
        await wait_until(lambda: settled(queue))
        clock.advance(timedelta(minutes=30))
        recent = await queue.enqueue(record, "recent")
        await wait_until(lambda: settled(queue))  # recent finishes at 30 min
        assert await queue.get_task(old) is not None, "pruned before its retention"
        clock.advance(timedelta(minutes=31))  # old finished 61 min ago

        async def old_is_gone() -> bool:
            return await queue.get_task(old) is None

        await wait_until(old_is_gone)
    assert await queue.get_task(recent) is not None
    assert await queue.get_task(never) is not None


async def test_a_worker_with_every_slot_busy_still_prunes(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    # The loop waited for a slot to free without ever reaching the prune: a worker
    # whose tasks all ran for hours pruned nothing meanwhile.
    old = await queue.enqueue(record, "old")
    worker = fake_worker(backend, clock, retention=timedelta(hours=1))
    async with serving(worker):
        await wait_until(lambda: settled(queue))
        await queue.enqueue(hold, "holds the only slot")
        await wait_until(lambda: "holds the only slot" in STATE.log)
        clock.advance(timedelta(hours=2))  # old is past retention, the slot still held

        async def old_is_gone() -> bool:
            return await queue.get_task(old) is None

        await wait_until(old_is_gone)
        assert STATE.gate is not None
        STATE.gate.set()


def hold_sync_then_fail(label: str) -> None:
    STATE.log.append(label)
    STATE.thread_gate.wait(10)
    raise ValueError("failed after the cancel")


async def test_a_cancel_that_meets_a_retry_finishes_the_task_now(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    # A running sync task cannot be interrupted; it fails with a day-long backoff ahead.
    a_day = RetryPolicy(max_retries=3, backoff=86_400, jitter=False)
    task_id = await queue.enqueue(hold_sync_then_fail, "x", retry=a_day)
    async with serving(fake_worker(backend, clock)):
        await wait_until(lambda: state.log == ["x"])
        assert await queue.cancel(task_id)
        state.thread_gate.set()
        result = await queue.get_result(task_id, timeout=10)
    assert result is not None and result.status == "cancelled"
    # Cancelled when the failure was recorded, not when the retry would have been due.
    assert result.finished_at == clock.now()


class _RefusesSomeResults:
    def dumps(self, obj: Any) -> bytes:
        if obj == "unstorable":
            raise TypeError("cannot store this")
        return DEFAULT_SERIALIZER.dumps(obj)

    def loads(self, data: bytes) -> Any:
        return DEFAULT_SERIALIZER.loads(data)


def give_unstorable() -> str:
    return "unstorable"


async def test_a_result_a_custom_serializer_refuses_fails_the_run_and_the_series_goes_on(
    backend: Backend, clock: FakeClock
) -> None:
    queue = TaskQueue(backend, serializer=_RefusesSomeResults(), clock=clock)
    first = await queue.enqueue(give_unstorable, interval=timedelta(hours=1))
    worker = fake_worker(backend, clock, serializer=_RefusesSomeResults())
    assert await worker.serve(burst=True) == 1
    runs = await series_of(queue, first)
    assert [task.status for task in runs] == [TaskStatus.FAILED, TaskStatus.PENDING]
    assert runs[0].error == "TypeError: cannot store this"


async def test_a_worker_on_a_clock_just_past_the_epoch_prunes_at_its_first_turn(
    backend: Backend,
) -> None:
    # The time of the last prune started at 0.0, the epoch's timestamp: on a clock
    # within a minute after the epoch (a FakeClock started there, a host with no
    # real-time clock before NTP sets it) the first turns took a prune for done.
    clock = FakeClock(datetime(1970, 1, 1, tzinfo=UTC))
    queue = TaskQueue(backend, clock=clock)
    first = await queue.enqueue(record, "first")
    assert await fake_worker(backend, clock, retention=None).serve(burst=True) == 1
    clock.advance(10)
    worker = fake_worker(backend, clock, retention=timedelta(seconds=5))
    await worker.serve(burst=True)  # its first turn prunes
    assert await queue.get_task(first) is None
    second = await queue.enqueue(record, "second")
    assert await worker.serve(burst=True) == 1
    clock.advance(10)
    await worker.serve(burst=True)
    assert await queue.get_task(second) is not None, "pruned again within PRUNE_EVERY"


async def test_a_series_that_starts_late_runs_once_then_returns_to_its_grid(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    # The first slot was a day ago (as after a day with no worker up): one run now,
    # not a second one at once for the latest slot, which the first run served.
    first = await queue.enqueue(
        record, "late", eta=clock.now() - timedelta(days=1), interval=timedelta(hours=1)
    )
    assert await fake_worker(backend, clock).serve(burst=True) == 1
    runs = await series_of(queue, first)
    assert [task.status for task in runs] == [TaskStatus.SUCCESS, TaskStatus.PENDING]
    assert runs[1].available_at == T0 + timedelta(hours=1)
    assert state.log == ["late"]


async def test_a_burst_prunes_before_it_ends(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    old = await queue.enqueue(record, "old")
    assert await fake_worker(backend, clock).serve(burst=True) == 1
    clock.advance(timedelta(hours=2))
    # A cron-style burst that finds nothing to run still prunes.
    assert await fake_worker(backend, clock, retention=timedelta(hours=1)).serve(burst=True) == 0
    assert await queue.get_task(old) is None


async def test_a_series_run_with_no_slot_left_before_datetime_max_succeeds_and_ends(
    backend: Backend,
) -> None:
    latest = datetime.max.replace(tzinfo=UTC)
    clock = FakeClock(latest - timedelta(days=1, hours=12))
    queue = TaskQueue(backend, clock=clock)
    first = await queue.enqueue(record, "near the end", interval=timedelta(days=1))
    assert await fake_worker(backend, clock).serve(burst=True) == 1
    clock.advance(timedelta(days=1))
    # This run's next slot would be past datetime.max: its outcome was recorded as a
    # failure to record ("OverflowError: date value out of range").
    assert await fake_worker(backend, clock).serve(burst=True) == 1
    task = await queue.get_task(first)
    assert task is not None and task.series_id is not None
    runs = await series_of(queue, task.series_id)
    assert [(run.status, run.error) for run in runs] == [(TaskStatus.SUCCESS, None)] * 2


async def test_a_burst_prunes_the_whole_backlog_a_batch_at_a_time(
    backend: Backend, queue: TaskQueue, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sitq.worker

    monkeypatch.setattr(sitq.worker, "PURGE_BATCH", 2)
    await cancel_tasks(queue, 5)
    clock.advance(timedelta(hours=2))
    assert await fake_worker(backend, clock, retention=timedelta(hours=1)).serve(burst=True) == 0
    assert await queue.list_tasks() == []


async def test_retention_prunes_only_the_workers_own_queues_and_no_messages(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    ours = await queue.enqueue(record, "ours", queue="a")
    theirs = await queue.enqueue(record, "theirs", queue="b")
    assert await fake_worker(backend, clock).serve(burst=True) == 2
    producer = Producer(backend, "a", max_deliveries=1, clock=clock)
    consumer = Consumer(backend, "a", clock=clock)
    archived, dead = await producer.enqueue_many([{"n": 1}, {"n": 2}])
    for message in await consumer.dequeue(batch_size=2):
        if message.id == archived:
            await consumer.archive(message.id)
        else:
            await consumer.release(message.id)
    assert await consumer.dequeue() == []  # the released one was read its once: dead
    assert [m.id for m in await consumer.dead_letters()] == [dead]
    clock.advance(timedelta(hours=2))

    worker = fake_worker(backend, clock, retention=timedelta(hours=1), queues=["a"])
    assert await worker.serve(burst=True) == 0
    assert await queue.get_task(ours) is None
    assert await queue.get_task(theirs) is not None, "pruned another queue's task"
    kept = {task.id: task.status for task in await backend.list_jobs(TaskQuery(kind="message"))}
    assert kept == {archived: TaskStatus.SUCCESS, dead: TaskStatus.DEAD}


async def test_a_busy_worker_prunes_without_waiting_for_an_idle_turn(
    backend: Backend, queue: TaskQueue, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = await queue.enqueue(record, "old")
    assert await fake_worker(backend, clock).serve(burst=True) == 1
    clock.advance(timedelta(hours=2))
    await queue.enqueue_many([(record, (f"busy-{n}",)) for n in range(20)])
    pending_at_prunes: list[int] = []
    purge = backend.purge

    async def watched_purge(*args: Any, **kwargs: Any) -> int:
        pending_at_prunes.append((await queue.counts())["pending"])
        return await purge(*args, **kwargs)

    monkeypatch.setattr(backend, "purge", watched_purge)
    worker = fake_worker(backend, clock, retention=timedelta(hours=1))
    assert await worker.serve(burst=True) == 20
    assert await queue.get_task(old) is None
    # The first prune came while work was still waiting, not after the backlog.
    assert pending_at_prunes[0] > 0


async def test_serve_refuses_a_worker_that_is_already_running(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    worker = fake_worker(backend, clock)
    async with serving(worker):
        with pytest.raises(WorkerError, match="already running"):
            await worker.serve(burst=True)
        # The refusal left the running worker whole: it still works, and stops.
        task_id = await queue.enqueue(record, "after")
        result = await queue.get_result(task_id, timeout=10)
        assert result is not None and result.status == "success"
    assert worker._main is None


async def test_an_idle_worker_takes_a_dead_workers_task_when_its_lease_runs_out(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    task_id = await queue.enqueue(record, "rescued")
    # A worker that died holding the task: its claim, and nothing after.
    lease = timedelta(seconds=60)
    [held] = await backend.claim(ClaimRequest("dead-worker", "task", 1, lease, clock.now()))
    assert held.id == task_id
    # A poll interval far past the lease: only the lease's end can wake the worker.
    worker = fake_worker(backend, clock, poll_interval=3600)
    async with serving(worker):
        await wait_until(lambda: worker._last_claim is not None)  # it found nothing
        clock.advance(timedelta(seconds=61))
        result = await queue.get_result(task_id, timeout=10)
    assert result is not None and (result.status, result.attempts) == ("success", 2)
    assert state.log == ["rescued"]


async def lose_runs(backend: Backend, clock: FakeClock, task_id: str, runs: int) -> None:
    """Workers that claim the task and die holding it, one after another."""
    lease = timedelta(seconds=60)
    for n in range(runs):
        [held] = await backend.claim(ClaimRequest(f"dead-{n}", "task", 1, lease, clock.now()))
        assert held.id == task_id
        clock.advance(lease + timedelta(seconds=1))


@pytest.mark.parametrize(
    ("max_retries", "lost", "runs"),
    [
        (0, MAX_LOST_RUNS - 1, True),
        (0, MAX_LOST_RUNS, False),
        (2, 2 + MAX_LOST_RUNS - 1, True),  # lost runs use up the retries first
        (2, 2 + MAX_LOST_RUNS, False),
    ],
)
async def test_a_task_whose_runs_are_lost_too_often_fails_instead_of_running(
    backend: Backend,
    queue: TaskQueue,
    clock: FakeClock,
    state: _State,
    max_retries: int,
    lost: int,
    runs: bool,
) -> None:
    # A task that takes its worker down (a segfault, the OOM killer) must not take
    # down every worker in turn for ever: lost runs beyond the retries are capped.
    task_id = await queue.enqueue(record, "poison?", max_retries=max_retries)
    await lose_runs(backend, clock, task_id, lost)
    worker = fake_worker(backend, clock)
    async with serving(worker):
        result = await queue.get_result(task_id, timeout=10)
    assert result is not None
    if runs:
        assert (result.status, result.attempts, state.log) == ("success", lost + 1, ["poison?"])
        return
    assert result.status == "failed" and state.log == []
    assert result.error is not None
    assert result.error.startswith(f"WorkerLost: {lost} runs ended with no outcome")


@pytest.mark.parametrize("recurring", [False, True])
async def test_a_task_cancelled_while_running_is_not_run_again_when_its_worker_is_lost(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State, recurring: bool
) -> None:
    every = timedelta(hours=1) if recurring else None
    task_id = await queue.enqueue(record, "cancelled", interval=every)
    [held] = await backend.claim(ClaimRequest("doomed", "task", 1, timedelta(seconds=60), T0))
    assert held.id == task_id
    assert await queue.cancel(task_id) is True  # running: asked to stop...
    clock.advance(timedelta(seconds=61))  # ...and its worker died before it could
    worker = fake_worker(backend, clock)
    async with serving(worker):
        result = await queue.get_result(task_id, timeout=10)
        await wait_until(lambda: settled(queue))
    assert result is not None and result.status == "cancelled"
    assert state.log == []
    # A cancelled run stops its series: no next run.
    assert [task.id for task in await queue.list_tasks(limit=10)] == [task_id]


async def test_a_series_goes_on_after_a_run_failed_for_lost_runs(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    first = await queue.enqueue(record, "tick", interval=timedelta(hours=1))
    await lose_runs(backend, clock, first, MAX_LOST_RUNS)
    worker = fake_worker(backend, clock)
    async with serving(worker):
        result = await queue.get_result(first, timeout=10)
        assert result is not None and result.status == "failed"
        runs = await series_of(queue, first)
        assert [task.status for task in runs] == [TaskStatus.FAILED, TaskStatus.PENDING]
        advance_to(clock, runs[1].available_at)
        second = await queue.get_result(runs[1].id, timeout=10)
    assert second is not None and second.status == "success"
    assert state.log == ["tick"]


async def test_a_worker_that_takes_back_its_own_running_task_does_not_run_it_twice(
    backend: Backend, queue: TaskQueue, clock: FakeClock, state: _State
) -> None:
    # The lease runs out while the task still runs here (as when a blocked event loop
    # misses its heartbeats), and this worker's next claim takes the task back.
    task_id = await queue.enqueue(hold, "once")
    worker = fake_worker(backend, clock, visibility_timeout=60, max_concurrency=2)
    async with serving(worker):
        await wait_until(lambda: state.log == ["once"])
        clock.advance(timedelta(seconds=61))

        async def taken_back() -> bool:
            task = await queue.get_task(task_id)
            return task is not None and task.attempts == 2

        await wait_until(taken_back)
        assert state.gate is not None
        state.gate.set()
        result = await queue.get_result(task_id, timeout=10)
    assert result is not None and result.status == "success"
    assert state.log == ["once"]  # one run, not a second one started beside it


class _ClockMovesDuringPurge(MemoryBackend):
    """A prune's round trip during which the test moves the fake clock: the window a
    slow server leaves between a worker's prune and its going to sleep."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.step: timedelta | None = None

    async def purge(
        self,
        finished_before: datetime,
        statuses: Sequence[TaskStatus],
        limit: int | None = None,
        *,
        kind: JobKind | None = None,
        queues: tuple[str, ...] | None = None,
    ) -> int:
        removed = await super().purge(finished_before, statuses, limit, kind=kind, queues=queues)
        step, self.step = self.step, None
        if step is not None:
            self.clock.advance(step)
        return removed


async def test_worker_prunes_when_the_clock_moved_during_its_last_prune(clock: FakeClock) -> None:
    backend = _ClockMovesDuringPurge(clock)
    queue = TaskQueue(backend, clock=clock)
    old = await queue.enqueue(record, "old")
    async with serving(fake_worker(backend, clock, retention=timedelta(hours=1))):
        await wait_until(lambda: settled(queue))
        backend.step = timedelta(hours=1)  # old is past retention once this prune returns
        clock.advance(timedelta(minutes=2))  # a prune is due; it finds nothing to remove

        async def old_is_gone() -> bool:
            return await queue.get_task(old) is None

        await wait_until(old_is_gone)


# -- enqueue_call ------------------------------------------------------------------------------


async def test_enqueue_call_passes_option_named_arguments_to_the_function(
    backend: Backend, queue: TaskQueue, clock: FakeClock
) -> None:
    task_id = await queue.enqueue_call(
        echo_options, args=(), kwargs={"queue": "x", "timeout": 5}, queue="q2", priority=4
    )
    task = await queue.get_task(task_id)
    assert task is not None and task.queue == "q2" and task.priority == 4
    assert await fake_worker(backend, clock, queues=["x"]).serve(burst=True) == 0
    assert await fake_worker(backend, clock, queues=["q2"]).serve(burst=True) == 1
    result = await queue.get_result(task_id, timeout=5)
    assert result is not None and result.status == "success"
    assert queue.deserialize_result(result) == ("x", 5)


async def test_enqueue_call_rejects_unknown_options(queue: TaskQueue) -> None:
    with pytest.raises(ValidationError, match="unknown enqueue options: bogus"):
        await queue.enqueue_call(echo_options, kwargs={"queue": "x", "timeout": 5}, bogus=1)
    with pytest.raises(ValidationError, match="unknown enqueue options: bogus"):
        await queue.enqueue_many([record], bogus=1)
    assert sum((await queue.counts()).values()) == 0


async def test_enqueue_call_and_enqueue_many_check_args_and_kwargs(queue: TaskQueue) -> None:
    for args in ("ab", 5, None, {"a": 1}):
        with pytest.raises(ValidationError, match="args must be a tuple or list"):
            await queue.enqueue_call(record, args=args)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="args must be a tuple or list"):
            await queue.enqueue_many([(record, args)])
    for kwargs in ({1: 2}, [1], [], "k"):
        with pytest.raises(ValidationError, match="kwargs must be a dict with str keys"):
            await queue.enqueue_call(record, kwargs=kwargs)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="kwargs must be a dict with str keys"):
            await queue.enqueue_many([(record, (), kwargs)])
    assert sum((await queue.counts()).values()) == 0
    assert await queue.enqueue_call(record, args=["x"], kwargs={})


async def test_queue_names_and_ids_are_checked_alike_on_every_backend(queue: TaskQueue) -> None:
    # NUL: PostgreSQL's text refuses it; a lone surrogate: UTF-8 cannot encode it.
    for name in ("a\x00b", "a\ud800", 7, ""):
        with pytest.raises(ValidationError, match="queue"):
            await queue.enqueue(record, "x", queue=name)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="queue"):
            await queue.list_tasks(queue=name)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="queue"):
            await queue.counts(queue=name)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="queue"):
            TaskQueue(queue.backend, default_queue=name)  # type: ignore[arg-type]
    assert sum((await queue.counts()).values()) == 0
    for task_id in (123, None, b"id", "a\x00", "\ud800"):
        for call in (queue.get_result, queue.get_task, queue.cancel, queue.retry):
            with pytest.raises(ValidationError, match="task_id"):
                await call(task_id)  # type: ignore[arg-type]
    assert await queue.get_task("no such id") is None
