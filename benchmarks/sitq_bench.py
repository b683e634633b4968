"""sitq as a :class:`~scenarios.System`, on any backend (SQLite here, PostgreSQL in
``pg_bench``)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from common import WorkerProcess, noop, stamp
from scenarios import System

from sitq import TaskQueue
from sitq.backends.base import Backend

SETUP_CHUNK = 2_000


class SitqSystem(System):
    name = "sitq"

    queue: TaskQueue | None = None
    #: The task functions (sync here: they run in the worker's thread pool).
    noop: Callable[[], Any] = staticmethod(noop)
    stamp: Callable[[str, str], Any] = staticmethod(stamp)

    @abstractmethod
    def new_backend(self) -> Backend: ...

    @abstractmethod
    def worker_args(self) -> list[str]: ...

    async def fresh(self) -> None:
        self.queue = TaskQueue(self.new_backend())
        await self.queue.backend.open()

    async def cleanup(self) -> None:
        if self.queue is not None:
            await self.queue.close()
            self.queue = None

    @property
    def q(self) -> TaskQueue:
        assert self.queue is not None
        return self.queue

    async def enqueue_noops(self, count: int) -> None:
        enqueue, task = self.q.enqueue, self.noop
        for _ in range(count):
            await enqueue(task)

    async def enqueue_noop_batches(self, count: int, batch: int) -> bool:
        for start in range(0, count, batch):
            await self.q.enqueue_many([self.noop] * min(batch, count - start))
        return True

    async def enqueue_stamps(self, path: str, count: int) -> None:
        for start in range(0, count, SETUP_CHUNK):
            size = min(SETUP_CHUNK, count - start)
            await self.q.enqueue_many([(self.stamp, (path,))] * size)

    async def enqueue_stamp(self, path: str, key: str, eta: float | None = None) -> float | None:
        when = None if eta is None else datetime.fromtimestamp(eta, UTC)
        await self.q.enqueue(self.stamp, path, key, eta=when)

    async def add_far_future(self, count: int) -> None:
        eta = datetime.now(UTC) + timedelta(days=1)
        for start in range(0, count, SETUP_CHUNK):
            size = min(SETUP_CHUNK, count - start)
            await self.q.enqueue_many([self.noop] * size, eta=eta)

    def worker(self, concurrency: int) -> WorkerProcess:
        return WorkerProcess(
            "sitq_worker.py", *self.worker_args(), "--concurrency", str(concurrency)
        )
