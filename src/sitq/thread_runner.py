"""ThreadRunner: runs a worker's sync task functions on threads, and hands their results
back to the event loop in batches.

``loop.run_in_executor`` wakes the loop once for every call that finishes (a write to
the loop's self-pipe, a loop iteration, a ``concurrent.futures`` to asyncio future
bridge). With many short sync tasks those wake-ups are most of a worker's time. Here a
thread that finishes a call while an earlier hand-back is still on its way to the loop
only adds its result to that hand-back, so a busy worker receives many results per
wake-up, and records their outcomes in one backend round trip. The other way, calls
wake threads only as needed (see ``ThreadRunner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Callable[[], Any], "asyncio.Future[Any]"]
_Done = tuple["asyncio.Future[Any]", bool, Any]


class ThreadRunner:
    """Runs zero-argument callables on up to ``size`` threads of its own.

    Threads are woken only as calls need them: a queued call always has a thread on
    its way to take it (one woken, or started while fewer than ``size`` exist), or
    every thread is busy and the first to finish takes it. A thread taking a call
    that leaves more queued sends the next thread on its way first, so a call that
    blocks holds up no other. A burst of short calls is thus run by the threads
    already awake, not by one woken thread each: a wake-up per call is a context
    switch and a contest for the GIL with the event loop.

    :meth:`shutdown` lets queued and running calls finish on their own; their
    results are still handed back if the loop is alive, and the threads exit after
    that.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop, name: str = "sitq-task") -> None:
        self._size = size
        self._loop = loop
        self._name = name
        self._lock = threading.Lock()
        self._woken = threading.Condition(self._lock)
        # All below are guarded by _lock.
        self._calls: deque[_Call] = deque()
        self._threads: list[threading.Thread] = []
        self._ready = 0  # threads awake and about to take a call
        self._asleep = 0  # threads waiting to be woken
        self._wakes = 0  # wake-ups sent and not yet taken (each already counted ready)
        self._unfinished = 0  # calls submitted and not yet returned
        # Results on their way to the loop: non-empty exactly while a hand-back is due.
        self._finished: list[_Done] = []
        self._shut_down = False

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``call`` on a thread; the returned future (of the runner's loop) gets
        its result or exception. Cancelling the future does not stop the call."""
        future: asyncio.Future[T] = self._loop.create_future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("the thread runner is shut down")
            self._calls.append((call, future))
            try:
                self._send_a_thread()
            except RuntimeError:  # no thread could be started: the call never runs
                self._calls.pop()
                raise
            self._unfinished += 1
        return future

    def shutdown(self) -> None:
        """Take no more calls; each thread exits once no queued call is left for it."""
        with self._lock:
            self._shut_down = True
            self._woken.notify_all()

    def busy_threads(self) -> int:
        """Threads in a call or about to take one: after :meth:`shutdown`, those that
        run on. Not the threads alive: the idle ones, told to exit, may not have yet."""
        with self._lock:
            return self._unfinished

    def _send_a_thread(self) -> None:
        """With the lock held: make sure a thread is on its way to the queued calls."""
        if self._ready or not self._calls:
            return
        if self._asleep > self._wakes:
            self._wakes += 1
            self._ready += 1
            self._woken.notify()
        elif len(self._threads) < self._size:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            thread.start()  # it waits for the lock we hold before it looks for calls
            self._threads.append(thread)
            self._ready += 1
        # Otherwise every thread is running a call: the first to finish takes the next.

    def _next_call(self) -> _Call | None:
        """The next queued call for this (ready) thread, after sleeping while there
        is none; None once the runner is shut down and nothing is left."""
        with self._lock:
            while not self._calls:
                self._ready -= 1
                if self._shut_down:
                    return None
                self._asleep += 1
                while not self._wakes and not self._shut_down:
                    self._woken.wait()
                self._asleep -= 1
                if not self._wakes:
                    return None  # shut down while asleep
                self._wakes -= 1  # whoever woke this thread counted it ready
            item = self._calls.popleft()
            self._ready -= 1
            # Should no thread start, this one takes the rest after this call.
            with contextlib.suppress(RuntimeError):
                self._send_a_thread()
            return item

    def _work(self) -> None:
        while (item := self._next_call()) is not None:
            call, future = item
            try:
                done: _Done = (future, True, call())
            except StopIteration as exc:  # a future cannot hold one (asyncio refuses it)
                wrapped = RuntimeError(f"task raised StopIteration: {exc}")
                wrapped.__cause__ = exc  # so the task's own frames stay in its traceback
                done = (future, False, wrapped)
            except BaseException as exc:  # handed to the awaiting task, as an executor does
                done = (future, False, exc)
            del item, call  # hold nothing of this call while waiting for the next
            self._finish(done)

    def _finish(self, done: _Done) -> None:
        with self._lock:
            self._finished.append(done)
            self._unfinished -= 1
            self._ready += 1  # this thread goes on to the next call
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
