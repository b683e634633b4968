"""Many worker processes on one PostgreSQL database: every task runs exactly once, and
a worker killed mid-run loses nothing.

Each worker is a real process with its own connection pool, as a worker on another
host would be. Tasks append their number to one file with ``O_APPEND``, so the test
counts executions without trusting the database it is testing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

import pg_tasks
from conftest import POSTGRES_DSN
from helpers import wait_until
from sitq import TaskQueue, TaskStatus

psycopg = pytest.importorskip("psycopg")

from sitq.backends.postgres import PostgresBackend  # noqa: E402

WORKER_SCRIPT = Path(__file__).with_name("pg_worker.py")
CONCURRENCY = 8


class Workers:
    """Worker processes started for one test; all are stopped at the end."""

    def __init__(self, schema: str, lease: float) -> None:
        self.schema = schema
        self.lease = lease
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, count: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        # Half the workers play "other hosts": their own process and pool, configured
        # with a key=value connection string rather than the URL.
        other_host = psycopg.conninfo.make_conninfo(POSTGRES_DSN)
        for number in range(count):
            dsn = POSTGRES_DSN if number % 2 == 0 else other_host
            args = [str(WORKER_SCRIPT), dsn, self.schema, str(CONCURRENCY)]
            self.procs.append(subprocess.Popen([sys.executable, *args, str(self.lease)], env=env))

    def check_alive(self, *, except_: subprocess.Popen[bytes] | None = None) -> None:
        for proc in self.procs:
            if proc is not except_ and proc.poll() is not None:
                raise AssertionError(f"worker {proc.pid} exited with {proc.returncode}")

    def stop(self) -> list[int | None]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=20))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes


@pytest.fixture
def workers(pg_schema: str) -> Iterator[Workers]:
    group = Workers(pg_schema, lease=2.0)
    try:
        yield group
    finally:
        group.stop()


async def _enqueue(schema: str, calls: list[tuple[object, ...]]) -> list[str]:
    backend = PostgresBackend(POSTGRES_DSN, schema=schema)
    async with TaskQueue(backend) as client:
        ids: list[str] = []
        for start in range(0, len(calls), 2000):
            ids += await client.enqueue_many(calls[start : start + 2000])  # type: ignore[arg-type]
        return ids


async def _statuses(schema: str) -> dict[TaskStatus, int]:
    backend = PostgresBackend(POSTGRES_DSN, schema=schema)
    await backend.open()
    try:
        stats = await backend.queue_stats(datetime.now(UTC))
    finally:
        await backend.close()
    return {status: count for entry in stats for status, count in entry.counts.items()}


async def test_four_processes_drain_ten_thousand_tasks_exactly_once(
    pg_schema: str, workers: Workers, tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    total = 10_000
    await _enqueue(pg_schema, [(pg_tasks.record, (log, n)) for n in range(total)])
    workers.start(4)

    def drained() -> bool:
        workers.check_alive()
        return len(pg_tasks.read_counts(log)) >= total

    await wait_until(drained, timeout=50, interval=0.1)
    assert workers.stop() == [0, 0, 0, 0]
    counts = pg_tasks.read_counts(log)
    assert sorted(counts) == list(range(total))
    assert set(counts.values()) == {1}, "some task ran twice"
    assert await _statuses(pg_schema) == {TaskStatus.SUCCESS: total}


async def test_a_killed_worker_process_loses_nothing(
    pg_schema: str, workers: Workers, tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    total = 3_000
    await _enqueue(pg_schema, [(pg_tasks.record_slowly, (log, n, 0.004)) for n in range(total)])
    workers.start(4)
    victim = workers.procs[0]

    def victim_working() -> bool:
        workers.check_alive()
        return victim.pid in _pids(log) and len(pg_tasks.read_counts(log)) > 300

    await wait_until(victim_working, timeout=30, interval=0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    def drained() -> bool:
        workers.check_alive(except_=victim)
        return len(pg_tasks.read_counts(log)) >= total

    # The victim's running tasks come back when their 2 s leases run out.
    await wait_until(drained, timeout=50, interval=0.1)

    async def all_succeeded() -> bool:
        return await _statuses(pg_schema) == {TaskStatus.SUCCESS: total}

    # The last outcomes are committed just after their tasks wrote the log.
    await wait_until(all_succeeded, timeout=10, interval=0.1)
    counts = pg_tasks.read_counts(log)
    assert sorted(counts) == list(range(total))
    # Only tasks the victim was running when it died may have run twice.
    assert sum(1 for seen in counts.values() if seen > 1) <= CONCURRENCY
    # The victim died holding claims (it claims in the transaction that settles), and
    # those tasks were taken over when their leases ran out: their attempt was counted.
    assert await _count_retaken(pg_schema) >= 1


async def _count_retaken(schema: str) -> int:
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as conn:
        cursor = await conn.execute(f'SELECT count(*) FROM "{schema}".sitq_jobs WHERE attempts > 1')
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


def _pids(path: str) -> set[int]:
    try:
        with open(path) as handle:
            return {int(line.split()[1]) for line in handle}
    except FileNotFoundError:
        return set()
