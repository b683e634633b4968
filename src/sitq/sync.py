"""SyncTaskQueue: the async client, driven from blocking code.

One private event loop runs in a daemon thread for the life of the client; every
method submits the matching ``TaskQueue`` coroutine to it and blocks for the answer.
Nothing is implemented twice, and the backend's connections live on that one loop.
A client dropped without ``close()`` is wound down when it is garbage-collected, with
a ``ResourceWarning``, as an unclosed file is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

from sitq.backends.base import Backend, QueueStats
from sitq.core import Result, Task, TaskStatus
from sitq.errors import SyncClientError
from sitq.queue import PURGEABLE, TaskQueue

T = TypeVar("T")

logger = logging.getLogger(__name__)


class SyncTaskQueue:
    """Blocking twin of :class:`TaskQueue`: same methods, same return types.

    Takes the same arguments as ``TaskQueue``. Use it as a context manager, or call
    :meth:`close` when done. Calling it from inside a running event loop raises
    :class:`SyncClientError` (blocking there would freeze that loop): use
    ``TaskQueue`` in async code.
    """

    def __init__(self, backend: Backend, *args: Any, **kwargs: Any) -> None:
        self._queue = TaskQueue(backend, *args, **kwargs)
        # Refuse before starting the loop thread: raising after it started would leak
        # a thread and an event loop per refused client.
        _refuse_inside_a_running_loop()
        # A fork copies this object but not its loop thread: see _refuse_after_a_fork.
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_run_until_stopped, args=(self._loop,), name="sitq-sync-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        # Dropped without close(): stop the thread and close the connections then, not
        # at exit (a client made per request would otherwise pile up threads). Not at
        # exit itself: the daemon thread simply ends there, as before.
        self._abandoned = weakref.finalize(self, _wind_down, self._loop, self._queue, self._pid)
        self._abandoned.atexit = False
        # Calls waiting for the loop, from any thread: close() ends them.
        self._in_flight: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        try:
            self._call(self._queue.backend.open)
        except BaseException:
            self._stop_loop()  # the backend cannot open: do not leave the thread behind
            raise

    def _call(self, func: Callable[..., Coroutine[Any, Any, T]], /, *args: Any, **kwargs: Any) -> T:
        _refuse_inside_a_running_loop()
        self._refuse_after_a_fork()
        with self._lock:
            if self._closed:
                raise SyncClientError("this SyncTaskQueue is closed")
            future = asyncio.run_coroutine_threadsafe(func(*args, **kwargs), self._loop)
            self._in_flight.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:
                raise SyncClientError(
                    "this SyncTaskQueue was closed while the call waited"
                ) from None
            raise
        except BaseException:
            # Ctrl-C (or any exception raised into this thread) while waiting: stop the
            # call on the loop too, rather than leave it running there unwatched.
            future.cancel()
            raise
        finally:
            with self._lock:
                self._in_flight.discard(future)

    def __enter__(self) -> SyncTaskQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the backend's connections and stop the private loop. Idempotent.

        Calls still waiting in other threads (a ``get_result`` without a timeout)
        end with :class:`SyncClientError` instead of waiting for ever.
        """
        # Before anything changes: refused here, the client stays open and usable.
        _refuse_inside_a_running_loop()
        if os.getpid() != self._pid:
            # A forked child's copy: its loop thread, and the connections on it, live
            # in the parent only; nothing here to close (and waiting would hang).
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._in_flight)
        for future in waiting:
            future.cancel()
        try:
            asyncio.run_coroutine_threadsafe(self._queue.close(), self._loop).result()
        finally:
            self._stop_loop()

    def _refuse_after_a_fork(self) -> None:
        # Checked before taking the lock, which a fork may have copied held.
        if os.getpid() != self._pid:
            raise SyncClientError(
                "this SyncTaskQueue was made in another process (a fork copies it, but "
                "not its event loop thread): make a new one in this process"
            )

    def _stop_loop(self) -> None:
        self._closed = True
        self._abandoned.detach()
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()  # the thread closes the loop as it ends

    @property
    def queue(self) -> TaskQueue:
        """The async client underneath."""
        return self._queue

    def enqueue(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> str:
        return self._call(self._queue.enqueue, func, *args, **kwargs)

    def enqueue_call(
        self,
        func: Callable[..., Any],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> str:
        return self._call(self._queue.enqueue_call, func, args, kwargs, **options)

    def enqueue_many(
        self, calls: Iterable[Callable[..., Any] | tuple[Any, ...]], **options: Any
    ) -> list[str]:
        return self._call(self._queue.enqueue_many, list(calls), **options)

    def get_result(self, task_id: str, timeout: float | None = None) -> Result | None:
        return self._call(self._queue.get_result, task_id, timeout)

    def deserialize_result(self, result: Result) -> Any:
        return self._queue.deserialize_result(result)

    def cancel(self, task_id: str) -> bool:
        return self._call(self._queue.cancel, task_id)

    def retry(self, task_id: str) -> bool:
        return self._call(self._queue.retry, task_id)

    def get_task(self, task_id: str) -> Task | None:
        return self._call(self._queue.get_task, task_id)

    def list_tasks(
        self, status: TaskStatus | str | None = None, queue: str | None = None, limit: int = 100
    ) -> list[Task]:
        return self._call(self._queue.list_tasks, status, queue, limit)

    def counts(self, queue: str | None = None) -> dict[str, int]:
        return self._call(self._queue.counts, queue)

    def queue_stats(self) -> list[QueueStats]:
        return self._call(self._queue.queue_stats)

    def purge(
        self,
        older_than: float | timedelta = 0,
        statuses: Iterable[TaskStatus | str] = PURGEABLE,
        *,
        progress: Callable[[int], object] | None = None,
    ) -> int:
        # progress is called on the client's loop thread, between batches.
        return self._call(self._queue.purge, older_than, statuses, progress=progress)


def _run_until_stopped(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _wind_down(loop: asyncio.AbstractEventLoop, queue: TaskQueue, pid: int) -> None:
    """Finalizer of a client dropped without close(): close its backend and stop its
    loop thread. It may run in any thread, the loop's own included, so it only
    schedules the work there and never waits for it."""
    if os.getpid() != pid or loop.is_closed():
        return  # a forked child's copy: the thread and loop live in the parent
    warnings.warn(
        "a SyncTaskQueue was dropped without close(); use it as a context manager",
        ResourceWarning,
        stacklevel=1,
    )

    async def close_and_stop() -> None:
        try:
            await queue.close()
        except Exception:
            logger.exception("could not close the dropped SyncTaskQueue's backend")
        finally:
            await _cancel_the_rest()
            loop.stop()

    wind_down = close_and_stop()
    try:
        loop.call_soon_threadsafe(loop.create_task, wind_down)
    except RuntimeError:  # the loop closed since the check: nothing left to do
        wind_down.close()


async def _cancel_the_rest() -> None:
    """Cancel and wait for every other task on this (private) loop, so none is
    destroyed pending when the loop closes."""
    rest = asyncio.all_tasks() - {asyncio.current_task()}
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def _refuse_inside_a_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise SyncClientError(
        "SyncTaskQueue was called from inside a running event loop, where blocking "
        "would freeze it; use `await TaskQueue(...)` methods there instead"
    )
