"""ResultWatch: one reader for every ``get_result`` waiting in an event loop.

Each waiter reading its own task whenever any task finished made a thousand waiters
a thousand queries per finished task (and five a second each while idle), which
starved a worker sharing their connections: measured, 1,000 short tasks drained in
45 s instead of 1.8 s on PostgreSQL. Here the waited tasks are read together, in one
query per announced finish or fallback poll, and each waiter is handed its task.
"""

from __future__ import annotations

import asyncio
import time

from sitq.backends.base import MAX_IDS_PER_QUERY, Backend, TaskQuery
from sitq.core import FINISHED_STATUSES, Task

FINISHED = tuple(sorted(FINISHED_STATUSES, key=lambda status: status.value))

#: The fallback poll: a finish in another process may go unannounced (SQLite has no
#: notifications; a PostgreSQL listener may be reconnecting). It starts fast and
#: backs off to this.
LONGEST_POLL = 0.2


class ResultWatch:
    """Waits for tasks to finish, for all the callers of one event loop."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._waiters: dict[str, set[asyncio.Future[Task | None]]] = {}
        self._new_waiter = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    def wait(self, task_id: str) -> asyncio.Future[Task | None]:
        """A future that gets the task once it is finished, or ``None`` if it is gone
        (deleted, purged). Cancel it, or :meth:`forget` it, to stop waiting."""
        future: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(future)
        self._new_waiter.set()  # read at once: it may have finished before it was added
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="sitq-result-watch")
        return future

    @property
    def idle(self) -> bool:
        """Whether no one waits."""
        return not self._waiters

    def forget(self, task_id: str, future: asyncio.Future[Task | None]) -> None:
        waiting = self._waiters.get(task_id)
        if waiting is not None:
            waiting.discard(future)
            if not waiting:
                del self._waiters[task_id]

    async def _read(self) -> None:
        try:
            finishes = await self._backend.watch_finished()
        except Exception as exc:
            self._fail_all(exc)
            return
        woken = finishes.subscribe()
        pause = 0.005
        # Announced finishes and new waiters need only the finished rows among the
        # waited ones; every LONGEST_POLL (on a busy system too) a read takes them
        # all, to notice deleted tasks.
        last_full_read = float("-inf")
        try:
            while self._waiters:
                woken.clear()
                self._new_waiter.clear()
                started = time.monotonic()
                everything = started - last_full_read >= LONGEST_POLL
                if everything:
                    last_full_read = started
                try:
                    await self._hand_out(list(self._waiters), everything)
                except Exception as exc:
                    # The storage failed: every waiter hears it, as it would reading alone.
                    self._fail_all(exc)
                    return
                if not self._waiters:
                    return
                # Never more than half of the loop's time: with thousands of waiters
                # each read is long, and a worker may share the loop.
                await asyncio.sleep(time.monotonic() - started)
                wakeups = [
                    asyncio.ensure_future(woken.wait()),
                    asyncio.ensure_future(self._new_waiter.wait()),
                ]
                try:
                    done, _ = await asyncio.wait(
                        wakeups, timeout=pause, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for wakeup in wakeups:
                        wakeup.cancel()
                if not done:
                    pause = min(pause * 1.5, LONGEST_POLL)
        finally:
            finishes.unsubscribe(woken)

    async def _hand_out(self, task_ids: list[str], everything: bool) -> None:
        """Hand out the finished tasks among ``task_ids``; with ``everything``, also
        ``None`` for those no longer stored."""
        statuses = None if everything else FINISHED
        for start in range(0, len(task_ids), MAX_IDS_PER_QUERY):
            chunk = tuple(task_ids[start : start + MAX_IDS_PER_QUERY])
            found = {
                task.id: task
                for task in await self._backend.list_jobs(
                    TaskQuery(ids=chunk, kind="task", statuses=statuses, limit=len(chunk))
                )
            }
            for task_id in chunk:
                task = found.get(task_id)
                if task is not None and task.status in FINISHED_STATUSES:
                    self._resolve(task_id, task)
                elif task is None and everything:
                    self._resolve(task_id, None)

    def _resolve(self, task_id: str, task: Task | None) -> None:
        for future in self._waiters.pop(task_id, ()):
            if not future.done():
                future.set_result(task)

    def _fail_all(self, exc: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
