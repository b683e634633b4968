"""TaskQueue + Worker through the public API, on every backend.

Nothing here sleeps to let things settle: tests wait on conditions with deadlines
(``wait_until``, ``get_result(timeout=...)``) or on events the tasks themselves set.
The timing bounds (wake-up latency, eta lateness) are correctness bounds, far above
what the code needs, not benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import POSTGRES_DSN, require_postgres, sessions_named
from helpers import in_forked_child, remove_sqlite_files, wait_until
from sitq import (
    BackendError,
    FakeClock,
    MemoryBackend,
    Producer,
    Result,
    ResultTimeoutError,
    RetryPolicy,
    SerializationError,
    SQLiteBackend,
    StorageUnavailableError,
    SyncClientError,
    SyncTaskQueue,
    SystemClock,
    Task,
    TaskQueue,
    TaskStatus,
    ValidationError,
    Worker,
    WorkerError,
)
from sitq.backends.base import (
    Backend,
    ClaimRequest,
    Finish,
    LeaseReport,
    Outcome,
    Reschedule,
    Settled,
)
from sitq.queue import new_id
from sitq.serialization import DEFAULT_SERIALIZER, CloudpickleSerializer
from sitq.worker import MAX_ERROR_CHARS

# -- task functions and the state they share with the tests ------------------------------
# They are module-level so cloudpickle stores them by reference: the worker (in this
# process) calls the very same functions and sees the same STATE.


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.max_running = 0
        self.started: dict[str, float] = {}
        self.started_at: dict[str, datetime] = {}
        self.finished: set[str] = set()
        self.gate = threading.Event()


STATE = _State()


@pytest.fixture(autouse=True)
def fresh_state() -> Iterator[_State]:
    global STATE
    STATE = _State()
    yield STATE
    STATE.gate.set()  # never leave a task thread blocked after a failed test


def add(a: int, b: int) -> int:
    return a + b


def explode(message: str) -> None:
    raise ValueError(message)


def mark_start(name: str) -> str:
    STATE.started[name] = time.monotonic()
    STATE.started_at[name] = datetime.now(UTC)
    return name


async def async_where() -> tuple[int, int]:
    return threading.get_ident(), id(asyncio.get_running_loop())


def sync_where() -> tuple[int, bool]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return threading.get_ident(), False
    return threading.get_ident(), True


def _enter() -> None:
    with STATE.lock:
        STATE.running += 1
        STATE.max_running = max(STATE.max_running, STATE.running)


def _leave() -> None:
    with STATE.lock:
        STATE.running -= 1


async def async_busy(seconds: float) -> None:
    _enter()
    try:
        await asyncio.sleep(seconds)  # the task's "work"
    finally:
        _leave()


def sync_busy(seconds: float) -> None:
    _enter()
    try:
        time.sleep(seconds)  # the task's "work"
    finally:
        _leave()


def wait_for_gate(name: str) -> str:
    STATE.started[name] = time.monotonic()
    if not STATE.gate.wait(30):
        raise RuntimeError("the test never opened the gate")
    STATE.finished.add(name)
    return name


def explode_with_unstorable_text() -> None:
    raise ValueError("NUL \x00 and a lone surrogate \udc80")


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class _OwnBaseException(BaseException):
    pass


def exit_the_process() -> None:
    raise SystemExit(3)


async def interrupt_the_loop() -> None:
    raise KeyboardInterrupt


async def raise_own_base_exception() -> None:
    raise _OwnBaseException("not an Exception")


def raise_unprintable() -> None:
    raise _UnprintableError


def make_generator() -> Iterator[int]:
    yield 1


async def double_on_the_loop(value: int) -> tuple[int, bool]:
    await asyncio.sleep(0)
    return value * 2, threading.current_thread() is threading.main_thread()


def returns_a_coroutine(value: int) -> Coroutine[Any, Any, tuple[int, bool]]:
    return double_on_the_loop(value)


class WatchedClock(SystemClock):
    """The system clock, telling the test when the worker goes to sleep and until when."""

    def __init__(self) -> None:
        self.sleeps: list[datetime] = []

    async def sleep_until(self, deadline: datetime, wakeup: asyncio.Event) -> None:
        self.sleeps.append(deadline)
        await super().sleep_until(deadline, wakeup)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def queue(backend: Backend) -> TaskQueue:
    return TaskQueue(backend)


@pytest.fixture
async def worker(backend: Backend) -> AsyncIterator[Worker]:
    """A started worker with a short poll, stopped after the test."""
    w = Worker(backend, max_concurrency=2, poll_interval=0.2)
    await w.start()
    try:
        yield w
    finally:
        STATE.gate.set()
        await w.stop(timeout=10)


def assert_aware_utc(moment: datetime | None) -> None:
    assert moment is not None and moment.utcoffset() == timedelta(0)


# -- results -------------------------------------------------------------------------------


async def test_worker_runs_a_task_and_get_result_returns_its_value(
    queue: TaskQueue, worker: Worker
) -> None:
    task_id = await queue.enqueue(add, 2, b=3)
    result = await queue.get_result(task_id, timeout=10)
    assert isinstance(result, Result)
    assert result.task_id == task_id
    assert result.status == "success" and result.ok
    assert queue.deserialize_result(result) == 5
    assert result.error is None and result.traceback is None
    assert result.attempts == 1
    for moment in (result.enqueued_at, result.started_at, result.finished_at):
        assert_aware_utc(moment)
    assert result.enqueued_at <= result.started_at <= result.finished_at  # type: ignore[operator]


async def test_failure_keeps_error_text_and_full_traceback(
    queue: TaskQueue, worker: Worker
) -> None:
    task_id = await queue.enqueue(explode, "kaboom-1234")
    result = await queue.get_result(task_id, timeout=10)
    assert result is not None
    assert result.status == "failed" and not result.ok
    assert result.error == "ValueError: kaboom-1234"
    assert result.traceback is not None
    assert result.traceback.startswith("Traceback (most recent call last):")
    assert "in explode" in result.traceback  # the frame of the task itself
    assert "raise ValueError(message)" in result.traceback
    assert result.traceback.rstrip().endswith("ValueError: kaboom-1234")
    with pytest.raises(ValueError, match="failed"):
        queue.deserialize_result(result)


async def test_get_result_of_unknown_id_is_none_at_once(queue: TaskQueue) -> None:
    started = time.monotonic()
    assert await queue.get_result("no-such-task") is None
    assert await queue.get_result("no-such-task", timeout=30) is None
    assert time.monotonic() - started < 1


async def test_get_result_timeout_raises_a_builtin_timeout_error(queue: TaskQueue) -> None:
    task_id = await queue.enqueue(add, 1, 1)  # no worker: it never finishes
    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        await queue.get_result(task_id, timeout=0.3)
    waited = time.monotonic() - started
    assert isinstance(caught.value, ResultTimeoutError)
    assert task_id in str(caught.value)
    assert 0.3 <= waited < 5
    task = await queue.get_task(task_id)
    assert task is not None and task.status is TaskStatus.PENDING


# -- eta -----------------------------------------------------------------------------------


async def test_naive_eta_is_rejected_naming_eta_and_stores_nothing(queue: TaskQueue) -> None:
    with pytest.raises(ValueError, match="eta") as caught:
        await queue.enqueue(add, 1, 2, eta=datetime(2030, 1, 1, 12, 0))
    assert "timezone" in str(caught.value) or "aware" in str(caught.value)
    assert await queue.list_tasks() == []


async def test_aware_eta_in_another_zone_is_stored_as_utc(queue: TaskQueue) -> None:
    plus_five = timezone(timedelta(hours=5, minutes=30))
    eta = datetime(2031, 6, 1, 9, 15, tzinfo=plus_five)
    task_id = await queue.enqueue(add, 1, 2, eta=eta)
    task = await queue.get_task(task_id)
    assert task is not None
    assert task.eta == eta
    assert task.eta.utcoffset() == timedelta(0)
    assert (task.eta.hour, task.eta.minute) == (3, 45)
    (listed,) = await queue.list_tasks()
    assert listed.eta == datetime(2031, 6, 1, 3, 45, tzinfo=UTC)


async def test_past_eta_runs_at_once(queue: TaskQueue, backend: Backend) -> None:
    w = Worker(backend, poll_interval=30)
    await w.start()
    try:
        eta = datetime.now(UTC) - timedelta(hours=1)
        started = time.monotonic()
        task_id = await queue.enqueue(add, 20, 22, eta=eta)
        result = await queue.get_result(task_id, timeout=10)
        assert result is not None and queue.deserialize_result(result) == 42
        assert time.monotonic() - started < 1
    finally:
        await w.stop()


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_argument",
    [threading.Lock, make_generator, lambda: (x for x in range(3))],
    ids=["lock", "generator", "generator-expression"],
)
async def test_unpicklable_argument_fails_at_enqueue_and_stores_nothing(
    queue: TaskQueue, bad_argument: Callable[[], Any]
) -> None:
    with pytest.raises(SerializationError) as caught:
        await queue.enqueue(add, bad_argument(), 1)
    assert isinstance(caught.value, ValueError)
    text = str(caught.value).lower()
    assert "pickle" in text or "serializ" in text
    assert "nothing was stored" in text
    assert await queue.list_tasks() == []
    assert (await queue.counts())["pending"] == 0


# -- how tasks run -------------------------------------------------------------------------


async def test_async_tasks_run_on_the_loop_and_sync_ones_in_threads(
    queue: TaskQueue, worker: Worker
) -> None:
    async_id = await queue.enqueue(async_where)
    sync_id = await queue.enqueue(sync_where)
    async_result = await queue.get_result(async_id, timeout=10)
    sync_result = await queue.get_result(sync_id, timeout=10)
    assert async_result is not None and sync_result is not None
    assert queue.deserialize_result(async_result) == (
        threading.get_ident(),
        id(asyncio.get_running_loop()),
    )
    sync_thread, had_loop = queue.deserialize_result(sync_result)
    assert sync_thread != threading.get_ident()
    assert had_loop is False


async def test_a_sync_task_that_returns_a_coroutine_has_it_run_on_the_loop(
    queue: TaskQueue, worker: Worker
) -> None:
    task_id = await queue.enqueue(returns_a_coroutine, 21)
    result = await queue.get_result(task_id, timeout=10)
    assert result is not None and result.status == "success", result
    assert queue.deserialize_result(result) == (42, True)


SELF_CANCELLED_RUNS: list[str] = []


async def cancels_itself(name: str) -> None:
    SELF_CANCELLED_RUNS.append(name)
    current = asyncio.current_task()
    assert current is not None
    current.cancel()  # as a library "cancelling the current task" would
    await asyncio.sleep(0)


async def test_an_async_task_that_cancels_itself_fails_once(
    queue: TaskQueue, backend: Backend
) -> None:
    # Its CancelledError was taken for the worker's shutdown: no outcome, the run
    # left to its lease, run again at each expiry, then failed as "WorkerLost".
    SELF_CANCELLED_RUNS.clear()
    task_id = await queue.enqueue(cancels_itself, "once")
    assert await asyncio.wait_for(Worker(backend).serve(burst=True), 10) == 1
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "failed"
    assert (result.attempts, SELF_CANCELLED_RUNS) == (1, ["once"])
    assert (result.error or "").startswith("CancelledError")
    assert "cancels_itself" in (result.traceback or "")


@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_stop_from_another_event_loop_stops_the_worker_there(
    backend_kind: str, make_backend: Callable[[str], Backend], timeout: float | None
) -> None:
    # A worker serving in a thread of its own (Worker.run there, say), stopped from
    # the main thread's loop: stop() raised "attached to a different loop", and the
    # worker ended only by the accident of an unsafe wake-up, or at its poll interval.
    backend = make_backend(backend_kind)
    worker = Worker(backend, poll_interval=3600)
    served: list[int] = []
    thread = threading.Thread(target=lambda: served.append(asyncio.run(worker.serve())))
    thread.start()
    try:
        await wait_until(lambda: worker._main is not None)
        await asyncio.wait_for(worker.stop(timeout), 10)
        assert worker._main is None
    finally:
        thread.join(10)
    assert not thread.is_alive() and served == [0]


async def test_a_stop_while_start_opens_the_backend_is_not_forgotten() -> None:
    # start() registered the worker only once the backend was open: a stop() during
    # the open returned at once, and the worker then served on.
    backend = _SlowToOpen()
    worker = Worker(backend, poll_interval=0.01)
    starting = asyncio.create_task(worker.start())
    await asyncio.wait_for(backend.opening.wait(), 10)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)
    assert not stopping.done(), "stop() returned before the worker had stopped"
    backend.may_open.set()
    await asyncio.wait_for(asyncio.gather(starting, stopping), 10)
    task_id = await TaskQueue(backend).enqueue(add, 1, 2)
    assert worker._main is None
    assert (await TaskQueue(backend).get_task(task_id)).status is TaskStatus.PENDING  # type: ignore[union-attr]


class _OpensOnSecondTry(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    async def open(self) -> None:
        self.tries += 1
        if self.tries == 1:
            raise BackendError("not yet")


async def test_a_start_whose_open_failed_leaves_the_worker_ready_to_start_again() -> None:
    backend = _OpensOnSecondTry()
    worker = Worker(backend)
    with pytest.raises(BackendError, match="not yet"):
        await worker.start()
    assert worker._main is None
    task_id = await TaskQueue(backend).enqueue(add, 1, 2)
    assert await worker.serve(burst=True) == 1
    assert (await TaskQueue(backend).get_task(task_id)).status is TaskStatus.SUCCESS  # type: ignore[union-attr]


async def test_a_stop_that_gives_up_while_start_opens_leaves_nothing_behind() -> None:
    # stop(timeout) gave up while start() was still opening: start() then raised
    # InvalidStateError, and the worker's wake-up subscription stayed (one more per
    # try), its threads never shut down and the backend's share never closed.
    backend = _SlowToOpen()
    worker = Worker(backend)
    starting = asyncio.create_task(worker.start())
    await asyncio.wait_for(backend.opening.wait(), 10)
    await asyncio.wait_for(worker.stop(timeout=0), 10)
    backend.may_open.set()
    await asyncio.wait_for(starting, 10)  # returns: the worker was stopped meanwhile
    assert worker._main is None and worker._threads is None
    assert backend.wakeup._waiters == {}


class _CountsCloses(MemoryBackend):
    closes = 0

    async def close(self) -> None:
        self.closes += 1


async def test_a_stop_that_gives_up_as_start_returns_leaves_nothing_behind() -> None:
    # stop(timeout)'s timeout passed in the loop turn in which start() had opened the
    # backend and returned, before the worker's task ran: the give-up cancelled that
    # task, which ended without closing the backend or unsubscribing its wake-up.
    backend = _CountsCloses()
    worker = Worker(backend)
    await worker.start()
    main = worker._main
    assert main is not None
    assert inspect.getcoroutinestate(main.get_coro()) == inspect.CORO_CREATED  # not run yet
    worker._stopping = True  # as a stop(timeout) made while start() opened did,
    await worker._give_up(main)  # and at its timeout, passing as start() returned
    await asyncio.wait_for(asyncio.wait({main}), 10)
    assert backend.closes == 1
    assert backend.wakeup._waiters == {}
    assert worker._threads is None and worker._main is None


async def test_two_starts_at_once_make_one_worker() -> None:
    backend = _SlowToOpen()
    worker = Worker(backend)
    starts = asyncio.gather(worker.start(), worker.start(), return_exceptions=True)
    await asyncio.wait_for(backend.opening.wait(), 10)
    backend.may_open.set()
    outcomes = await asyncio.wait_for(starts, 10)
    assert outcomes[0] is None and isinstance(outcomes[1], WorkerError)
    await worker.stop()


async def test_stop_waits_for_the_worker_not_for_the_task_that_called_serve(
    backend: Backend,
) -> None:
    # stop() awaited the whole task that called serve(): code after serve() in that
    # task delayed it (or deadlocked, if that code waited for the stop), and a
    # wait_for() timing out around stop() cancelled that task.
    worker = Worker(backend, poll_interval=0.05)
    after_serve = asyncio.Event()
    stopped = asyncio.Event()

    async def serve_then_wait_for_the_stop() -> int:
        served = await worker.serve()
        after_serve.set()
        await stopped.wait()
        return served

    runner = asyncio.create_task(serve_then_wait_for_the_stop())
    await wait_until(lambda: worker._main is not None)
    await asyncio.wait_for(worker.stop(), 10)
    stopped.set()
    assert await asyncio.wait_for(runner, 10) == 0
    assert after_serve.is_set()


async def test_overlapping_stops_both_return_when_one_gives_up(backend: Backend) -> None:
    # The stop without a timeout saw the worker's task cancelled by the one that gave
    # up, and raised CancelledError in a caller nobody had cancelled.
    queue = TaskQueue(backend)
    await queue.enqueue(async_busy, 60)
    worker = Worker(backend, poll_interval=0.05)
    await worker.start()
    await wait_until(lambda: worker._running)
    outcomes = await asyncio.wait_for(
        asyncio.gather(worker.stop(0.05), worker.stop(), return_exceptions=True), 20
    )
    assert outcomes == [None, None]


async def test_cancelling_serve_cancels_the_async_tasks_it_ran(backend: Backend) -> None:
    # They ran on, unwatched and their leases unrenewed, so another worker ran them
    # again once the lease ran out; their outcomes were never recorded.
    queue = TaskQueue(backend)
    task_id = await queue.enqueue(async_busy, 60)
    worker = Worker(backend, poll_interval=0.05)
    serving = asyncio.create_task(worker.serve())
    await wait_until(lambda: STATE.running == 1)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(serving, 10)
    await wait_until(lambda: STATE.running == 0)
    task = await queue.get_task(task_id)
    assert task is not None and task.status is TaskStatus.RUNNING  # left to its lease
    assert worker._main is None


async def test_a_sync_task_abandoned_as_it_returns_a_coroutine_does_not_start_it() -> None:
    # The thread had handed back the coroutine the task returned when the worker
    # abandoned the task (serve() cancelled, on Python 3.12 stop(timeout) giving up),
    # before that result reached _thread_done: it saw a result, not a cancellation,
    # and ran the coroutine on the loop, unwatched, after serve() had ended.
    backend = MemoryBackend()
    queue = TaskQueue(backend)
    worker = Worker(backend, poll_interval=0.05)
    await worker.start()
    runner = worker._threads
    assert runner is not None
    hand_back = runner._hand_back
    abandoned: list[Any] = []

    def hand_back_then_abandon() -> None:
        hand_back()  # the thread's future is done: _thread_done is queued
        abandoned.extend(worker._abandon_running())  # and the worker lets go first

    runner._hand_back = hand_back_then_abandon  # type: ignore[method-assign]
    await queue.enqueue(returns_a_coroutine, 1)
    await wait_until(lambda: abandoned)
    await asyncio.wait_for(worker.stop(), 10)
    (running,) = abandoned
    assert not running.is_async, "the coroutine was started after the abandon"
    coroutine = running.future.result()
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED  # no warning left


async def fail_on_the_loop() -> None:
    raise ValueError("the task's own error")


def test_an_async_task_s_failure_under_run_is_not_chained_to_run_s_loop_check(
    backend: Backend,
) -> None:
    # run() ran the worker inside the except clause of its "no running loop?" check:
    # each async task's stored traceback began with "RuntimeError: no running event
    # loop ... During handling of the above exception, another exception occurred".
    with SyncTaskQueue(backend) as client:
        task_id = client.enqueue(fail_on_the_loop)
        Worker(backend).run(burst=True)
        task = client.get_task(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert task.traceback is not None and "the task's own error" in task.traceback
    assert "RuntimeError" not in task.traceback
    assert "During handling" not in task.traceback


def test_run_inside_a_running_loop_is_refused_cleanly() -> None:
    async def call_run() -> None:
        Worker(MemoryBackend()).run()

    # Only the error: no "coroutine was never awaited" warning (an error here).
    with pytest.raises(WorkerError, match="await serve"):
        asyncio.run(call_run())
    gc.collect()


class _UnboundProxy:
    """Like an unbound lazy proxy (werkzeug's LocalProxy outside its context)."""

    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError("working outside of application context")


def returns_an_unbound_proxy() -> _UnboundProxy:
    return _UnboundProxy()


async def test_a_sync_result_whose_attributes_raise_fails_and_the_worker_goes_on(
    queue: TaskQueue, backend: Backend
) -> None:
    # Asking whether it was awaitable raised in the thread's done-callback: the task
    # stayed running for good (its lease renewed), and its slot was never freed.
    proxy_id = await queue.enqueue(returns_an_unbound_proxy)
    next_id = await queue.enqueue(add, 1, 2)

    assert await asyncio.wait_for(Worker(backend).serve(burst=True), 10) == 2
    failed = await queue.get_result(proxy_id, timeout=1)
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and "cannot pickle" in failed.error
    done = await queue.get_result(next_id, timeout=1)
    assert done is not None and queue.deserialize_result(done) == 3


async def test_a_task_whose_thread_cannot_start_is_retried_and_the_worker_goes_on(
    queue: TaskQueue, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = threading.Thread.start
    refused: list[str] = []

    def refuse_the_first_start(thread: threading.Thread) -> None:
        if not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse_the_first_start)
    task_id = await queue.enqueue(add, 1, 2, max_retries=1, retry=RetryPolicy(backoff=0))
    w = Worker(backend, poll_interval=0.2)
    async with asyncio.timeout(30):
        assert await w.serve(burst=True) == 2  # the refused attempt, then the retry
    assert refused
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "success" and result.attempts == 2
    assert queue.deserialize_result(result) == 3


async def test_a_failing_task_never_stops_the_worker(queue: TaskQueue, worker: Worker) -> None:
    failing = [await queue.enqueue(explode, f"bad-{n}") for n in range(3)]
    for task_id in failing:
        result = await queue.get_result(task_id, timeout=10)
        assert result is not None and result.status == "failed"
    ok_id = await queue.enqueue(add, 1, 1)
    result = await queue.get_result(ok_id, timeout=10)
    # The same worker, still serving, runs the next task.
    assert result is not None and queue.deserialize_result(result) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_concurrency": 0}, "max_concurrency must be between 1 and"),
        ({"max_concurrency": 2**63}, "max_concurrency must be between 1 and"),
        ({"max_concurrency": True}, "max_concurrency must be an int"),
        ({"poll_interval": 0}, "poll_interval must be positive"),
        ({"poll_interval": float("nan")}, "poll_interval"),
        ({"visibility_timeout": 0.01}, "visibility_timeout must be at least"),
        ({"visibility_timeout": 1e12}, "visibility_timeout must be at most"),
        ({"queues": "default"}, "queues must be a non-empty list"),
        ({"queues": [1]}, "queue must be a str"),
        ({"queues": ["a\x00b"]}, "queue must not contain NUL"),
        ({"name": 123}, "name must be a str"),
        ({"name": ""}, "name must not be empty"),
        ({"serializer": "pickle"}, "serializer must be an object with dumps"),
        # A class has the methods too: it failed every task the worker claimed.
        ({"serializer": CloudpickleSerializer}, "an instance, not a class"),
        ({"clock": FakeClock}, "clock must be an object with now"),
        ({"clock": "utc"}, "clock must be an object with now"),
        # An empty iterator is truthy: the worker served no queue at all.
        ({"queues": iter([])}, "queues must be a non-empty list"),
        ({"queues": (name for name in ())}, "queues must be a non-empty list"),
        ({"queues": 5}, "queues must be a non-empty list"),
        # Its lease owner must not pass for a consumer's holder ("name\x1fmessage:q").
        ({"name": "c\x1fmessage:q"}, "name must not contain control characters"),
    ],
)
def test_worker_rejects_bad_options_when_built(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Worker(MemoryBackend(), **options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry": 3}, "retry must be a RetryPolicy"),
        ({"queue_retry": {"emails": 5}}, r"queue_retry\['emails'\] must be a RetryPolicy"),
        ({"queue_retry": [("emails", RetryPolicy())]}, "queue_retry must map"),
        ({"queue_retry": {"": RetryPolicy()}}, "queue"),
        ({"serializer": object()}, "serializer must be an object with dumps"),
        ({"serializer": CloudpickleSerializer}, "an instance, not a class"),
        ({"clock": FakeClock}, "clock must be an object with now"),
    ],
)
def test_task_queue_rejects_bad_options_when_built(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TaskQueue(MemoryBackend(), **options)


async def test_a_bad_retry_option_is_rejected_and_a_falsy_one_not_ignored(
    backend: Backend,
) -> None:
    queue = TaskQueue(backend, retry=RetryPolicy(max_retries=2))
    for bad in (3, "x", 0):
        with pytest.raises(ValidationError, match="retry must be a RetryPolicy"):
            await queue.enqueue(add, 1, 2, retry=bad)
    assert await queue.list_tasks() == []


async def test_bad_batch_and_purge_arguments_are_refused_before_anything_changes(
    backend: Backend, queue: TaskQueue
) -> None:
    # A mapping iterated its keys: {add: (1, 2)} was stored as add(), which failed in
    # the worker. A progress that is not callable failed after the first batch went.
    for calls in ({add: (1, 2)}, "add", 5):
        with pytest.raises(ValidationError, match="calls must be an iterable"):
            await queue.enqueue_many(calls)  # type: ignore[arg-type]
    assert await queue.list_tasks() == []
    task_id = await queue.enqueue(add, 1, 2)
    assert await Worker(backend).serve(burst=True) == 1
    with pytest.raises(ValidationError, match="progress must be callable"):
        await queue.purge(progress="print")  # type: ignore[arg-type]
    assert await queue.get_task(task_id) is not None


@pytest.mark.parametrize("timeout", ["5", True, float("nan"), -1])
async def test_stop_refuses_a_bad_timeout_and_keeps_working(backend: Backend, timeout: Any) -> None:
    # "5" raised TypeError after the worker was told to stop; True counted as 1 s,
    # nan as no timeout and -1 as 0 (running tasks handed back at once).
    worker = Worker(backend, poll_interval=0.05)
    await worker.start()
    try:
        with pytest.raises(ValidationError, match="timeout"):
            await worker.stop(timeout=timeout)
        task_id = await TaskQueue(backend).enqueue(add, 1, 2)
        result = await TaskQueue(backend).get_result(task_id, timeout=10)
        assert result is not None and result.status == "success"
    finally:
        await worker.stop()


def takes_func_and_self(func: int, self: int) -> int:
    return func + self


async def test_a_task_may_take_func_and_self_keyword_arguments(
    backend: Backend, queue: TaskQueue
) -> None:
    task_id = await queue.enqueue(takes_func_and_self, func=1, self=2)
    assert await Worker(backend).serve(burst=True) == 1
    result = await queue.get_result(task_id, timeout=10)
    assert result is not None and queue.deserialize_result(result) == 3


def test_sync_purge_takes_progress_like_the_async_one(backend: Backend) -> None:
    with SyncTaskQueue(backend) as client:
        client.enqueue(add, 1, 2)
        Worker(backend).run(burst=True)
        batches: list[int] = []
        assert client.purge(statuses=["success"], progress=batches.append) == 1
        assert batches == [1]
        with pytest.raises(ValidationError, match="str"):
            client.purge(statuses="success")


class _Compressed:
    """A custom serializer whose loads raises its own error on foreign data."""

    def dumps(self, obj: Any) -> bytes:
        return zlib.compress(DEFAULT_SERIALIZER.dumps(obj))

    def loads(self, data: bytes) -> Any:
        return DEFAULT_SERIALIZER.loads(zlib.decompress(data))


class _ExitsWhenLoaded:
    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.exit, (3,))


@pytest.mark.parametrize("case", ["serializer mismatch", "SystemExit while loading"])
async def test_a_task_that_cannot_be_loaded_fails_and_the_worker_goes_on(
    backend: Backend, queue: TaskQueue, case: str
) -> None:
    if case == "serializer mismatch":
        bad_id = await queue.enqueue(add, 1, 2)  # default serializer; the worker's differs
        worker = Worker(backend, serializer=_Compressed(), poll_interval=0.05)
        good_id = await TaskQueue(backend, serializer=_Compressed()).enqueue(add, 2, 2)
        expected = "error: Error -3"
    else:
        bad_id = await queue.enqueue(add, _ExitsWhenLoaded(), 1)
        worker = Worker(backend, poll_interval=0.05)
        good_id = await queue.enqueue(add, 2, 2)
        expected = "SystemExit: 3"
    assert await worker.serve(burst=True) == 2
    bad = await queue.get_result(bad_id, timeout=10)
    assert bad is not None and bad.status == "failed"
    assert bad.error is not None and bad.error.startswith(expected)
    good = await queue.get_task(good_id)
    assert good is not None and good.status is TaskStatus.SUCCESS


async def stubborn() -> str:
    """Run until STATE.gate is set, ignoring every cancellation."""
    while not STATE.gate.is_set():
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            STATE.started["cancel ignored"] = time.monotonic()
    STATE.finished.add("stubborn")
    return "done anyway"


async def test_stop_with_a_timeout_returns_though_a_task_ignores_cancellation(
    backend: Backend, queue: TaskQueue
) -> None:
    task_id = await queue.enqueue(stubborn)
    worker = Worker(backend, poll_interval=0.05)
    await worker.start()

    async def running() -> bool:
        task = await queue.get_task(task_id)
        return task is not None and task.status is TaskStatus.RUNNING

    await wait_until(running)
    await asyncio.wait_for(worker.stop(timeout=0.2), 10)
    assert "cancel ignored" in STATE.started
    # Handed back, attempt undone; and what the orphaned run does next is not recorded.
    STATE.gate.set()
    await wait_until(lambda: "stubborn" in STATE.finished)
    task = await queue.get_task(task_id)
    assert task is not None and (task.status, task.attempts) == (TaskStatus.PENDING, 0)


async def raise_cancelled_error() -> None:
    raise asyncio.CancelledError  # as when awaiting a helper task that was cancelled


def return_slow_coroutine() -> Coroutine[Any, Any, None]:
    return asyncio.sleep(30)


class _ExitsWhenPickled:
    def __reduce__(self) -> tuple[Any, ...]:
        raise SystemExit(5)


def return_unpicklable_by_exiting() -> _ExitsWhenPickled:
    return _ExitsWhenPickled()


class _PrintExitsError(Exception):
    def __str__(self) -> str:
        raise SystemExit(9)


async def raise_unprintable_by_exiting() -> None:
    raise _PrintExitsError


@pytest.mark.parametrize(
    ("func", "options", "error"),
    [
        (raise_cancelled_error, {}, "CancelledError: "),
        (return_slow_coroutine, {"timeout": 0.2}, "TaskTimeoutError: "),
        (return_unpicklable_by_exiting, {}, "SystemExit: 5"),
        (raise_unprintable_by_exiting, {}, "_PrintExitsError: <str() of the exception failed>"),
    ],
    ids=["own CancelledError", "returned coroutine past timeout", "__reduce__", "__str__"],
)
async def test_what_escaped_the_task_before_is_its_failure_now(
    backend: Backend,
    queue: TaskQueue,
    func: Callable[..., Any],
    options: dict[str, Any],
    error: str,
) -> None:
    task_id = await queue.enqueue(func, **options)
    ok_id = await queue.enqueue(add, 1, 1)
    assert await Worker(backend, poll_interval=0.05).serve(burst=True) == 2
    result = await queue.get_result(task_id, timeout=10)
    assert result is not None and result.status == "failed"
    assert result.error is not None and result.error.startswith(error)
    ok = await queue.get_result(ok_id, timeout=10)
    assert ok is not None and ok.status == "success"


async def test_waiters_for_many_results_share_their_reads(
    backend: Backend, queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each waiter read its own task whenever any task finished: 200 waiters and 200
    # finishes one at a time were some 40,000 reads, starving the worker beside them.
    ids = await queue.enqueue_many([(add, (n, 1)) for n in range(200)])
    reads = 0
    for name in ("get", "list_jobs"):
        read = getattr(backend, name)

        async def counted(*args: Any, read: Any = read) -> Any:
            nonlocal reads
            reads += 1
            return await read(*args)

        monkeypatch.setattr(backend, name, counted)
    waiting = [asyncio.create_task(queue.get_result(task_id, timeout=60)) for task_id in ids]
    assert await Worker(backend).serve(burst=True) == 200
    results = await asyncio.wait_for(asyncio.gather(*waiting), 60)
    assert [queue.deserialize_result(r) for r in results if r is not None] == [
        n + 1 for n in range(200)
    ]
    # 200 first looks, then shared reads: one per announced finish or fallback poll.
    assert reads < 1_000, reads


async def test_a_task_deleted_while_awaited_on_a_busy_system_gives_none(
    backend: Backend, queue: TaskQueue
) -> None:
    # Finishes announced without pause (a busy worker) left no quiet moment for the
    # fallback poll, the only read that notices a task gone.
    task_id = await queue.enqueue(add, 1, 1)
    finishes = await backend.watch_finished()
    waiting = asyncio.create_task(queue.get_result(task_id, timeout=30))
    await wait_until(lambda: bool(queue._watches))
    assert await backend.delete(task_id)

    async def announce_finishes() -> None:
        while True:
            finishes.notify()
            await asyncio.sleep(0.001)

    busy = asyncio.create_task(announce_finishes())
    try:
        assert await asyncio.wait_for(waiting, 10) is None
    finally:
        busy.cancel()


async def test_waiters_hear_a_failure_to_watch_for_finishes(
    backend: Backend, queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shared reader died with the error and its waiters waited for ever.
    async def broken() -> Any:
        raise BackendError("cannot listen")

    monkeypatch.setattr(backend, "watch_finished", broken)
    task_id = await queue.enqueue(add, 1, 1)
    with pytest.raises(BackendError, match="cannot listen"):
        await asyncio.wait_for(queue.get_result(task_id), 10)


async def test_get_result_keeps_its_timeout_while_reads_hang(
    backend: Backend, queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In a storage outage a read waits for a connection (30 s and more on
    # PostgreSQL); get_result(timeout=3) returned after 60 s.
    task_id = await queue.enqueue(add, 1, 1)

    async def hangs(*args: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(backend, "list_jobs", hangs)
    with pytest.raises(ResultTimeoutError, match="status: pending"):
        await asyncio.wait_for(queue.get_result(task_id, timeout=0.05), 10)


def test_get_result_leaves_no_event_loop_behind() -> None:
    # Each loop that had waited stayed referenced by the client for good.
    queue = TaskQueue(MemoryBackend())

    async def wait_briefly() -> None:
        task_id = await queue.enqueue(add, 1, 1)
        with pytest.raises(ResultTimeoutError):
            await queue.get_result(task_id, timeout=0.01)

    for _ in range(3):
        asyncio.run(wait_briefly())
    assert queue._watches == {}


async def test_a_task_deleted_while_awaited_gives_none(backend: Backend, queue: TaskQueue) -> None:
    task_id = await queue.enqueue(add, 1, 1)
    waiting = asyncio.create_task(queue.get_result(task_id, timeout=30))
    await wait_until(lambda: bool(queue._watches))
    assert await backend.delete(task_id)
    assert await asyncio.wait_for(waiting, 30) is None


class _StrResults:
    """Loads calls as the default serializer does, but returns results as str."""

    def dumps(self, obj: Any) -> bytes:
        return repr(obj)  # type: ignore[return-value]

    def loads(self, data: bytes) -> Any:
        return DEFAULT_SERIALIZER.loads(data)


class _UnreadableNotesError(Exception):
    """The first read of its notes (traceback.format_exception reads them) raises.
    Only the first, so that logging can format it afterwards, under pytest too."""

    read = False

    @property
    def __notes__(self) -> list[str]:
        if not self.read:
            self.read = True
            raise ValueError("the notes cannot be read")
        return []


def _raise_unreadable_notes() -> None:
    raise _UnreadableNotesError("cannot load this argument")


class _LoadsBadly:
    """Pickles fine; unpickling raises an exception that cannot be formatted."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_raise_unreadable_notes, ())


def text_of(length: int) -> str:
    return "x" * length


def raise_long(length: int) -> None:
    raise RuntimeError("y" * length)


async def test_a_result_a_serializer_did_not_make_bytes_of_fails_the_task(
    backend: Backend, queue: TaskQueue
) -> None:
    # It was stored as str (SQLite: read back as a TypeError), as NULs for an int,
    # or refused by PostgreSQL at every settle, which wedged the worker.
    task_id = await queue.enqueue(add, 1, 2)
    ok_id = await queue.enqueue(add, 2, 2, queue="other")
    assert await Worker(backend, serializer=_StrResults(), queues=["default"]).serve(burst=True)
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "failed"
    assert "the serializer's dumps returned str, not bytes" in (result.error or "")
    with pytest.raises(SerializationError, match="returned str, not bytes"):
        await TaskQueue(backend, serializer=_StrResults()).enqueue_call(add, args=(1, 1))
    assert await Worker(backend).serve(burst=True) == 1
    ok = await queue.get_result(ok_id, timeout=0)
    assert ok is not None and queue.deserialize_result(ok) == 4


async def test_payloads_past_the_size_limit_are_refused_results_fail(
    backend: Backend, queue: TaskQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sitq.serialization

    monkeypatch.setattr(sitq.serialization, "MAX_PAYLOAD_BYTES", 2_000)
    with pytest.raises(SerializationError, match="over sitq's limit of 2,000"):
        await queue.enqueue(text_of, "x" * 5_000)
    with pytest.raises(SerializationError, match="over sitq's limit"):
        await Producer(backend, "jobs").enqueue({"text": "x" * 5_000})
    assert sum((await queue.counts()).values()) == 0
    big = await queue.enqueue(text_of, 5_000)
    assert await Worker(backend).serve(burst=True) == 1
    result = await queue.get_result(big, timeout=0)
    assert result is not None and result.status == "failed"
    assert "the result is 5,0" in (result.error or "") and "store large data elsewhere" in (
        result.error or ""
    )


async def test_an_argument_whose_loading_error_cannot_be_formatted_fails_the_task(
    backend: Backend, queue: TaskQueue
) -> None:
    # Formatting the error raised out of the worker's loop: serve() raised and the
    # task stayed running, taking down every worker in turn.
    task_id = await queue.enqueue(add, _LoadsBadly(), 1)
    ok_id = await queue.enqueue(add, 1, 1)
    assert await Worker(backend).serve(burst=True) == 2
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "failed"
    assert "cannot load this argument" in (result.error or "")
    ok = await queue.get_result(ok_id, timeout=0)
    assert ok is not None and ok.status == "success"


def raise_unreadable_notes(counter: str) -> None:
    with Path(counter).open("a") as runs:
        runs.write("run\n")
    raise _UnreadableNotesError("the real problem")


async def test_an_error_that_cannot_be_formatted_keeps_its_text_and_retries(
    backend: Backend, tmp_path: Path
) -> None:
    # Formatting its traceback raised: the task was failed at once ("could not
    # record this task's outcome"), its own error, frames and retries lost.
    clock = FakeClock()
    queue = TaskQueue(backend, clock=clock)
    counter = tmp_path / "runs"
    task_id = await queue.enqueue(raise_unreadable_notes, str(counter), max_retries=2)
    worker = Worker(backend, clock=clock)
    for _ in range(3):
        await worker.serve(burst=True)
        clock.advance(3600)
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "failed"
    assert (result.attempts, counter.read_text().count("run")) == (3, 3)
    assert result.error == "_UnreadableNotesError: the real problem"
    assert "raise_unreadable_notes" in (result.traceback or "")


async def test_a_long_error_is_kept_by_its_start_and_end(
    backend: Backend, queue: TaskQueue
) -> None:
    task_id = await queue.enqueue(raise_long, 3 * MAX_ERROR_CHARS)
    assert await Worker(backend).serve(burst=True) == 1
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.error is not None and result.traceback is not None
    assert result.error.startswith("RuntimeError: yyy") and result.error.endswith("yyy")
    assert "characters cut ...]" in result.error
    assert len(result.error) < MAX_ERROR_CHARS + 100
    assert len(result.traceback) < MAX_ERROR_CHARS + 100


async def test_an_outcome_the_storage_refuses_fails_alone_and_the_others_are_recorded(
    tmp_path: Path,
) -> None:
    # A real refusal: SQLite's limit on a value's length, lowered for the test from
    # 1 GB (a result past it wedged the worker, retrying the settle for ever).
    backend = SQLiteBackend(tmp_path / "limited.db")
    async with TaskQueue(backend) as queue:
        backend._connection().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 20_000)
        big = await queue.enqueue(text_of, 50_000)
        small = [await queue.enqueue(add, n, 1) for n in range(3)]
        # Four slots: the four outcomes are settled together, and that settle fails.
        assert await Worker(backend, max_concurrency=4).serve(burst=True) == 4
        refused = await queue.get_result(big, timeout=0)
        assert refused is not None and refused.status == "failed"
        assert "could not store this task's outcome" in (refused.error or "")
        assert "too big" in (refused.error or "")
        for number, task_id in enumerate(small):
            result = await queue.get_result(task_id, timeout=0)
            assert result is not None and queue.deserialize_result(result) == number + 1


async def test_an_outcome_the_disk_has_no_room_for_waits_for_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The full disk's error was taken for this outcome's refusal: the task that
    # succeeded was recorded failed (its short failure fitted), for good.
    backend = SQLiteBackend(tmp_path / "full.db")
    async with TaskQueue(backend) as queue:
        task_id = await queue.enqueue(text_of, 200_000)
        conn = backend._connection()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        # SQLITE_FULL, as from a full disk: room to claim the task, not for its result.
        conn.execute(f"PRAGMA max_page_count = {pages + 5}")
        # A short lease: the waiting outcome's must be renewed, or the task runs again.
        # Two slots: the waiting outcome holds one (its task's lease), never more.
        worker = Worker(backend, max_concurrency=2, poll_interval=0.05, visibility_timeout=0.3)
        await worker.start()
        try:
            await wait_until(lambda: "database or disk is full" in caplog.text)
            # Meanwhile other tasks run and are recorded: kept waiting together with
            # the claim, that one outcome stopped the worker (nothing claimed or
            # recorded, and the task run again when its lease ran out).
            small = [await queue.enqueue(add, n, 1) for n in range(3)]
            for number, small_id in enumerate(small):
                result = await queue.get_result(small_id, timeout=10)
                assert result is not None and queue.deserialize_result(result) == number + 1
            task = await queue.get_task(task_id)
            assert task is not None and task.status == "running" and task.attempts == 1
            assert len(worker._running) + len(worker._waiting) <= 2
            conn.execute("PRAGMA max_page_count = 1073741823")  # room again
            result = await queue.get_result(task_id, timeout=10)
            assert result is not None and result.status == "success"
            assert queue.deserialize_result(result) == "x" * 200_000
        finally:
            await worker.stop()


class _NoRoomForBigResults(MemoryBackend):
    """Refuses, as a nearly full disk does, any settle holding a result over 1 KB."""

    room = False

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        if not self.room and any(
            isinstance(o, Finish) and o.result is not None and len(o.result) > 1000
            for o in outcomes
        ):
            raise StorageUnavailableError("database or disk is full")
        return await super().settle(outcomes, claim)


async def test_waiting_outcomes_hold_their_slots_and_hold_up_no_others() -> None:
    # Put back in front of every retry, two waiting outcomes stopped the one-by-one
    # pass ("two in a row") before any new outcome was tried: new tasks ran and were
    # never recorded, while claims went on past the slots, leases held for ever.
    backend = _NoRoomForBigResults()
    async with TaskQueue(backend) as queue:
        big = [await queue.enqueue(text_of, 5000) for _ in range(2)]
        worker = Worker(backend, max_concurrency=3, poll_interval=0.05)
        await worker.start()
        try:
            await wait_until(lambda: len(worker._waiting) == 2)
            small = [await queue.enqueue(add, n, 1) for n in range(3)]
            for number, small_id in enumerate(small):
                result = await queue.get_result(small_id, timeout=10)
                assert result is not None and queue.deserialize_result(result) == number + 1
            assert len(worker._running) + len(worker._waiting) <= 3
            backend.room = True
            for big_id in big:
                result = await queue.get_result(big_id, timeout=10)
                assert result is not None and result.status == "success"
        finally:
            backend.room = True
            await worker.stop(timeout=5)


class _ReleasesWhenAllowed(MemoryBackend):
    """Lease releases (reschedules) start, then wait for the test's word."""

    def __init__(self) -> None:
        super().__init__()
        self.releasing = threading.Event()
        self.may_release = threading.Event()

    async def reschedule(self, reschedule: Reschedule) -> bool:
        self.releasing.set()
        await asyncio.to_thread(self.may_release.wait, 10)
        return await super().reschedule(reschedule)


async def test_a_second_stop_does_not_end_the_worker_under_the_first_hand_back() -> None:
    # The second give-up found nothing to hand back and cleared the "handing back"
    # flag at once: the worker ended, and run()'s asyncio.run cancelled the first
    # stop's release under way, leaving the task running under its lease.
    backend = _ReleasesWhenAllowed()
    async with TaskQueue(backend) as queue:
        task_id = await queue.enqueue(async_busy, 60)
        worker = Worker(backend, poll_interval=0.05)
        hand_backs_done = 0
        hand_back = worker._hand_back_running

        async def counted_hand_back() -> None:
            nonlocal hand_backs_done
            await hand_back()
            hand_backs_done += 1

        worker._hand_back_running = counted_hand_back  # type: ignore[method-assign]
        thread = threading.Thread(target=lambda: asyncio.run(worker.serve()))
        thread.start()
        try:
            await wait_until(lambda: STATE.running == 1)
            first = asyncio.create_task(worker.stop(timeout=0.05))
            await wait_until(backend.releasing.is_set)
            second = asyncio.create_task(worker.stop(timeout=0.05))
            await wait_until(lambda: hand_backs_done == 1)  # the second's, with nothing
            assert worker._handing_back, "the worker may end under the first hand-back"
            backend.may_release.set()
            await asyncio.wait_for(asyncio.gather(first, second), 20)
        finally:
            backend.may_release.set()
            thread.join(20)
        task = await queue.get_task(task_id)
        assert task is not None and (task.status, task.attempts) == (TaskStatus.PENDING, 0)


class _ClaimsWhenAllowed(MemoryBackend):
    """A claim's answer is held back until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.claiming = asyncio.Event()
        self.may_answer = asyncio.Event()

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        settled = await super().settle(outcomes, claim)
        if settled.claimed:
            self.claiming.set()
            await self.may_answer.wait()
        return settled


async def test_a_task_claimed_as_stop_gives_up_is_handed_back_not_started() -> None:
    # The claim under way when stop(timeout) handed back what ran came back after it:
    # its tasks were started, ran until stop() gave up on the worker 5 s later, and
    # stayed under their leases, an attempt used.
    backend = _ClaimsWhenAllowed()
    async with TaskQueue(backend) as queue:
        worker = Worker(backend, poll_interval=0.05)
        await worker.start()
        try:
            task_id = await queue.enqueue(async_busy, 60)
            await asyncio.wait_for(backend.claiming.wait(), 10)
            stopping = asyncio.create_task(worker.stop(timeout=0.05))
            await wait_until(lambda: worker._giving_up)
            backend.may_answer.set()
            await asyncio.wait_for(stopping, 10)
        finally:
            backend.may_answer.set()
            await worker.stop()
        task = await queue.get_task(task_id)
        assert task is not None and (task.status, task.attempts) == (TaskStatus.PENDING, 0)
        assert STATE.running == 0


async def test_a_worker_whose_slots_wait_on_outcomes_does_not_look_for_work() -> None:
    # Its idle wait counted only running tasks as taken: with its one slot held by a
    # waiting outcome and a task due, it read the next due time and woke at once, for
    # ever (156,254 reads a second in the review's script).
    backend = _NoRoomForBigResults()
    looked_while_full: list[int] = []
    next_due = backend.next_due

    async def counting_next_due(*args: Any) -> Any:
        if len(worker._running) + len(worker._waiting) >= worker.max_concurrency:
            looked_while_full.append(1)
        return await next_due(*args)

    backend.next_due = counting_next_due  # type: ignore[method-assign]
    async with TaskQueue(backend) as queue:
        await queue.enqueue(text_of, 5000)
        clock = _SleepLengths()
        worker = Worker(backend, max_concurrency=1, poll_interval=0.05, clock=clock)
        await worker.start()
        try:
            await wait_until(lambda: len(worker._waiting) == 1)
            await queue.enqueue(add, 1, 2)  # due, but no slot for it
            seen = len(clock.lengths)
            await wait_until(lambda: len(clock.lengths) >= seen + 3)
            assert looked_while_full == []
        finally:
            backend.room = True
            await worker.stop(timeout=5)


@pytest.mark.parametrize("tasks", [1, 4])
async def test_a_stop_with_timeout_from_another_loop_hands_every_task_back(
    backend_kind: str, make_backend: Callable[[str], Backend], tasks: int
) -> None:
    # The first release's commit woke the worker's task, which ended and closed the
    # pool under the releases still under way: with 4 tasks, some stayed running.
    backend = make_backend(backend_kind)
    async with TaskQueue(backend) as queue:
        ids = [await queue.enqueue(async_busy, 60) for _ in range(tasks)]
        worker = Worker(backend, max_concurrency=tasks, poll_interval=0.05)
        thread = threading.Thread(target=lambda: asyncio.run(worker.serve()))
        thread.start()
        try:
            await wait_until(lambda: STATE.running == tasks)
            await asyncio.wait_for(worker.stop(timeout=0.1), 20)
        finally:
            thread.join(20)
        states = [await queue.get_task(task_id) for task_id in ids]
        assert [(t.status, t.attempts) for t in states if t is not None] == [
            (TaskStatus.PENDING, 0)
        ] * tasks


class _SlowToOpen(MemoryBackend):
    """Opens only when the test lets it: a PostgreSQL server slow to accept."""

    def __init__(self) -> None:
        super().__init__()
        self.opening = asyncio.Event()
        self.may_open = asyncio.Event()

    async def open(self) -> None:
        self.opening.set()
        await self.may_open.wait()


async def test_a_stop_while_the_backend_opens_is_not_forgotten() -> None:
    # run()'s first signal during open() was erased when serving began: the worker
    # ran on until a second signal.
    backend = _SlowToOpen()
    worker = Worker(backend)
    serving = asyncio.create_task(worker.serve())
    await asyncio.wait_for(backend.opening.wait(), 10)
    stopping = asyncio.create_task(worker.stop())
    await asyncio.sleep(0)
    backend.may_open.set()
    assert await asyncio.wait_for(serving, 10) == 0
    await asyncio.wait_for(stopping, 10)


class _GoesDown(MemoryBackend):
    """A store that fails every write from when the test says: an outage."""

    down = False
    failed_settles = 0

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        if self.down:
            self.failed_settles += 1
            raise StorageUnavailableError("the storage is down")
        return await super().settle(outcomes, claim)

    async def reschedule(self, outcome: Reschedule) -> bool:
        if self.down:
            raise StorageUnavailableError("the storage is down")
        return await super().reschedule(outcome)


class _BackAfterSettles(MemoryBackend):
    """Unreachable for the first ``failures`` settles that record outcomes, then back:
    an outage that ends while a worker works out which outcome failed."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        if outcomes and self.failures > 0:
            self.failures -= 1
            raise StorageUnavailableError("couldn't get a connection after 30.00 sec")
        return await super().settle(outcomes, claim)


class _ReleasesHang(MemoryBackend):
    """A store whose lease releases never answer: the storage went down at the stop."""

    async def reschedule(self, outcome: Reschedule) -> bool:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_stop_cancels_every_running_task_though_releases_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first task's release hung, stop() gave up on it, and the other tasks were
    # never cancelled: they ran on, unleased, after stop() returned.
    import sitq.worker

    monkeypatch.setattr(sitq.worker, "STOP_STORAGE_SECONDS", 0.2)
    backend = _ReleasesHang()
    queue = TaskQueue(backend)
    await queue.enqueue_many([(async_busy, (60,)) for _ in range(3)])
    worker = Worker(backend, max_concurrency=3)
    await worker.start()
    await wait_until(lambda: STATE.running == 3)
    await asyncio.wait_for(worker.stop(timeout=0.05), 10)
    await wait_until(lambda: STATE.running == 0)  # all three cancelled
    assert worker._running == {}


class _OutcomesHang(MemoryBackend):
    """A store whose writes of outcomes never answer (the SQLite file locked by another
    process, a pool waiting for a connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = asyncio.Event()

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        if outcomes:
            self.recording.set()
            await asyncio.Event().wait()
        return await super().settle(outcomes, claim)


async def test_stop_giving_up_on_an_outcome_being_recorded_says_it_was_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An outcome whose write was under way when stop() gave up was in no list the
    # give-up looked at: the worker stopped without a word, though the task had run
    # and would run again when its lease ran out. Found with SIGTERM while another
    # process held the SQLite write lock.
    import sitq.worker

    monkeypatch.setattr(sitq.worker, "STOP_STORAGE_SECONDS", 0.2)
    backend = _OutcomesHang()
    queue = TaskQueue(backend)
    task_id = await queue.enqueue(add, 1, 2)
    worker = Worker(backend)
    await worker.start()
    await asyncio.wait_for(backend.recording.wait(), 10)
    await asyncio.wait_for(worker.stop(timeout=0.05), 10)
    assert "could not record the last outcomes in time" in caplog.text
    task = await queue.get_task(task_id)
    assert task is not None and task.status is TaskStatus.RUNNING  # left to its lease


class _OutcomesHangLeasesSeen(_OutcomesHang):
    """Also notes the ids whose leases were renewed."""

    def __init__(self) -> None:
        super().__init__()
        self.renewed: set[str] = set()

    async def extend_leases(
        self, owner: str, ids: Sequence[str], lease: timedelta, now: datetime
    ) -> LeaseReport:
        self.renewed.update(ids)
        return await super().extend_leases(owner, ids, lease, now)


async def test_a_settle_under_way_keeps_its_tasks_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    # The heartbeat renewed running tasks and outcomes that wait, not those of a
    # settle still in its round trips: a long one (a pool's 30 s wait for a
    # connection, a one-by-one pass) let their leases run out, for another worker
    # to run the finished task again.
    import sitq.worker

    monkeypatch.setattr(sitq.worker, "STOP_STORAGE_SECONDS", 0.2)
    backend = _OutcomesHangLeasesSeen()
    queue = TaskQueue(backend)
    task_id = await queue.enqueue(add, 1, 2)
    worker = Worker(backend, visibility_timeout=0.3)
    await worker.start()
    try:
        await asyncio.wait_for(backend.recording.wait(), 10)
        backend.renewed.clear()
        await wait_until(lambda: task_id in backend.renewed)
    finally:
        await asyncio.wait_for(worker.stop(timeout=0.05), 10)


class _RenewalsSwallowCancel(MemoryBackend):
    """A store whose lease renewal takes a cancellation and returns, as a driver may
    when the renewal is cancelled mid-call."""

    def __init__(self) -> None:
        super().__init__()
        self.renewing = asyncio.Event()

    async def extend_leases(
        self, owner: str, ids: Sequence[str], lease: timedelta, now: datetime
    ) -> LeaseReport:
        if ids:
            self.renewing.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
        return await super().extend_leases(owner, ids, lease, now)


async def test_stop_returns_though_a_renewal_swallowed_the_heartbeat_s_cancel() -> None:
    # Seen on PostgreSQL, 1 stop in about 40: the serve loop's end cancelled the
    # heartbeat during a renewal, the call returned normally, and the heartbeat went
    # on beating: serve(), and the `sitq worker` process, waited for it for ever.
    backend = _RenewalsSwallowCancel()
    queue = TaskQueue(backend)
    await queue.enqueue(async_busy, 0.3)
    worker = Worker(backend, visibility_timeout=0.3)
    await worker.start()
    await asyncio.wait_for(backend.renewing.wait(), 10)
    await asyncio.wait_for(worker.stop(), 10)


async def test_an_outage_ending_mid_settle_records_the_outcome_not_a_failure() -> None:
    # Found against a real PostgreSQL stopped for 65 s: the batch and the outcome
    # alone failed for want of a connection, the server came back, and the plain
    # failure meant for a refused outcome was recorded for a task that succeeded.
    backend = _BackAfterSettles(failures=2)  # the batch, and the outcome alone
    queue = TaskQueue(backend)
    task_id = await queue.enqueue(add, 2, 3)
    assert await Worker(backend, poll_interval=0.01).serve(burst=True) == 1
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "success", result.error


async def test_stop_with_a_timeout_returns_though_the_storage_is_down() -> None:
    # A task that finished during an outage left an outcome stop() retried for ever.
    backend = _GoesDown()
    queue = TaskQueue(backend)
    finishing = await queue.enqueue(wait_for_gate, "finishes in the outage")
    worker = Worker(backend, max_concurrency=2, poll_interval=30)
    await worker.start()
    await wait_until(lambda: "finishes in the outage" in STATE.started)
    stuck = await queue.enqueue(wait_for_gate, "still running at the timeout")
    await wait_until(lambda: "still running at the timeout" in STATE.started)
    backend.down = True
    STATE.gate.set()
    await wait_until(lambda: len(STATE.finished) == 2)
    await asyncio.wait_for(worker.stop(timeout=0.1), 10)
    # Neither outcome was recorded: both tasks run again when their leases run out.
    for task_id in (finishing, stuck):
        task = await queue.get_task(task_id)
        assert task is not None and task.status is TaskStatus.RUNNING


class _SlowOutage(MemoryBackend):
    """The first ``failures`` settles that record outcomes fail, each after 20 s on the
    fake clock (a pool's wait for a connection); ``before_failures`` run as they begin,
    one each."""

    def __init__(self, clock: FakeClock, failures: int) -> None:
        super().__init__()
        self.clock = clock
        self.failures = failures
        self.before_failures: list[Callable[[], Awaitable[None]]] = []

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        if outcomes and self.failures > 0:
            if self.before_failures:
                await self.before_failures.pop(0)()
            self.failures -= 1
            self.clock.advance(20)
            raise StorageUnavailableError("couldn't get a connection after 20.00 sec")
        return await super().settle(outcomes, claim)


async def test_a_task_claimed_after_a_slow_failed_settle_gets_a_whole_lease() -> None:
    # The claim for the free slots that follows a failed settle went out with the
    # time of the turn's claim, from before the failed round trips (here 40 s, past
    # the 30 s lease): the task it started was claimable by another worker at once.
    clock = FakeClock()
    backend = _SlowOutage(clock, failures=2)  # the batch, and the outcome alone
    queue = TaskQueue(backend, clock=clock)
    await queue.enqueue(add, 1, 2)
    late: list[str] = []

    async def enqueue_late() -> None:
        late.append(await queue.enqueue(wait_for_gate, "claimed after the failures"))

    backend.before_failures = [enqueue_late]
    worker = Worker(backend, max_concurrency=2, poll_interval=5, visibility_timeout=30, clock=clock)
    await worker.start()
    try:
        await wait_until(lambda: "claimed after the failures" in STATE.started)
        lease_end = worker._running[late[0]].reserved.lease_expires_at
        assert lease_end == clock.now() + timedelta(seconds=30)
    finally:
        STATE.gate.set()
        await worker.stop(timeout=10)


async def test_a_stop_during_a_failed_settle_claims_nothing_more() -> None:
    # The claim for the free slots that follows a failed settle went out though stop()
    # had come while the outcomes were tried one by one: its task started after the
    # stop, which waited for it.
    clock = FakeClock()
    backend = _SlowOutage(clock, failures=2)  # the batch, and the outcome alone
    queue = TaskQueue(backend, clock=clock)
    await queue.enqueue(add, 1, 2)
    # A lease longer than the outage: the claim would take back the waiting task first.
    worker = Worker(
        backend, max_concurrency=2, poll_interval=5, visibility_timeout=120, clock=clock
    )
    late: list[str] = []
    stopping: list[asyncio.Task[None]] = []

    async def enqueue_late() -> None:
        late.append(await queue.enqueue(mark_start, "due at the stop"))

    async def stop_now() -> None:
        stopping.append(asyncio.create_task(worker.stop()))
        await asyncio.sleep(0)  # stop() has begun

    backend.before_failures = [enqueue_late, stop_now]
    await worker.start()
    await wait_until(lambda: stopping)
    await asyncio.wait_for(stopping[0], 10)
    task = await queue.get_task(late[0])
    assert task is not None and (task.status, task.attempts) == (TaskStatus.PENDING, 0)
    assert "due at the stop" not in STATE.started


async def test_a_stop_that_gives_up_tries_the_waiting_outcome_once_more() -> None:
    # An outcome that failed in an outage was retried every poll_interval; the give-up
    # woke the stop's wait after a failed try and dropped the outcome at once, though
    # the storage was back: the task, done, was left to run again at its lease's end.
    backend = _GoesDown()
    queue = TaskQueue(backend)
    task_id = await queue.enqueue(wait_for_gate, "finishes in the outage")
    worker = Worker(backend, poll_interval=30)
    await worker.start()
    await wait_until(lambda: "finishes in the outage" in STATE.started)
    backend.down = True
    STATE.gate.set()
    await wait_until(lambda: worker._waiting)
    failed = backend.failed_settles
    stopping = asyncio.create_task(worker.stop(timeout=0.5))
    await wait_until(lambda: backend.failed_settles > failed)  # the stop's try
    backend.down = False  # back before the stop's timeout, not tried until it
    await asyncio.wait_for(stopping, 10)
    task = await queue.get_task(task_id)
    assert task is not None and task.status is TaskStatus.SUCCESS


async def test_outcomes_holding_every_slot_are_retried_every_poll_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failed retry with no slot free (a settle without a claim) waited the poll
    # interval inside the settle, as the drain at a stop does, and the loop then
    # slept another: the outcomes were retried every two poll intervals. On a fake
    # clock the loop's sleeps pass as the test advances it; the wait in the settle,
    # on real time, held every retry after the first for 30 s.
    import sitq.worker

    clock = FakeClock()
    start = clock.now()
    real = time.monotonic

    def monotonic() -> float:  # the retries are timed on it: it follows the clock
        return real() + (clock.now() - start).total_seconds()

    monkeypatch.setattr(sitq.worker, "time", SimpleNamespace(monotonic=monotonic))
    backend = _GoesDown()
    queue = TaskQueue(backend, clock=clock)
    await queue.enqueue(wait_for_gate, "finishes in the outage")
    poll = 30
    worker = Worker(
        backend, max_concurrency=1, poll_interval=poll, visibility_timeout=3600, clock=clock
    )

    async def one_poll_one_retry() -> None:
        failed = backend.failed_settles
        clock.advance(poll)
        # A retry fails twice: all outcomes together, then the one alone.
        await wait_until(lambda: backend.failed_settles == failed + 2)

    await worker.start()
    try:
        await wait_until(lambda: "finishes in the outage" in STATE.started)
        backend.down = True
        STATE.gate.set()
        await wait_until(lambda: worker._waiting)
        for _ in range(3):
            await one_poll_one_retry()
    finally:
        backend.down = False
        await asyncio.wait_for(worker.stop(), 10)


class _ClaimsFail(MemoryBackend):
    """Takes no claim, as a full disk or a read-only PostgreSQL (a standby after a
    failover): reads still answer."""

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        if claim is not None:
            raise StorageUnavailableError("database or disk is full")
        return await super().settle(outcomes, claim)


class _SleepLengths(SystemClock):
    """The system clock, recording for how long the worker goes to sleep each time."""

    def __init__(self) -> None:
        self.lengths: list[float] = []

    async def sleep_until(self, deadline: datetime, wakeup: asyncio.Event) -> None:
        self.lengths.append((deadline - self.now()).total_seconds())
        await super().sleep_until(deadline, wakeup)


async def test_a_worker_whose_claims_fail_claims_again_after_the_poll_interval() -> None:
    # After a failed claim the worker read the next due time, the very task it had
    # failed to claim, and slept 1 ms: it claimed again, and logged the failure, about
    # 650 times a second (222 against a read-only PostgreSQL in the review's script).
    backend = _ClaimsFail()
    queue = TaskQueue(backend)
    await queue.enqueue(add, 1, 2)
    clock = _SleepLengths()
    worker = Worker(backend, poll_interval=30, clock=clock)
    await worker.start()
    try:
        await wait_until(lambda: clock.lengths)
        assert clock.lengths[0] > 29
    finally:
        await asyncio.wait_for(worker.stop(), 10)


def test_worker_takes_a_backend_and_durations_as_timedelta() -> None:
    with pytest.raises(ValidationError, match="backend must be a sitq Backend, got str"):
        Worker("tasks.db")  # type: ignore[arg-type]
    worker = Worker(MemoryBackend(), poll_interval=timedelta(milliseconds=250))
    assert worker.poll_interval == 0.25


@pytest.mark.parametrize(
    ("func", "error"),
    [
        (exit_the_process, "SystemExit: 3"),
        (interrupt_the_loop, "KeyboardInterrupt: "),
        (raise_own_base_exception, "_OwnBaseException: not an Exception"),
        (raise_unprintable, "_UnprintableError: <str() of the exception failed>"),
    ],
    ids=["sys.exit-in-thread", "KeyboardInterrupt-async", "BaseException-async", "bad-str"],
)
async def test_whatever_a_task_raises_is_its_failure_not_the_workers(
    queue: TaskQueue, worker: Worker, func: Callable[[], Any], error: str
) -> None:
    # Before, sys.exit() or KeyboardInterrupt in a task stopped the worker and left the
    # task 'running', to stop the next worker after its lease; another BaseException,
    # or an exception whose str() raised, left it 'running' and its slot taken.
    bad_id = await queue.enqueue(func, max_retries=0)
    result = await queue.get_result(bad_id, timeout=10)
    assert result is not None and (result.status, result.error) == ("failed", error)
    assert result.attempts == 1
    ok_id = await queue.enqueue(add, 1, 2)
    result = await queue.get_result(ok_id, timeout=10)
    assert result is not None and queue.deserialize_result(result) == 3


async def test_an_error_text_no_backend_can_store_is_escaped_not_lost(
    queue: TaskQueue, worker: Worker
) -> None:
    bad_id = await queue.enqueue(explode_with_unstorable_text)
    result = await queue.get_result(bad_id, timeout=10)
    assert result is not None and result.status == "failed"
    assert result.error == "ValueError: NUL \\x00 and a lone surrogate \\udc80"
    assert result.traceback is not None and "surrogate \\udc80" in result.traceback
    ok_id = await queue.enqueue(add, 2, 3)
    result = await queue.get_result(ok_id, timeout=10)
    assert result is not None and queue.deserialize_result(result) == 5


async def test_an_unpicklable_return_value_fails_the_task_not_the_worker(
    queue: TaskQueue, worker: Worker
) -> None:
    bad_id = await queue.enqueue(threading.Lock)
    result = await queue.get_result(bad_id, timeout=10)
    assert result is not None and result.status == "failed"
    assert result.error is not None and "SerializationError" in result.error
    assert "pickle" in result.error
    ok_id = await queue.enqueue(add, 2, 2)
    result = await queue.get_result(ok_id, timeout=10)
    assert result is not None and queue.deserialize_result(result) == 4


@pytest.mark.parametrize("func", [async_busy, sync_busy], ids=["async", "sync"])
async def test_max_concurrency_bounds_concurrent_runs(
    queue: TaskQueue, backend: Backend, func: Callable[[float], Any]
) -> None:
    ids = [await queue.enqueue(func, 0.05) for _ in range(9)]
    w = Worker(backend, max_concurrency=3, poll_interval=0.2)
    async with asyncio.timeout(30):
        processed = await w.serve(burst=True)
    assert processed == 9
    assert STATE.max_running == 3  # never more than 3, and the 3 slots were used
    assert STATE.running == 0
    for task_id in ids:
        result = await queue.get_result(task_id, timeout=0)
        assert result is not None and result.status == "success"


async def test_burst_mode_drains_due_tasks_and_returns(queue: TaskQueue, backend: Backend) -> None:
    ids = [await queue.enqueue(add, n, n) for n in range(6)]
    later = await queue.enqueue(add, 0, 0, delay=3600)
    w = Worker(backend, max_concurrency=2, poll_interval=30)
    async with asyncio.timeout(30):
        assert await w.serve(burst=True) == 6
    for n, task_id in enumerate(ids):
        result = await queue.get_result(task_id, timeout=0)
        assert result is not None and queue.deserialize_result(result) == 2 * n
    task = await queue.get_task(later)
    assert task is not None and task.status is TaskStatus.PENDING
    # Nothing due: a second burst returns at once, with nothing processed.
    async with asyncio.timeout(10):
        assert await w.serve(burst=True) == 0


async def test_stop_lets_the_running_task_finish(queue: TaskQueue, backend: Backend) -> None:
    w = Worker(backend, poll_interval=0.2)
    await w.start()
    task_id = await queue.enqueue(wait_for_gate, "slow")
    await wait_until(lambda: "slow" in STATE.started)
    stopping = asyncio.create_task(w.stop())
    # stop() must wait for the task: it cannot return while the task is blocked.
    await wait_until(lambda: w._stopping)
    assert not stopping.done()
    assert "slow" not in STATE.finished
    STATE.gate.set()
    async with asyncio.timeout(10):
        await stopping
    assert "slow" in STATE.finished
    result = await queue.get_result(task_id, timeout=0)
    assert result is not None and result.status == "success"
    assert queue.deserialize_result(result) == "slow"


async def test_stopped_worker_claims_nothing_more(queue: TaskQueue, backend: Backend) -> None:
    w = Worker(backend, poll_interval=0.2)
    await w.start()
    await w.stop()
    task_id = await queue.enqueue(add, 1, 1)
    with pytest.raises(TimeoutError):
        await queue.get_result(task_id, timeout=0.3)


# -- the sync client -----------------------------------------------------------------------


def test_sync_task_queue_works_from_plain_code(
    backend_kind: str, make_backend: Callable[[str], Backend]
) -> None:
    backend = make_backend(backend_kind)
    with SyncTaskQueue(backend) as client:
        ok_id = client.enqueue(add, 40, 2)
        bad_id = client.enqueue(explode, "sync-bad")
        later_id = client.enqueue(add, 0, 0, delay=3600)
        assert isinstance(ok_id, str)
        pending = client.get_task(later_id)
        assert isinstance(pending, Task) and pending.status is TaskStatus.PENDING
        assert Worker(backend, max_concurrency=2, poll_interval=0.2).run(burst=True) == 2

        result = client.get_result(ok_id, timeout=10)
        assert isinstance(result, Result)
        assert client.deserialize_result(result) == 42
        failed = client.get_result(bad_id, timeout=10)
        assert isinstance(failed, Result) and failed.status == "failed"
        assert failed.error == "ValueError: sync-bad"
        assert client.get_result("unknown") is None
        with pytest.raises(TimeoutError):
            client.get_result(later_id, timeout=0.1)

        listed = client.list_tasks()
        assert [t.id for t in listed] == [later_id, bad_id, ok_id]
        assert all(isinstance(t, Task) for t in listed)
        assert [t.id for t in client.list_tasks(status="success")] == [ok_id]
        counts = client.counts()
        assert (counts["success"], counts["failed"], counts["pending"]) == (1, 1, 1)
        assert client.cancel(later_id) is True
        assert client.cancel(later_id) is False
        assert client.retry(later_id) is True
        assert client.purge(statuses=["success"]) == 1


async def test_sync_task_queue_refuses_to_block_a_running_loop(backend: Backend) -> None:
    # Built where no loop runs (a plain thread), then misused inside this async test.
    client = await asyncio.to_thread(SyncTaskQueue, backend)
    try:
        with pytest.raises(SyncClientError) as caught:
            client.enqueue(add, 1, 2)
        assert isinstance(caught.value, RuntimeError)
        assert "event loop" in str(caught.value)
        with pytest.raises(SyncClientError):
            client.get_result("anything", timeout=1)
        with pytest.raises(RuntimeError):
            client.list_tasks()
    finally:
        await asyncio.to_thread(client.close)
    assert await TaskQueue(backend).list_tasks() == []


async def test_sync_task_queue_cannot_be_built_inside_a_running_loop(backend: Backend) -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    with pytest.raises(SyncClientError):
        SyncTaskQueue(backend)
    # The refused client leaves no loop thread running behind it.
    leaked = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    assert leaked == []


def test_sync_task_queue_that_cannot_open_its_backend_leaves_no_thread(tmp_path: Path) -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    with pytest.raises(BackendError, match="no such directory"):
        SyncTaskQueue(SQLiteBackend(tmp_path / "missing" / "sitq.db"))
    leaked = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    assert leaked == []


def test_a_sync_task_queue_copied_by_a_fork_refuses_in_the_child(tmp_path: Path) -> None:
    # The child has the object but not its loop thread: calls and close() waited for
    # that thread for ever.
    with SyncTaskQueue(SQLiteBackend(tmp_path / "sitq.db")) as client:

        def refused_in_the_child() -> int:
            try:
                client.enqueue(add, 1, 1)
            except SyncClientError as exc:
                code = 0 if "made in another process" in str(exc) else 2
            else:
                code = 1
            client.close()
            return code

        assert in_forked_child(refused_in_the_child) == 0
        # The parent's client is untouched.
        assert client.get_task(client.enqueue(add, 1, 1)) is not None


def test_a_forked_child_opens_its_own_sqlite_connection(tmp_path: Path) -> None:
    # The child went on with the parent's connection (SQLite forbids it: its locks
    # are the parent's, so the child's reads were unprotected from checkpoints).
    backend = SQLiteBackend(tmp_path / "sitq.db")
    queue = TaskQueue(backend)
    parent_id = asyncio.run(queue.enqueue(add, 1, 2))
    inherited = backend._local.conn

    def enqueue_in_the_child() -> int:
        child_id = asyncio.run(queue.enqueue(add, 2, 3))
        return 0 if backend._local.conn is not inherited and len(child_id) == 32 else 1

    assert in_forked_child(enqueue_in_the_child) == 0, "the child used its parent's connection"
    # The parent's connection goes on, and sees the child's task.
    assert backend._local.conn is inherited
    assert len(asyncio.run(queue.list_tasks())) == 2
    assert asyncio.run(queue.get_task(parent_id)) is not None


def test_a_child_forked_during_a_write_can_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite keeps its lock bookkeeping in process memory: a child forked while
    # another thread of the parent was inside a write believed it held the write
    # lock, and every write of its own failed "database is locked", for good.
    import sitq.backends.sqlite

    monkeypatch.setattr(sitq.backends.sqlite, "LOCK_PATIENCE_SECONDS", 2.0)
    backend = SQLiteBackend(tmp_path / "sitq.db")
    with SyncTaskQueue(backend) as client:
        client.enqueue(add, 1, 2)
        writing = threading.Event()

        def slow_write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE sitq_jobs SET priority = 1")
            writing.set()
            time.sleep(0.5)  # the write under way when the fork comes

        async def write_slowly() -> None:
            await backend._write(slow_write)

        writer = asyncio.run_coroutine_threadsafe(write_slowly(), client._loop)
        assert writing.wait(10)

        def enqueue_in_the_child() -> int:
            asyncio.run(TaskQueue(backend).enqueue(add, 3, 4))
            return 0

        assert in_forked_child(enqueue_in_the_child) == 0
        writer.result(10)
        assert len(client.list_tasks()) == 2


def test_an_sqlite_call_in_one_thread_does_not_hold_up_another(tmp_path: Path) -> None:
    # One lock around every SQLite call (for forks) made a long read in a client
    # thread stall every other thread's event loop, a worker's heartbeat included.
    backend = SQLiteBackend(tmp_path / "sitq.db")
    asyncio.run(TaskQueue(backend).enqueue(add, 1, 2))
    inside, may_end, ended = threading.Event(), threading.Event(), threading.Event()

    def long_read(conn: sqlite3.Connection) -> None:
        conn.execute("SELECT count(*) FROM sitq_jobs").fetchone()
        inside.set()
        may_end.wait(5)
        ended.set()

    reader = threading.Thread(target=lambda: asyncio.run(backend._read(long_read)))
    reader.start()
    try:
        assert inside.wait(10)
        assert len(asyncio.run(TaskQueue(backend).list_tasks())) == 1
        assert not ended.is_set(), "the other thread's call waited for the long read"
    finally:
        may_end.set()
        reader.join(10)


def test_a_forked_child_can_wait_on_a_wakeup_its_parent_was_using() -> None:
    # A fork copies a backend's Wakeup with its lock, held if another thread of the
    # parent was notifying at that moment: the child's first wait hung for ever.
    wakeup = MemoryBackend().wakeup

    async def wait_for_a_notify() -> None:
        woken = wakeup.subscribe()
        wakeup.notify()
        await asyncio.wait_for(woken.wait(), 5)

    def wait_in_the_child() -> int:
        asyncio.run(wait_for_a_notify())
        return 0

    with wakeup._lock:  # as another thread of the parent holding it at the fork
        assert in_forked_child(wait_in_the_child) == 0


def _until(condition: Callable[[], object], timeout: float = 10) -> None:
    """Block until ``condition()`` holds (the sync client's tests run without a loop)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_closing_a_sync_task_queue_ends_calls_waiting_in_other_threads(
    backend_kind: str, make_backend: Callable[[str], Backend]
) -> None:
    client = SyncTaskQueue(make_backend(backend_kind))
    task_id = client.enqueue(add, 1, 2, delay=3600)
    outcome: list[BaseException] = []

    def wait_for_ever() -> None:
        try:
            client.get_result(task_id)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_ever)
    waiter.start()
    _until(lambda: client._in_flight)
    client.close()
    waiter.join(10)
    assert not waiter.is_alive(), "a waiting get_result outlived close()"
    assert len(outcome) == 1 and isinstance(outcome[0], SyncClientError)
    assert "closed while the call waited" in str(outcome[0])


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_dropped_sync_task_queue_stops_its_thread_and_closes_its_backend(
    kind: str,
    make_backend: Callable[[str], Backend],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # Made per request and never closed, each client kept its loop thread (and its
    # connections) until the process exited.
    name = f"sitq_test_{uuid.uuid4().hex[:12]}"  # to count this test's sessions alone
    if kind == "postgres":
        require_postgres()
        from psycopg.conninfo import make_conninfo

        from sitq.backends.postgres import PostgresBackend

        dsn = make_conninfo(POSTGRES_DSN, application_name=name)
        backend: Backend = PostgresBackend(dsn, schema=request.getfixturevalue("pg_schema"))
    else:
        backend = make_backend(kind)
    client = SyncTaskQueue(backend)
    client.enqueue(add, 1, 2)
    thread = client._thread
    with pytest.warns(ResourceWarning, match="dropped without close"):
        del client
        gc.collect()
    thread.join(10)

    assert not thread.is_alive()
    if kind == "sqlite":  # the last connection to close removes the write-ahead log
        assert not (tmp_path / "sitq.db-wal").exists()
    else:
        assert sessions_named(name) == 0


async def test_a_refused_close_inside_a_loop_leaves_the_sync_client_open(
    backend: Backend,
) -> None:
    client = await asyncio.to_thread(SyncTaskQueue, backend)
    with pytest.raises(SyncClientError):
        client.close()
    # Refused, it changed nothing: the client still works from a thread, then closes.
    task_id = await asyncio.to_thread(client.enqueue, add, 1, 2)
    assert await TaskQueue(backend).get_task(task_id) is not None
    await asyncio.to_thread(client.close)
    with pytest.raises(SyncClientError, match="closed"):
        await asyncio.to_thread(client.enqueue, add, 1, 2)


def test_ctrl_c_during_a_sync_call_stops_the_call_on_the_loop(backend: Backend) -> None:
    with SyncTaskQueue(backend) as client:
        task_id = client.enqueue(add, 1, 2, delay=3600)
        here = threading.get_ident()
        threading.Timer(0.2, signal.pthread_kill, (here, signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            client.get_result(task_id)

        def still_waiting() -> bool:
            tasks = asyncio.all_tasks(client._loop)
            return any(task.get_coro().__name__ == "get_result" for task in tasks)

        # The waiting coroutine was cancelled with the call, not left on the loop.
        _until(lambda: not still_waiting())
        assert client.get_task(task_id) is not None


# -- waking up on time -----------------------------------------------------------------------


async def test_idle_worker_starts_a_task_enqueued_in_process_at_once(
    queue: TaskQueue, backend: Backend
) -> None:
    clock = WatchedClock()
    w = Worker(backend, poll_interval=30, clock=clock)
    await w.start()
    try:
        # Wait until the worker is asleep, with 30 s to go before its next poll.
        await wait_until(lambda: clock.sleeps)
        assert clock.sleeps[-1] - datetime.now(UTC) > timedelta(seconds=20)
        enqueued = time.monotonic()
        task_id = await queue.enqueue(mark_start, "now")
        result = await queue.get_result(task_id, timeout=10)
        assert result is not None and result.status == "success"
        assert STATE.started["now"] - enqueued < 1.0
    finally:
        await w.stop()


async def test_idle_worker_starts_an_eta_task_close_to_its_eta(
    queue: TaskQueue, backend: Backend
) -> None:
    clock = WatchedClock()
    w = Worker(backend, poll_interval=30, clock=clock)
    await w.start()
    try:
        await wait_until(lambda: clock.sleeps)
        eta = datetime.now(UTC) + timedelta(seconds=0.4)
        task_id = await queue.enqueue(mark_start, "eta", eta=eta)
        result = await queue.get_result(task_id, timeout=10)
        assert result is not None and result.status == "success"
        lateness = (STATE.started_at["eta"] - eta).total_seconds()
        assert 0 <= lateness < 0.5, f"started {lateness:+.3f} s after its eta"
    finally:
        await w.stop()


async def test_busy_worker_with_a_free_slot_starts_an_eta_task_close_to_its_eta(
    queue: TaskQueue, backend: Backend
) -> None:
    # One slot is taken by a long task; the other must still wake for the eta task
    # instead of waiting for the 30 s poll.
    clock = WatchedClock()
    w = Worker(backend, max_concurrency=2, poll_interval=30, clock=clock)
    await w.start()
    try:
        blocker = await queue.enqueue(wait_for_gate, "blocker")
        await wait_until(lambda: "blocker" in STATE.started)
        eta = datetime.now(UTC) + timedelta(seconds=0.4)
        task_id = await queue.enqueue(mark_start, "eta", eta=eta)
        result = await queue.get_result(task_id, timeout=10)
        assert result is not None and result.status == "success"
        lateness = (STATE.started_at["eta"] - eta).total_seconds()
        assert 0 <= lateness < 0.5, f"started {lateness:+.3f} s after its eta"
        STATE.gate.set()
        blocked = await queue.get_result(blocker, timeout=10)
        assert blocked is not None and blocked.status == "success"
    finally:
        STATE.gate.set()
        await w.stop()


async def test_idle_worker_wakes_for_a_task_enqueued_from_another_thread(
    backend: Backend,
) -> None:
    # The sync client runs its own loop in its own thread: the wake-up crosses loops.
    clock = WatchedClock()
    w = Worker(backend, poll_interval=30, clock=clock)
    await w.start()
    client = await asyncio.to_thread(SyncTaskQueue, backend)
    try:
        await wait_until(lambda: clock.sleeps)
        enqueued = time.monotonic()
        task_id = await asyncio.to_thread(client.enqueue, mark_start, "threaded")
        result = await TaskQueue(backend).get_result(task_id, timeout=10)
        assert result is not None and result.status == "success"
        assert STATE.started["threaded"] - enqueued < 1.0
    finally:
        await asyncio.to_thread(client.close)
        await w.stop()


def test_ids_sort_by_creation_time() -> None:
    before = time.time_ns() // 1000
    job_id = new_id()
    after = time.time_ns() // 1000
    assert len(job_id) == 32
    assert before <= int(job_id[:14], 16) <= after
    assert len({new_id() for _ in range(1000)}) == 1000


async def test_sqlite_watches_other_processes_only_where_something_waits(
    tmp_path: Path,
) -> None:
    """A process that only enqueues does not poll the file every few milliseconds; the
    first wait for a result (or for work) starts the watcher."""

    def watchers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name().startswith("sitq-sqlite-watch")]

    async with TaskQueue(SQLiteBackend(tmp_path / "sitq.db")) as client:
        task_id = await client.enqueue(add, 1, 2)
        assert watchers() == []
        with pytest.raises(ResultTimeoutError):
            await client.get_result(task_id, timeout=0.05)  # (0: one look, no wait)
        assert len(watchers()) == 1
    assert [t for t in watchers() if not t.done()] == []


def test_sqlite_threads_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """A worker and a client (or several processes) that open a new file together race
    to switch it to WAL and create the schema; SQLite answers the losers 'database is
    locked' at once. Each must wait its turn, not fail (it did about 1 time in 40)."""
    failures: list[BaseException] = []

    def open_backend(path: Path, start: threading.Barrier) -> None:
        backend = SQLiteBackend(path)
        start.wait()
        try:
            asyncio.run(backend.open())
        except BaseException as exc:
            failures.append(exc)

    for round_ in range(60):
        path = tmp_path / f"fresh-{round_}.db"
        start = threading.Barrier(4)
        threads = [threading.Thread(target=open_backend, args=(path, start)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


async def test_sqlite_opens_and_waits_for_another_process_s_write_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening took the write lock to look at the schema, with a 10 s busy timeout that
    # blocked the event loop, and a reader never got past opening while any other
    # process wrote. (Patience cut so the old behaviour fails in 10 s, not 40.)
    import sitq.backends.sqlite

    monkeypatch.setattr(sitq.backends.sqlite, "LOCK_PATIENCE_SECONDS", 2.0)
    path = tmp_path / "sitq.db"
    async with TaskQueue(SQLiteBackend(path)) as setup:
        task_id = await setup.enqueue(add, 1, 2)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other_process:
        other_process.execute("BEGIN IMMEDIATE")
        # A new backend object: another process's first calls.
        async with TaskQueue(SQLiteBackend(path)) as queue:
            task = await queue.get_task(task_id)  # readers do not wait for the writer
            assert task is not None and task.status == "pending"
            enqueuing = asyncio.create_task(queue.enqueue(add, 2, 2))
            longest = 0.0
            for _ in range(20):
                before = time.monotonic()
                await asyncio.sleep(0.005)
                longest = max(longest, time.monotonic() - before)
            assert not enqueuing.done()
            assert longest < 1.0, f"the event loop stood still for {longest:.1f} s"
            other_process.execute("COMMIT")
            new_id = await asyncio.wait_for(enqueuing, 10)
            assert await queue.get_task(new_id) is not None


async def _enqueue_in_another_process(path: Path) -> str:
    """Enqueue ``operator.add(1, 2)`` from a new process: its commit reaches this
    process's workers only through the file (no in-process wake-up)."""
    code = (
        "import asyncio, operator, sys\n"
        "from sitq import SQLiteBackend, TaskQueue\n"
        "async def main():\n"
        "    async with TaskQueue(SQLiteBackend(sys.argv[1])) as queue:\n"
        "        print(await queue.enqueue(operator.add, 1, 2))\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(path), stdout=asyncio.subprocess.PIPE, env=env
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return out.decode().strip()


async def _finished_by_the_worker(queue: TaskQueue, task_id: str) -> Task:
    """Wait for ``task_id`` to finish without ``get_result``, whose wait would watch
    the file for the worker."""

    async def finished() -> bool:
        task = await queue.get_task(task_id)
        return task is not None and task.status == "success"

    await wait_until(finished)
    task = await queue.get_task(task_id)
    assert task is not None
    return task


@contextlib.asynccontextmanager
async def _asleep_watching(backend: Backend) -> AsyncIterator[Worker]:
    """A started worker that polls only hourly, once it has gone to sleep: from then
    on only a wake-up (here, from another process's commit) makes it look."""
    clock = WatchedClock()
    worker = Worker(backend, poll_interval=3600, clock=clock)
    await worker.start()
    try:
        await wait_until(lambda: clock.sleeps)
        yield worker
    finally:
        await worker.stop()


async def test_a_client_closing_a_shared_sqlite_backend_leaves_the_worker_watching(
    tmp_path: Path,
) -> None:
    # The client's close() on the worker's loop stopped the loop's watcher of other
    # processes' commits (and closed the connection): their work then waited for the
    # worker's poll interval.
    path = tmp_path / "sitq.db"
    backend = SQLiteBackend(path)
    async with _asleep_watching(backend):
        async with TaskQueue(backend) as client:
            assert sum((await client.counts()).values()) == 0
        task_id = await _enqueue_in_another_process(path)
        await _finished_by_the_worker(TaskQueue(backend), task_id)


async def test_a_worker_watches_again_after_its_sqlite_backend_was_closed_under_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sitq.db"
    backend = SQLiteBackend(path)
    await backend.open()
    async with _asleep_watching(backend):
        await backend.close()
        await backend.close()  # one more than it opened: the watcher goes under the worker
        for _ in range(2):
            task_id = await _enqueue_in_another_process(path)
            await _finished_by_the_worker(TaskQueue(backend), task_id)


async def test_a_worker_whose_sqlite_file_was_deleted_serves_the_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its connection carried on with the deleted file, silently: work enqueued in the
    # file created at the path since never ran until the worker restarted.
    path = tmp_path / "sitq.db"
    async with _asleep_watching(SQLiteBackend(path)):
        remove_sqlite_files(path)
        async with TaskQueue(SQLiteBackend(path)) as queue:  # creates the file again
            task_id = await queue.enqueue(add, 1, 2)
            result = await queue.get_result(task_id, timeout=10)
            assert result is not None and queue.deserialize_result(result) == 3
    assert caplog.text.count(f"SQLite database {path} was deleted or replaced") == 1
