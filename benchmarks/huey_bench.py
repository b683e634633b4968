"""huey (SqliteHuey, default settings) as a :class:`~scenarios.System`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import huey_tasks
from common import WorkerProcess
from scenarios import System


class HueySystem(System):
    name = "huey"

    db = ""
    #: False runs huey with ``fsync=False`` (synchronous=OFF) instead of its default.
    fsync: bool | None = None

    async def fresh(self) -> None:
        self.db = self.new_path("db") + ".sqlite3"
        huey = huey_tasks.huey
        huey.storage.close()
        huey.storage_kwargs["filename"] = self.db
        if self.fsync is None:
            huey.storage_kwargs.pop("fsync", None)
        else:
            huey.storage_kwargs["fsync"] = self.fsync
        huey.storage = huey.create_storage()

    async def cleanup(self) -> None:
        huey_tasks.huey.storage.close()

    async def enqueue_noops(self, count: int) -> None:
        # huey's API is synchronous: calling a task enqueues it.
        noop = huey_tasks.noop
        for _ in range(count):
            noop()

    async def enqueue_stamps(self, path: str, count: int) -> None:
        stamp = huey_tasks.stamp
        for _ in range(count):
            stamp(path)

    async def enqueue_stamp(self, path: str, key: str, eta: float | None = None) -> float | None:
        if eta is None:
            huey_tasks.stamp(path, key)
        else:
            huey_tasks.stamp.schedule(args=(path, key), eta=datetime.fromtimestamp(eta, UTC))

    async def add_far_future(self, count: int) -> None:
        # Scheduling 200,000 tasks through the API takes ~40 s; insert huey's own
        # serialized messages into its schedule table in one transaction instead.
        huey = huey_tasks.huey
        eta = datetime.now(UTC) + timedelta(days=1)
        rows = []
        for _ in range(count):
            task = huey_tasks.noop.s()
            task.eta = eta.replace(tzinfo=None)
            rows.append((huey.storage.name, huey.serialize_task(task), eta.timestamp()))

        def insert() -> None:
            with huey.storage.db(commit=True) as cursor:
                cursor.executemany(
                    "INSERT INTO schedule (queue, data, timestamp) VALUES (?, ?, ?)", rows
                )

        await asyncio.to_thread(insert)

    def worker(self, concurrency: int) -> WorkerProcess:
        return WorkerProcess(
            "huey_worker.py",
            "--workers",
            str(concurrency),
            env={
                "SITQ_BENCH_HUEY_DB": self.db,
                "SITQ_BENCH_HUEY_FSYNC": "" if self.fsync is None else str(int(self.fsync)),
            },
        )


class HueyNoFsync(HueySystem):
    """huey with ``fsync=False``: faster commits, less durable than sitq's setting."""

    name = "huey fsync=False"
    fsync = False
    # Polling and scheduling are the same as the default's: skip the timing scenarios.
    latency_scenarios = False
