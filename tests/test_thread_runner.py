"""ThreadRunner: the worker's threads for sync task functions.

The worker's own tests cover it end to end (sync tasks, timeouts, crashes); these
check the runner's promises directly: results and errors reach the awaiting task,
no more than ``size`` calls run at once, results that finish together come back in
one hand-back, and a shut-down runner's threads exit.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from typing import Any

import pytest

from helpers import wait_until
from sitq.thread_runner import ThreadRunner

DEADLINE = 10.0


async def test_results_and_errors_reach_the_awaiting_task() -> None:
    runner = ThreadRunner(2, asyncio.get_running_loop())
    try:
        assert await runner.submit(lambda: 6 * 7) == 42
        assert await runner.submit(threading.current_thread) is not threading.current_thread()

        def fail() -> None:
            raise KeyError("missing")

        with pytest.raises(KeyError, match="missing"):
            await runner.submit(fail)
    finally:
        runner.shutdown()


def exhausted() -> None:
    next(iter(()))


async def test_stop_iteration_becomes_a_runtime_error() -> None:
    """An asyncio future refuses StopIteration; passing it on would lose the result of
    every call in the same hand-back and leave their tasks waiting forever."""
    runner = ThreadRunner(1, asyncio.get_running_loop())
    try:
        with pytest.raises(RuntimeError, match="StopIteration") as raised:
            await runner.submit(exhausted)
        # The task's own frames were lost with the StopIteration; they are its cause.
        assert isinstance(raised.value.__cause__, StopIteration)
        assert "exhausted" in "".join(traceback.format_exception(raised.value))
    finally:
        runner.shutdown()


async def test_never_more_than_size_calls_at_once() -> None:
    runner = ThreadRunner(2, asyncio.get_running_loop())
    release = threading.Event()
    lock = threading.Lock()
    running = 0
    most = 0

    def call() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(DEADLINE)
        with lock:
            running -= 1

    try:
        futures = [runner.submit(call) for _ in range(5)]
        await wait_until(lambda: running == 2, DEADLINE)
        release.set()
        await asyncio.wait_for(asyncio.gather(*futures), DEADLINE)
        assert most == 2
    finally:
        runner.shutdown()


async def test_results_that_finish_while_the_loop_is_busy_arrive_in_one_hand_back() -> None:
    loop = asyncio.get_running_loop()
    runner = ThreadRunner(4, loop)
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return original(callback, *args, **kwargs)

    # Signalled once a thread has handed its result over (not merely returned).
    handed_over = threading.Semaphore(0)
    finish = runner._finish

    def finish_and_signal(done: Any) -> None:
        finish(done)
        handed_over.release()

    runner._finish = finish_and_signal  # type: ignore[method-assign]
    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        futures = [runner.submit(lambda n=n: n) for n in range(4)]
        # Keep the loop busy (no await) until every thread has handed its result over.
        for _ in range(4):
            assert handed_over.acquire(timeout=DEADLINE)
        assert await asyncio.wait_for(asyncio.gather(*futures), DEADLINE) == [0, 1, 2, 3]
        assert wakeups == 1
    finally:
        del loop.call_soon_threadsafe
        runner.shutdown()


async def test_a_cancelled_wait_does_not_stop_the_other_results() -> None:
    runner = ThreadRunner(2, asyncio.get_running_loop())
    release = threading.Event()
    try:
        abandoned = runner.submit(lambda: release.wait(DEADLINE))
        abandoned.cancel()  # what a task timeout does to the future it awaits
        kept = runner.submit(lambda: "kept")
        release.set()
        assert await asyncio.wait_for(kept, DEADLINE) == "kept"
    finally:
        runner.shutdown()


async def test_shutdown_lets_running_calls_finish_and_ends_the_threads() -> None:
    runner = ThreadRunner(2, asyncio.get_running_loop(), name="shutdown-test")
    release = threading.Event()
    future = runner.submit(lambda: release.wait(DEADLINE))
    threads = [t for t in threading.enumerate() if t.name.startswith("shutdown-test")]
    assert len(threads) == 1
    runner.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit(lambda: None)
    release.set()
    assert await asyncio.wait_for(future, DEADLINE) is True
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive()


async def test_a_call_that_blocks_holds_up_no_other() -> None:
    """Queued calls wake threads only as needed; one thread must never be left
    holding calls queued behind a call that blocks."""
    runner = ThreadRunner(3, asyncio.get_running_loop())
    release = threading.Event()
    try:
        assert await runner.submit(lambda: "a thread exists, idle") is not None
        # All queued before the one thread awake (the idle one, woken by the first
        # submit) takes the first call: only it can send another for the rest.
        blocked = runner.submit(lambda: release.wait(DEADLINE))
        quick = [runner.submit(lambda n=n: n) for n in range(5)]
        assert await asyncio.wait_for(asyncio.gather(*quick), DEADLINE) == [0, 1, 2, 3, 4]
        assert not blocked.done()
        release.set()
        assert await asyncio.wait_for(blocked, DEADLINE) is True
    finally:
        runner.shutdown()


async def test_every_call_runs_whatever_the_timing_of_submits_and_finishes() -> None:
    """Bursts and lulls, short calls and calls that yield: each call finishes, so no
    wake-up is ever lost between a submit and a thread going to sleep."""
    runner = ThreadRunner(3, asyncio.get_running_loop())
    pause = threading.Event()  # never set: wait(0.0001) only gives the GIL up briefly
    try:
        for burst in range(300):
            calls = [
                runner.submit(lambda n=n: pause.wait(0.0001 * (n % 2)) or n)
                for n in range(burst % 7)
            ]
            assert await asyncio.wait_for(asyncio.gather(*calls), DEADLINE) == list(
                range(burst % 7)
            )
            if burst % 5 == 0:
                await asyncio.sleep(0)  # a lull: let threads go to sleep between bursts
    finally:
        runner.shutdown()


async def test_a_thread_that_cannot_start_fails_its_call_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = ThreadRunner(2, asyncio.get_running_loop())
    ran: list[str] = []

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    try:
        with monkeypatch.context() as patched:
            patched.setattr(threading.Thread, "start", refuse)
            with pytest.raises(RuntimeError, match="can't start"):
                runner.submit(lambda: ran.append("refused"))
        assert await asyncio.wait_for(runner.submit(lambda: ran.append("next")), DEADLINE) is None
        assert ran == ["next"]  # the refused call was withdrawn, not run later
    finally:
        runner.shutdown()
