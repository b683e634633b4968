"""Part 2: sitq on PostgresBackend against procrastinate and pgqrs.

Everything runs in a scratch database created for the run and dropped afterwards;
each scenario gets a fresh schema of its own. Tasks are ``async`` functions for all
three systems (each runs them on its event loop, no thread hop).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import scenarios
from common import WorkerProcess, anoop, astamp
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from scenarios import System
from sitq_bench import SitqSystem

_schemas = itertools.count(1)


@contextlib.asynccontextmanager
async def scratch_database(dsn: str) -> AsyncIterator[str]:
    """Create a database for this run on ``dsn``'s server; yield its DSN; drop it."""
    name = f"sitq_bench_{os.getpid()}_{int(time.time())}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}")
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _execute(dsn: str, statement: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(statement)  # type: ignore[arg-type]


def _url(dsn: str) -> str:
    """A postgresql:// URL for libraries that take only URLs (pgqrs)."""
    parts = conninfo_to_dict(dsn)
    user = parts.get("user", "postgres")
    password = f":{parts['password']}" if parts.get("password") else ""
    host, port = parts.get("host", "127.0.0.1"), parts.get("port", "5432")
    return f"postgresql://{user}{password}@{host}:{port}/{parts['dbname']}"


class SchemaPerRun(System):
    """Each :meth:`fresh` uses a new schema, dropped by :meth:`cleanup`."""

    def __init__(self, scratch: Path, dsn: str) -> None:
        super().__init__(scratch)
        self.dsn = dsn
        self.schema = ""

    def next_schema(self) -> str:
        stem = re.sub(r"\W", "_", self.name)  # a plain identifier
        self.schema = f"{stem}_{next(_schemas)}"
        return self.schema

    async def drop_schema(self) -> None:
        if self.schema:
            await _execute(self.dsn, f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
            self.schema = ""


class SitqPostgres(SitqSystem, SchemaPerRun):
    name = "sitq"
    noop = staticmethod(anoop)
    stamp = staticmethod(astamp)

    def new_backend(self) -> Any:
        from sitq.backends.postgres import PostgresBackend

        return PostgresBackend(self.dsn, schema=self.next_schema())

    def worker_args(self) -> list[str]:
        return [self.dsn, "--schema", self.schema]

    async def cleanup(self) -> None:
        await SitqSystem.cleanup(self)
        await self.drop_schema()


class SitqPostgresAsyncCommit(SitqPostgres):
    """sitq with ``synchronous_commit=off`` set in its DSN, a choice left to users
    (docs/postgres.md): commits are acknowledged before their WAL reaches the disk."""

    name = "sitq synchronous_commit=off"

    def __init__(self, scratch: Path, dsn: str) -> None:
        super().__init__(scratch, make_conninfo(dsn, options="-c synchronous_commit=off"))


async def async_commit_enqueue_rate(scratch: Path, dsn: str, count: int) -> float:
    """Single enqueues/s of :class:`SitqPostgresAsyncCommit` (the median of 3)."""
    system = SitqPostgresAsyncCommit(scratch, dsn)
    runs = [await scenarios.enqueue_rate(system, count) for _ in range(3)]
    return sorted(runs)[1]


class ProcrastinateSystem(SchemaPerRun):
    name = "procrastinate"

    app: Any = None

    def conninfo(self) -> str:
        return make_conninfo(self.dsn, options=f"-c search_path={self.schema}")

    async def fresh(self) -> None:
        from proc_tasks import make_app

        schema = self.next_schema()
        await _execute(self.dsn, f"CREATE SCHEMA {schema}")
        self.app = make_app(self.conninfo())
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()

    async def cleanup(self) -> None:
        if self.app is not None:
            await self.app.close_async()
            self.app = None
        await self.drop_schema()

    def task(self, name: str) -> Any:
        return self.app.tasks[name]

    async def enqueue_noops(self, count: int) -> None:
        defer = self.task("noop").defer_async
        for _ in range(count):
            await defer()

    async def enqueue_noop_batches(self, count: int, batch: int) -> bool:
        task = self.task("noop")
        for start in range(0, count, batch):
            await task.batch_defer_async(*[{}] * min(batch, count - start))
        return True

    async def enqueue_stamps(self, path: str, count: int) -> None:
        task = self.task("stamp")
        for start in range(0, count, 2_000):
            await task.batch_defer_async(*[{"path": path}] * min(2_000, count - start))

    async def enqueue_stamp(self, path: str, key: str, eta: float | None = None) -> float | None:
        task = self.task("stamp")
        if eta is not None:
            task = task.configure(schedule_at=datetime.fromtimestamp(eta, UTC))
        await task.defer_async(path=path, key=key)
        return None

    async def add_far_future(self, count: int) -> None:
        task = self.task("noop").configure(schedule_at=datetime.now(UTC) + timedelta(days=1))
        for start in range(0, count, 5_000):
            await task.batch_defer_async(*[{}] * min(5_000, count - start))

    def worker(self, concurrency: int) -> WorkerProcess:
        return WorkerProcess(
            "proc_tasks.py", str(concurrency), env={"SITQ_BENCH_PROC_CONNINFO": self.conninfo()}
        )


class PgqrsSystem(SchemaPerRun):
    name = "pgqrs"
    queue_name = "bench"

    store: Any = None
    producer: Any = None

    async def fresh(self) -> None:
        import pgqrs

        schema = self.next_schema()
        await _execute(self.dsn, f"CREATE SCHEMA {schema}")
        os.environ["SITQ_BENCH_PGQRS_DSN"] = _url(self.dsn)
        os.environ["SITQ_BENCH_PGQRS_SCHEMA"] = schema
        os.environ["SITQ_BENCH_PGQRS_QUEUE"] = self.queue_name
        from pgqrs_worker import config

        self.store = await pgqrs.connect_with(config())
        await pgqrs.admin(self.store).install()
        await self.store.queue(self.queue_name)
        self.producer = await self.store.producer(self.queue_name)

    async def cleanup(self) -> None:
        self.store = self.producer = None
        await self.drop_schema()

    async def enqueue_noops(self, count: int) -> None:
        enqueue = self.producer.enqueue
        for _ in range(count):
            await enqueue({})

    async def enqueue_noop_batches(self, count: int, batch: int) -> bool:
        import pgqrs

        for start in range(0, count, batch):
            await pgqrs.enqueue_batch(self.producer, [{}] * min(batch, count - start))
        return True

    async def enqueue_stamps(self, path: str, count: int) -> None:
        import pgqrs

        for start in range(0, count, 2_000):
            size = min(2_000, count - start)
            await pgqrs.enqueue_batch(self.producer, [{"path": path}] * size)

    async def enqueue_stamp(self, path: str, key: str, eta: float | None = None) -> float | None:
        payload = {"path": path, "key": key}
        if eta is None:
            await self.producer.enqueue(payload)
            return None
        # pgqrs delays by whole seconds from now: round, and report the due time used.
        now = time.time()
        delay = max(1, round(eta - now))
        await self.producer.enqueue_delayed(payload, delay)
        return now + delay

    async def add_far_future(self, count: int) -> None:
        # pgqrs has no batch API for delayed messages and one call each takes minutes
        # for 200,000: insert rows shaped like enqueue_delayed's with SQL instead.
        await _execute(
            self.dsn,
            f"INSERT INTO {self.schema}.pgqrs_messages (queue_id, payload, vt, enqueued_at)"
            f" SELECT q.id, '{{}}'::jsonb, now() + interval '1 day', now()"
            f" FROM {self.schema}.pgqrs_queues q, generate_series(1, {int(count)})"
            f" WHERE q.queue_name = '{self.queue_name}'",
        )

    def worker(self, concurrency: int) -> WorkerProcess:
        return WorkerProcess("pgqrs_worker.py", str(concurrency))


def systems(scratch: Path, dsn: str) -> list[System]:
    return [
        SitqPostgres(scratch, dsn),
        ProcrastinateSystem(scratch, dsn),
        PgqrsSystem(scratch, dsn),
    ]
