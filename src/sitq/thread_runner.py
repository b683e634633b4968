"""ThreadRunner: runs a worker's sync task functions on threads, and hands their results
back to the event loop in batches.

``loop.run_in_executor`` wakes the loop once for every call that finishes (a write to
the loop's self-pipe, a loop iteration, a ``concurrent.futures`` to asyncio future
bridge). With many short sync tasks those wake-ups are most of a worker's time. Here a
thread that finishes a call while an earlier hand-back is still on its way to the loop
only adds its result to that hand-back, so a busy worker receives many results per
wake-up, and records their outcomes in one backend round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]"]
_Done = tuple["asyncio.Future[Any]", bool, Any]


class ThreadRunner:
    """Runs zero-argument callables on up to ``size`` threads of its own.

    Threads start when a call finds none idle, up to ``size``. :meth:`shutdown`
    lets running calls finish on their own; their results are still handed back
    if the loop is alive, and the threads exit after that.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop, name: str = "sitq-task") -> None:
        self._size = size
        self._loop = loop
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # One token per idle thread: a call that takes one needs no new thread.
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # Results on their way to the loop: non-empty exactly while a hand-back is due.
        self._finished: list[_Done] = []
        self._shut_down = False

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``call`` on a thread; the returned future (of the runner's loop) gets
        its result or exception. Cancelling the future does not stop the call."""
        if self._shut_down:
            raise RuntimeError("the thread runner is shut down")
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((call, future))
        if not self._idle.acquire(blocking=False) and len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return future

    def shutdown(self) -> None:
        """Take no more calls; each thread exits once it has finished its current one."""
        self._shut_down = True
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        calls = self._calls
        while True:
            item = calls.get()
            if item is None:
                return
            call, future = item
            try:
                done: _Done = (future, True, call())
            except StopIteration as exc:  # a future cannot hold one (asyncio refuses it)
                done = (future, False, RuntimeError(f"task raised StopIteration: {exc}"))
            except BaseException as exc:  # handed to the awaiting task, as an executor does
                done = (future, False, exc)
            del item, call  # hold nothing of this call while waiting for the next
            self._finish(done)
            self._idle.release()

    def _finish(self, done: _Done) -> None:
        with self._lock:
            self._finished.append(done)
            if len(self._finished) > 1:
                return  # the hand-back already scheduled takes this result too
        # The loop is gone when an abandoned call (a timed-out task) finishes after
        # its worker stopped: nobody waits for that result.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._hand_back)

    def _hand_back(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
        for future, ok, value in finished:
            if future.cancelled():  # the task timed out and stopped waiting
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
