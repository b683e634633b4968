"""PostgreSQL-specific behaviour: migrations, SKIP LOCKED claims, LISTEN/NOTIFY
wake-ups across backend objects, and surviving killed connections.

The behaviour every backend shares is in the conformance suite (the ``backend``
fixture); this file covers what only PostgreSQL does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import re
import select
import signal
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import pg_tasks
from conftest import POSTGRES_DSN, sessions_named
from helpers import wait_until
from sitq import (
    BackendError,
    Consumer,
    MemoryBackend,
    Producer,
    StorageUnavailableError,
    SyncTaskQueue,
    TaskQueue,
    TaskStatus,
    ValidationError,
    Worker,
)
from sitq.backends.base import (
    Backend,
    ClaimRequest,
    Finish,
    NewJob,
    Reschedule,
    Settled,
    TaskQuery,
)

# psycopg is an optional extra; tests that touch the server skip through ``pg_schema``.
psycopg = pytest.importorskip("psycopg")

from psycopg.conninfo import make_conninfo  # noqa: E402

from sitq.backends.postgres import (  # noqa: E402
    _MIGRATION_LOCK_NAMESPACE,
    PostgresBackend,
    _finishes_document,
)
from sitq.backends.postgres_sql import MIGRATIONS, SESSION_SETUP, Statements  # noqa: E402
from sitq.backends.url import backend_from_url  # noqa: E402

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def job(job_id: str, *, at: datetime = NOW, priority: int = 0, **extra: object) -> NewJob:
    return NewJob(
        id=job_id,
        queue="default",
        kind="task",
        payload=b"x",
        enqueued_at=NOW,
        available_at=at,
        priority=priority,
        **extra,  # type: ignore[arg-type]
    )


def claim(owner: str, limit: int = 10, now: datetime = NOW) -> ClaimRequest:
    return ClaimRequest(owner, "task", limit, timedelta(seconds=30), now)


@pytest.fixture
async def pg(pg_schema: str) -> AsyncIterator[PostgresBackend]:
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


def terminate_other_connections() -> int:
    """Kill every other connection to the test database, as a server restart would."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        ).fetchall()
    return len(rows)


# -- migrations ---------------------------------------------------------------------------


async def test_migrate_is_idempotent(pg: PostgresBackend, pg_schema: str) -> None:
    assert await pg.migrate() == 0
    assert await pg.migrate() == 0
    with psycopg.connect(POSTGRES_DSN) as conn:
        versions = conn.execute(
            f'SELECT version FROM "{pg_schema}".sitq_migrations ORDER BY version'
        ).fetchall()
    assert [v for (v,) in versions] == list(range(1, len(MIGRATIONS) + 1))


async def test_migrate_without_open_applies_and_counts_once(pg_schema: str) -> None:
    # The deploy step of docs/postgres.md: several migrators at once, none opened.
    migrators = [PostgresBackend(POSTGRES_DSN, schema=pg_schema) for _ in range(4)]
    applied = await asyncio.gather(*(b.migrate() for b in migrators))
    assert sorted(applied) == [0, 0, 0, len(MIGRATIONS)]
    assert await migrators[0].migrate() == 0
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await backend.open()
    try:
        await backend.enqueue([job("a")])
        assert (await backend.get("a")) is not None
    finally:
        await backend.close()


async def test_migrate_without_open_reports_an_unreachable_server(pg_schema: str) -> None:
    backend = PostgresBackend(
        "postgresql://postgres@127.0.0.1:1/nowhere", schema=pg_schema, connect_timeout=1
    )
    with pytest.raises(BackendError, match="cannot connect to PostgreSQL"):
        await backend.migrate()


async def test_an_account_allowed_only_rows_opens_a_migrated_schema(pg_schema: str) -> None:
    # The deploy shape of docs/postgres.md: migrate with an account that may create
    # tables, run with one that may not. Every open ran CREATE ... IF NOT EXISTS,
    # which needs the CREATE privilege even when there is nothing to create.
    assert await PostgresBackend(POSTGRES_DSN, schema=pg_schema).migrate() == len(MIGRATIONS)
    role = f"sitq_rows_only_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO "{role}"')
        admin.execute(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{pg_schema}"'
            f' TO "{role}"'
        )
        admin.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{pg_schema}" TO "{role}"')
    try:
        as_role = make_conninfo(POSTGRES_DSN, user=role)
        async with TaskQueue(PostgresBackend(as_role, schema=pg_schema)) as queue:
            task_id = await queue.enqueue(pg_tasks.noop)
            task = await queue.get_task(task_id)
            assert task is not None and task.status is TaskStatus.PENDING
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


async def test_an_account_allowed_only_rows_is_told_the_schema_needs_migrating(
    pg_schema: str,
) -> None:
    # After an upgrade of sitq brings a migration, such an account's open() failed
    # with the server's "permission denied for database test", which does not say
    # why a worker was creating anything.
    await PostgresBackend(POSTGRES_DSN, schema=pg_schema).migrate()
    role = f"sitq_rows_only_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(
            f'DELETE FROM "{pg_schema}".sitq_migrations WHERE version = %s', (len(MIGRATIONS),)
        )
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO "{role}"')
        admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{pg_schema}" TO "{role}"')
    try:
        backend = PostgresBackend(make_conninfo(POSTGRES_DSN, user=role), schema=pg_schema)
        older, known = len(MIGRATIONS) - 1, len(MIGRATIONS)
        with pytest.raises(BackendError, match=f"needs migrating \\(version {older} of {known}\\)"):
            await backend.open()
        with pytest.raises(BackendError, match="sitq migrate"):
            await backend.migrate()
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


async def test_a_schema_newer_than_this_sitq_is_opened_with_a_warning(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await backend.migrate()
    newer = len(MIGRATIONS) + 1
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'INSERT INTO "{pg_schema}".sitq_migrations (version) VALUES ({newer})')
    # Opening it warns (older workers keep working during a rolling deploy)...
    newer_schema = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    with caplog.at_level("WARNING", logger="sitq.postgres"):
        await newer_schema.open()
    await newer_schema.close()
    assert f"at version {newer}, newer than this sitq knows" in caplog.text
    # ...but an explicit migrate, a deploy step, refuses to call it up to date.
    with pytest.raises(BackendError, match="newer than this sitq knows"):
        await backend.migrate()


async def test_concurrent_open_migrates_once(pg_schema: str) -> None:
    backends = [PostgresBackend(POSTGRES_DSN, schema=pg_schema) for _ in range(6)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
        applied = await asyncio.gather(*(b.migrate() for b in backends))
        assert applied == [0] * 6
        await backends[0].enqueue([job("a")])
        assert (await backends[5].get("a")) is not None
    finally:
        await asyncio.gather(*(b.close() for b in backends))


async def test_opening_one_object_twice_at_once_makes_one_pool(pg_schema: str) -> None:
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await asyncio.gather(backend.open(), backend.open())
    pools = dict(backend._loops)
    await backend.open()
    assert backend._loops == pools
    assert len(pools) == 1
    # Three opens, three closes: the pool goes at the last.
    for _ in range(2):
        await backend.close()
        assert backend._loops == pools
    await backend.close()
    assert backend._loops == {}


async def test_a_client_closing_leaves_the_shared_backend_open_for_its_worker(
    pg_schema: str, tmp_path: Path
) -> None:
    # The guide's shape: a worker started inside `async with TaskQueue(backend)`, the
    # client done first. Its close closed the pool under the worker, which then failed
    # every settle ("not open"), and stop() never returned.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    log = str(tmp_path / "log")
    worker = Worker(backend, poll_interval=0.05)
    async with TaskQueue(backend) as queue:
        await worker.start()
        first = await queue.enqueue(pg_tasks.record, log, 1)
        assert await queue.get_result(first, timeout=10) is not None
    # Work from another process (another backend object), for the worker alone.
    async with TaskQueue(PostgresBackend(POSTGRES_DSN, schema=pg_schema)) as queue:
        second = await queue.enqueue(pg_tasks.record, log, 2)
        result = await queue.get_result(second, timeout=10)
        assert result is not None and result.status == "success"
    await asyncio.wait_for(worker.stop(), 10)
    assert backend._loops == {}, "the last close left the pool open"


async def test_producers_and_consumers_leave_one_close_to_their_caller(pg_schema: str) -> None:
    # docs/messages.md: use them, then `await backend.close()` once. Their opening
    # on first use must not count as opens a close has to match.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await Producer(backend, "jobs").enqueue({"n": 1})
    assert [m.payload for m in await Consumer(backend, "jobs").dequeue()] == [{"n": 1}]
    await backend.close()
    assert backend._loops == {}


async def test_a_producer_goes_on_after_the_client_it_shared_with_closed(pg_schema: str) -> None:
    # Its first use was inside the client's context, so it never opened a share of
    # its own; after the context it failed "not open". It connects again now.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    producer = Producer(backend, "jobs")
    async with TaskQueue(backend):
        await producer.enqueue({"n": 1})
    await producer.enqueue({"n": 2})
    assert len(await Consumer(backend, "jobs").dequeue(batch_size=5)) == 2
    await backend.close()


async def test_a_worker_listens_again_after_its_backend_was_closed_under_it(
    pg_schema: str,
) -> None:
    # A client closing the shared backend once too often closed the pool (and the
    # LISTEN connection) under a running worker: it reconnected where used, but no
    # longer heard NOTIFYs and found new work only at its poll interval.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    other_host = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    worker = Worker(backend, poll_interval=3600)
    async with TaskQueue(other_host) as client:
        await backend.open()
        await worker.start()
        await backend.wait_listening()
        await backend.close()
        await backend.close()  # one more than it opened: the pool goes under the worker
        try:
            task_id = await client.enqueue(pg_tasks.noop)
            result = await client.get_result(task_id, timeout=10)
            assert result is not None and result.status == "success"
            # And NOTIFYs keep coming: the next one too is started at once.
            task_id = await client.enqueue(pg_tasks.noop)
            result = await client.get_result(task_id, timeout=10)
            assert result is not None and result.status == "success"
        finally:
            await worker.stop()


async def test_a_consumer_listens_again_after_its_backend_was_closed_under_it(
    pg_schema: str,
) -> None:
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    producer = Producer(PostgresBackend(POSTGRES_DSN, schema=pg_schema), "jobs")
    consumer = Consumer(backend, "jobs", poll_interval=3600)
    seen: list[Any] = []
    await backend.open()
    processing = asyncio.create_task(consumer.process(lambda message: seen.append(message.payload)))
    try:
        await backend.wait_listening()
        await backend.close()
        await backend.close()  # the pool and LISTEN connection go under the consumer
        for n in (1, 2):
            await producer.enqueue({"n": n})
            await wait_until(lambda n=n: len(seen) == n)
    finally:
        consumer.stop()
        await asyncio.wait_for(processing, 10)
        await producer.backend.close()
        await backend.close()


async def test_no_connection_in_time_fails_once_not_twice(pg_schema: str) -> None:
    # A PoolTimeout is an OperationalError, taken for a dead connection: the pool was
    # checked and the wait (30 s by default) done twice.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema, min_size=1, max_size=1)
    await backend.open()
    try:
        pool = backend._loops[asyncio.get_running_loop()].pool
        pool.timeout = 0.1
        checks = 0
        check = pool.check

        async def counted_check() -> None:
            nonlocal checks
            checks += 1
            await check()

        pool.check = counted_check  # type: ignore[method-assign]
        async with pool.connection():  # the only connection, held
            with pytest.raises(BackendError, match="connection failed"):
                await backend.get("x")
        assert checks == 0
    finally:
        await backend.close()


async def test_reopen_after_close(pg: PostgresBackend) -> None:
    await pg.enqueue([job("a")])
    await pg.close()
    await pg.open()
    await pg.open()  # idempotent
    assert (await pg.get("a")) is not None


async def test_a_refused_connection_says_why_in_the_servers_words(pg_schema: str) -> None:
    # The pool's own error is "pool initialization incomplete after N sec".
    url = POSTGRES_DSN.rsplit("/", 1)[0] + "/sitq_no_such_database"
    backend = PostgresBackend(url, schema=pg_schema, connect_timeout=1)
    with pytest.raises(BackendError, match='database "sitq_no_such_database" does not exist'):
        await backend.open()


async def test_unreachable_server_is_a_backend_error(pg_schema: str) -> None:
    backend = PostgresBackend(
        "postgresql://postgres@127.0.0.1:1/test", schema=pg_schema, connect_timeout=1
    )
    with pytest.raises(BackendError):
        await backend.open()
    with pytest.raises(BackendError, match="not open"):
        await backend.get("x")


def test_failed_opens_from_loops_that_ended_are_not_kept() -> None:
    # Each open() that failed left its loop's open lock, and with it the closed loop,
    # in the backend for ever: a SyncTaskQueue made per request (a loop each) on a
    # shared backend grew the process by 3 KiB per request while the server was down.
    backend = PostgresBackend("postgresql://postgres@127.0.0.1:1/test", connect_timeout=0.2)

    async def open_once() -> None:
        with pytest.raises(BackendError):
            await backend.open()

    for _ in range(3):
        asyncio.run(open_once())
    # The last loop's is dropped at the next open() or close(), from any loop.
    assert len(backend._open_locks) == 1
    assert backend._loops == {}


def test_a_sync_client_and_a_worker_thread_share_one_backend(
    pg_schema: str, tmp_path: Path
) -> None:
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    processed: list[int] = []
    with SyncTaskQueue(backend) as client:
        task_id = client.enqueue(pg_tasks.record, str(tmp_path / "log"), 7)
        # Worker.run has its own event loop: the backend connects there too.
        worker = threading.Thread(target=lambda: processed.append(Worker(backend).run(True)))
        worker.start()
        worker.join(timeout=30)
        result = client.get_result(task_id, timeout=10)
    assert processed == [1]
    assert result is not None and client.deserialize_result(result) == 7
    assert backend._loops == {}


def test_a_pool_still_open_when_its_loop_ends_is_closed(pg_schema: str) -> None:
    # asyncio.run ends by cancelling every task at once, the pool's own workers too:
    # the pool's close() then raised CancelledError before it closed its idle
    # connections, which stayed open until the garbage collector found them (it may
    # not run for a long time; here it is off): each loop's connections stayed.
    name = f"sitq_test_{uuid.uuid4().hex[:12]}"  # to count this test's sessions alone
    dsn = make_conninfo(POSTGRES_DSN, application_name=name)
    backend = PostgresBackend(dsn, schema=pg_schema, min_size=2)

    async def open_and_close() -> None:
        await backend.open()
        await backend.close()

    async def use() -> None:  # connects on this loop without open(), and no close()
        assert await TaskQueue(backend).get_task("nothing") is None

    async def open_only() -> None:
        await backend.open()

    collecting = gc.isenabled()
    gc.disable()
    try:
        asyncio.run(open_and_close())
        for loop_body in (use, use, open_only):
            asyncio.run(loop_body())
        assert backend._loops == {}
        asyncio.run(wait_until(lambda: sessions_named(name) == 0))
    finally:
        if collecting:
            gc.enable()


def test_schema_name_is_validated() -> None:
    # "name\n" once passed: a regex's $ also matches before a final newline.
    # "pg_jobs" is PostgreSQL's to use: it refused to create it, so open() failed.
    for schema in ('x"; DROP TABLE y; --', "jobs\n", "\njobs", "", "a" * 64, 5, "pg_jobs"):
        with pytest.raises(ValidationError, match="schema"):
            PostgresBackend(POSTGRES_DSN, schema=schema)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="schema"):
        backend_from_url(f"{POSTGRES_DSN}?schema=jobs%0A")
    assert PostgresBackend(POSTGRES_DSN, schema="a" * 63).schema == "a" * 63
    assert PostgresBackend(POSTGRES_DSN, schema="PG_jobs").schema == "PG_jobs"


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        # Once accepted: infinity failed every LISTEN connection for ever (workers were
        # never woken by NOTIFY), NaN failed Worker.start, 0 and -1 failed open() as
        # "cannot connect"; the others failed open() with a TypeError or BackendError,
        # or (max_size=2.5) not at all.
        ({"connect_timeout": float("inf")}, "connect_timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"connect_timeout": -1}, "connect_timeout"),
        ({"connect_timeout": "5"}, "connect_timeout"),
        ({"connect_timeout": True}, "connect_timeout"),
        ({"connect_timeout": timedelta(days=36_526)}, "connect_timeout"),
        ({"min_size": 0.5}, "min_size"),
        ({"min_size": "1"}, "min_size"),
        ({"min_size": -1}, "min_size"),
        ({"max_size": 2.5}, "max_size"),
        ({"max_size": 0}, "max_size"),
        ({"max_size": True}, "max_size"),
        ({"min_size": 3, "max_size": 2}, "pool size"),
        ({"dsn": None}, "dsn"),
        ({"dsn": b"postgresql://postgres@127.0.0.1/test"}, "dsn"),
    ],
)
def test_pool_and_connection_arguments_are_validated_in_the_constructor(
    arguments: dict[str, Any], named: str
) -> None:
    arguments = {"dsn": POSTGRES_DSN, **arguments}
    with pytest.raises(ValidationError, match=named):
        PostgresBackend(**arguments)


def test_connect_timeout_may_be_a_timedelta() -> None:
    backend = PostgresBackend(POSTGRES_DSN, connect_timeout=timedelta(milliseconds=2500))
    assert backend.connect_timeout == 2.5
    backend = PostgresBackend(POSTGRES_DSN, min_size=0, max_size=1, connect_timeout=3)
    assert (backend.min_size, backend.max_size, backend.connect_timeout) == (0, 1, 3)


def test_url_may_name_the_schema() -> None:
    backend = backend_from_url("postgresql://postgres@127.0.0.1:5432/test?schema=jobs_a")
    assert isinstance(backend, PostgresBackend)
    assert backend.schema == "jobs_a"
    assert "schema" not in backend.dsn


async def test_url_with_a_schema_keeps_its_other_parameters_as_written(pg_schema: str) -> None:
    # urlencode once rewrote %20 as "+", which libpq does not read as a space: the
    # server refused "+synchronous_commit" and open() failed.
    with_options = f"{POSTGRES_DSN}{'&' if '?' in POSTGRES_DSN else '?'}"
    with_options += "options=-c%20synchronous_commit%3Doff"
    backend = backend_from_url(f"{with_options}&schema={pg_schema}")
    assert isinstance(backend, PostgresBackend)
    assert (backend.schema, backend.dsn) == (pg_schema, with_options)
    await backend.open()
    try:
        task_id = await TaskQueue(backend).enqueue(print)
        assert await backend.get(task_id) is not None
    finally:
        await backend.close()


def test_url_schema_must_be_given_once_and_agree() -> None:
    for query in ("schema=", "schema=a&schema=b"):
        with pytest.raises(ValidationError, match="schema"):
            backend_from_url(f"{POSTGRES_DSN}?{query}")
    with pytest.raises(ValidationError, match="disagrees"):
        PostgresBackend(f"{POSTGRES_DSN}?schema=a", schema="b")
    assert PostgresBackend(f"{POSTGRES_DSN}?schema=a", schema="a").schema == "a"


async def waiting_for_a_lock(statement_fragment: str) -> bool:
    """Whether a session runs a statement containing the fragment and waits for a lock."""
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type IN ('Lock')"
            " AND datname = current_database() AND query LIKE %s",
            (f"%{statement_fragment}%",),
        )
        row = await cursor.fetchone()
    assert row is not None
    return bool(row[0])


async def test_a_purge_never_deletes_a_task_retried_while_it_ran(pg: PostgresBackend) -> None:
    await pg.enqueue([job("a")])
    await pg.claim(claim("w"))
    assert await pg.finish(Finish("a", "w", TaskStatus.FAILED, NOW))
    # A retry() still in its transaction when a purge of failed jobs picks the job.
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as retrying:
        await retrying.execute(pg._sql.requeue, {"id": "a", "now": NOW})
        purge = asyncio.create_task(pg.purge(NOW + timedelta(days=1), [TaskStatus.FAILED]))
        await wait_until(lambda: waiting_for_a_lock(f'DELETE FROM "{pg.schema}"'))
        await retrying.commit()
        assert await asyncio.wait_for(purge, 10) == 0
    task = await pg.get("a")
    assert task is not None and task.status is TaskStatus.PENDING


async def test_two_retries_of_a_stopped_series_at_once_restart_it_once(
    pg: PostgresBackend,
) -> None:
    every = timedelta(hours=1)
    await pg.enqueue([job("run1", interval=every, series_id="s")])
    await pg.claim(claim("w"))
    run2 = job("run2", at=NOW + every, interval=every, series_id="s")
    assert await pg.finish(Finish("run1", "w", TaskStatus.FAILED, NOW, next_run=run2))
    assert await pg.cancel("run2", NOW)  # the series is stopped
    # Two admins retry its two runs at once: the first is still in its transaction.
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as first:
        await first.execute(pg._sql.lock_series, {"id": "run1"})
        await first.execute(pg._sql.requeue, {"id": "run1", "now": NOW})
        second = asyncio.create_task(pg.requeue("run2", NOW))

        async def second_waits_or_is_done() -> bool:
            return second.done() or await waiting_for_a_lock("pg_advisory_xact_lock")

        await wait_until(second_waits_or_is_done)
        await first.commit()
        assert await asyncio.wait_for(second, 10) is True
    tasks = await pg.list_jobs(TaskQuery())
    live = [t.id for t in tasks if t.status is TaskStatus.PENDING and t.interval is not None]
    assert live == ["run1"], "the series was restarted twice"


def test_every_statement_fits_the_drivers_query_cache() -> None:
    # psycopg converts a query's %(name)s placeholders with a regex on every call,
    # unless the query is short enough for its cache: measured, a 4.3 kB settle spent
    # more client CPU there than in everything else it did. Longest name: 63 chars.
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH, MAX_CACHED_STATEMENT_PARAMS

    statements = Statements.for_schema("s" * 63)
    for field in dataclasses.fields(statements):
        value = getattr(statements, field.name)
        for text in (value,) if isinstance(value, str) else value:
            if "%(" not in text:
                continue  # no placeholders: nothing to convert
            assert len(text.encode()) <= MAX_CACHED_STATEMENT_LENGTH, field.name
            assert len(set(re.findall(r"%\((\w+)\)s", text))) <= MAX_CACHED_STATEMENT_PARAMS


# -- the same answers as the reference backend -------------------------------------------


async def _scripted_run(backend: Backend) -> list[object]:
    """Exercise every operation; return everything the backend answered."""
    later = timedelta(minutes=5)

    def at(**delta: float) -> datetime:
        return NOW + timedelta(**delta)

    out: list[object] = []
    await backend.enqueue(
        [
            job("a"),
            job("b", priority=5),
            job("c", at=at(hours=1)),
            job("d", max_deliveries=1),
            job("e", interval=later, series_id="e"),
            job("g", interval=later, series_id="g"),
        ]
    )
    with pytest.raises(BackendError):
        await backend.enqueue([job("a")])
    out.append(await backend.next_due("task", None))
    out.append(await backend.next_due("task", ("elsewhere",)))
    out.append(await backend.claim(claim("w", limit=4)))
    out.append(await backend.cancel("e", NOW))
    out.append(await backend.extend_leases("w", ["a", "b", "e", "zz"], later, NOW))
    next_run = job("f", at=at(minutes=5), interval=later, series_id="e")
    out.append(
        await backend.settle(
            [
                Finish("e", "w", TaskStatus.SUCCESS, NOW, result=b"r", next_run=next_run),
                Reschedule("b", "w", at(seconds=10), error="E", traceback="T"),
                Finish("a", "other", TaskStatus.SUCCESS, NOW),
            ],
            claim("w", now=at(seconds=10)),
        )
    )
    g_next = job("h", at=at(minutes=5), interval=later, series_id="g")
    out.append(
        await backend.settle(
            [Finish("g", "w", TaskStatus.SUCCESS, at(seconds=20), next_run=g_next)], None
        )
    )
    out.append(await backend.get("h"))
    out.append(await backend.claim(claim("w2", now=at(minutes=2))))
    out.append(await backend.finish(Finish("a", "w2", TaskStatus.FAILED, at(minutes=2))))
    out.append(await backend.requeue("a", at(minutes=3)))
    out.append(await backend.requeue("c", NOW))
    out.append(await backend.list_jobs(TaskQuery()))
    out.append(await backend.list_jobs(TaskQuery(status=TaskStatus.PENDING, limit=2)))
    out.append(await backend.queue_stats(at(minutes=3)))
    out.append(await backend.purge(at(days=1), [TaskStatus.SUCCESS, TaskStatus.DEAD]))
    out.append([await backend.delete("a"), await backend.delete("a"), await backend.get("a")])
    return out


async def test_answers_like_the_memory_backend(pg: PostgresBackend) -> None:
    assert await _scripted_run(pg) == await _scripted_run(MemoryBackend())


# -- claims -------------------------------------------------------------------------------


async def test_concurrent_claims_never_share_a_job(pg: PostgresBackend, pg_schema: str) -> None:
    await pg.enqueue([job(f"j{i:03}") for i in range(200)])
    others = [PostgresBackend(POSTGRES_DSN, schema=pg_schema) for _ in range(4)]
    try:
        await asyncio.gather(*(b.open() for b in others))

        async def drain(backend: PostgresBackend, owner: str) -> list[str]:
            got: list[str] = []
            while batch := await backend.claim(claim(owner, limit=7)):
                got.extend(task.id for task in batch)
            return got

        results = await asyncio.gather(*(drain(b, f"w{n}") for n, b in enumerate(others)))
    finally:
        await asyncio.gather(*(b.close() for b in others))
    claimed = [job_id for batch in results for job_id in batch]
    assert sorted(claimed) == [f"j{i:03}" for i in range(200)]


async def test_equal_jobs_are_claimed_in_enqueue_order(pg: PostgresBackend) -> None:
    names = [f"job-{n}" for n in (5, 3, 9, 1, 7, 2, 8)]
    await pg.enqueue([job(name) for name in names])
    first = [task.id for task in await pg.claim(claim("w", limit=3))]
    rest = [task.id for task in await pg.claim(claim("w", limit=10))]
    assert first + rest == names


async def test_expired_lease_is_claimed_again_in_the_same_statement(pg: PostgresBackend) -> None:
    await pg.enqueue([job("a")])
    assert len(await pg.claim(claim("dead-worker"))) == 1
    assert await pg.claim(claim("w2", now=NOW + timedelta(seconds=29))) == []
    [again] = await pg.claim(claim("w2", now=NOW + timedelta(seconds=30)))
    assert (again.id, again.attempts) == ("a", 2)
    stale = Finish("a", "dead-worker", TaskStatus.SUCCESS, NOW + timedelta(seconds=31))
    assert not await pg.finish(stale)


async def test_max_deliveries_makes_a_job_dead(pg: PostgresBackend) -> None:
    await pg.enqueue([job("m", max_deliveries=1)])
    assert len(await pg.claim(claim("w"))) == 1
    assert await pg.claim(claim("w", now=NOW + timedelta(minutes=1))) == []
    task = await pg.get("m")
    assert task is not None
    assert (task.status, task.attempts) == (TaskStatus.DEAD, 1)


async def test_far_future_backlog_does_not_slow_claims(pg: PostgresBackend, pg_schema: str) -> None:
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{pg_schema}".sitq_jobs (id, queue, kind, status, priority,'
            " payload, enqueued_at, available_at, max_attempts)"
            " SELECT 'far' || n, 'default', 'task', 'pending', 0, '\\x00'::bytea,"
            " %s, %s, 1 FROM generate_series(1, 200000) AS n",
            (NOW, NOW + timedelta(days=365)),
        )
        conn.execute(f'ANALYZE "{pg_schema}".sitq_jobs')
    await pg.enqueue([job(f"due{n}") for n in range(50)])
    claimed = 0
    for _ in range(10):
        claimed += len(await pg.claim(claim("w", limit=5)))
    assert claimed == 50
    assert await pg.claim(claim("w", limit=5)) == []
    # Nothing due is left: the costly case, where a scan would read the whole backlog
    # (thousands of pages) and the index probes read a few. Counted, not timed.
    params = {"kind": "task", "now": NOW, "limit": 8, "owner": "w", "lease_expires_at": NOW}
    for plan in _plans(pg._sql.claim_all, params):
        assert _pages(plan) < 50, plan


async def test_a_claim_for_some_queues_reads_no_other_queue_s_due_jobs(pg_schema: str) -> None:
    # A claim or next_due for some queues (every consumer, a worker with --queues)
    # filtered sitq_jobs_due by queue, or scanned the table: with 200,000 due in one
    # queue, each claim of an idle worker of another read the whole table, and 4 of
    # them cut the busy queue's worker from 1,600 to 960 tasks/s. The backlog is there
    # before the upgrade that brings sitq_jobs_queue_due, and analyzed: statistics
    # that know of one queue only are the hard case, where the planner cannot tell
    # the indexes apart by their cost (it took sitq_jobs_due, at some sizes, when the
    # new one was keyed on priority itself).
    sql = Statements.for_schema(pg_schema)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        conn.execute(sql.migration_table)
        for version, script in enumerate(sql.migrations[:3], start=1):
            conn.execute(script)
            conn.execute(f'INSERT INTO "{pg_schema}".sitq_migrations VALUES (%s)', (version,))
        conn.execute(
            f'INSERT INTO "{pg_schema}".sitq_jobs (id, queue, kind, status, priority, payload,'
            " enqueued_at, available_at, max_attempts)"
            " SELECT 'bulk' || n, 'bulk', 'task', 'pending', 0, '\\x00'::bytea, %s, %s, 1"
            " FROM generate_series(1, 50000) AS n",
            (NOW, NOW),
        )
        conn.execute(f'ANALYZE "{pg_schema}".sitq_jobs')
    pg = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    assert await pg.migrate() == len(MIGRATIONS) - 3

    def served(job_id: str, queue: str, seconds: float, priority: int = 0) -> NewJob:
        at = NOW + timedelta(seconds=seconds)
        return dataclasses.replace(job(job_id, at=at, priority=priority), queue=queue)

    await pg.open()
    try:
        await pg.enqueue(
            [
                served("email-2", "emails", 2),
                served("sms-1", "sms", 1),
                served("email-3a", "emails", 3),
                served("sms-3b", "sms", 3),
                served("email-3c", "emails", 3),
                served("sms-urgent", "sms", 5, priority=1),
                served("email-later", "emails", 3600),
                served("sms-lowest", "sms", 0, priority=-(2**31)),
            ]
        )
        queues = ("emails", "sms", "none-here", "emails")  # named twice: taken once
        assert await pg.next_due("task", queues) == NOW
        later = NOW + timedelta(seconds=10)
        request = ClaimRequest("w", "task", 5, timedelta(seconds=30), later, queues)
        # By priority, then due order across the queues, then enqueue order.
        taken = [task.id for task in await pg.claim(request)]
        assert taken == ["sms-urgent", "sms-1", "email-2", "email-3a", "sms-3b"]
        assert [task.id for task in await pg.claim(request)] == ["email-3c", "sms-lowest"]
        assert await pg.claim(request) == []
    finally:
        await pg.close()
    # Nothing of theirs is due: what other queues' jobs would cost is read here.
    # Counted, not timed: the served queues' due ranges are a few pages, the bulk
    # queue's jobs hundreds.
    params = {
        "kind": "task",
        "now": request.now,
        "limit": 8,
        "owner": "w",
        "lease_expires_at": request.now,
        "queues": ["emails", "sms", "none-here"],
    }
    for statement in (sql.claim_queues, sql.next_due_queues):
        for plan in _plans(statement, params):
            assert _pages(plan) < 50, plan


def _execute_prepared(cursor: Any, name: str, statement: str, params: dict[str, Any]) -> str:
    """``EXECUTE name(...)`` with ``params``, for the prepared statement ``name`` that
    psycopg made of ``statement`` (which numbers the parameters as they first appear)."""
    order = list(dict.fromkeys(re.findall(r"%\((\w+)\)[sb]", statement)))
    call = f"EXECUTE {name}({', '.join(['%s'] * len(order))})"
    return str(cursor.mogrify(call, [params[key] for key in order]))


def _plans(statement: str, params: dict[str, Any]) -> list[str]:
    """EXPLAIN ANALYZE (JSON, with buffers) of ``statement`` as sitq's sessions run it:
    planned for the values (a connection's first calls), then the generic plan of the
    prepared statement psycopg makes of it (every call after). Rolled back."""
    explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
    with psycopg.connect(POSTGRES_DSN) as conn:
        conn.execute(SESSION_SETUP)
        [[custom]] = conn.execute(explain + statement, params).fetchall()  # type: ignore[arg-type]
        conn.execute("DEALLOCATE ALL")
        conn.execute(statement, params, prepare=True)  # type: ignore[arg-type]
        [[name]] = conn.execute("SELECT name FROM pg_prepared_statements").fetchall()
        call = _execute_prepared(psycopg.ClientCursor(conn), name, statement, params)
        [[generic]] = conn.execute(explain + call).fetchall()  # type: ignore[arg-type]
        conn.rollback()
    return [json.dumps(custom, indent=1), json.dumps(generic, indent=1)]


def _pages(plan: str) -> int:
    """The pages a plan from :func:`_plans` read."""
    top = json.loads(plan)[0]["Plan"]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


async def test_finishes_and_heartbeats_find_rows_by_primary_key(
    pg: PostgresBackend, pg_schema: str
) -> None:
    # Every job leased since the last vacuum leaves an entry in sitq_jobs_lease, an
    # index the planner takes for small (few jobs run at once). A settle or heartbeat
    # that scanned it took time in proportion to the jobs run since the last vacuum.
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{pg_schema}".sitq_jobs SET (autovacuum_enabled = false)')
        conn.execute(
            f'INSERT INTO "{pg_schema}".sitq_jobs (id, queue, kind, status, priority,'
            " payload, enqueued_at, available_at, max_attempts)"
            " SELECT 'old' || n, 'default', 'task', 'pending', 0, '\\x00'::bytea,"
            " %s, %s, 1 FROM generate_series(1, 20000) AS n",
            (NOW, NOW),
        )
        table = f'"{pg_schema}".sitq_jobs'
        conn.execute(f"UPDATE {table} SET status = 'running', lease_expires_at = %s", (NOW,))
        conn.execute(f"UPDATE {table} SET status = 'succeeded', lease_expires_at = NULL")
        conn.execute(f"ANALYZE {table}")
    await pg.enqueue([job("a"), job("b")])
    assert len(await pg.claim(claim("w"))) == 2
    finishes = [Finish(job_id, "w", TaskStatus.SUCCESS, NOW) for job_id in ("a", "b")]
    settle = {
        "finishes": _finishes_document(finishes),
        "finished_channel": pg.finished_channel,
        "token": "t",
    }
    heartbeat = {"ids": ["a", "b"], "owner": "w", "lease_expires_at": NOW}
    reschedule = {
        "at": NOW,
        "finished_at": NOW,
        "undo": 0,
        "error": None,
        "traceback": None,
        "id": "b",
        "owner": "w",
        "channel": pg.channel,
        "finished_channel": pg.finished_channel,
        "token": "t",
    }
    plans = [
        *_plans(pg._sql.finish_many, settle),
        *_plans(pg._sql.extend, heartbeat),
        *_plans(pg._sql.finish, pg._finish_params(finishes[0])),
        *_plans(pg._sql.reschedule, reschedule),
    ]
    for plan in plans:
        assert "sitq_jobs_pkey" in plan and "sitq_jobs_lease" not in plan, plan
    assert await pg.settle(finishes, None) == Settled([True, True], [])


def _fill(schema: str, count: int, at: datetime) -> None:
    """``count`` jobs due at ``at``, straight into the table (no ANALYZE)."""
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".sitq_jobs (id, queue, kind, status, priority,'
            " payload, enqueued_at, available_at, max_attempts)"
            " SELECT 'far' || n, 'default', 'task', 'pending', 0, '\\x00'::bytea,"
            " %s, %s, 1 FROM generate_series(1, %s) AS n",
            (NOW, at, count),
        )


async def _prepared_on_the_pool(backend: PostgresBackend) -> list[tuple[str, str, int, int]]:
    """(name, statement, generic plans, custom plans) of the statements prepared on
    ``backend``'s only pooled connection (``max_size=1``)."""
    pool = backend._loops[asyncio.get_running_loop()].pool
    async with pool.connection() as conn:
        cursor = await conn.execute(
            "SELECT name, statement, generic_plans, custom_plans FROM pg_prepared_statements"
        )
        return await cursor.fetchall()


async def test_claims_settles_and_heartbeats_are_planned_once_per_connection(
    pg_schema: str,
) -> None:
    # psycopg prepares a statement at its sixth call, but under PostgreSQL's default
    # plan_cache_mode each call was still planned afresh once the table had statistics
    # (autovacuum's ANALYZE): 0.3-0.9 ms of server time per claim or settle, and a
    # worker ran 1.44-1.50x fewer tasks/s at concurrency 8. Counted, not timed.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema, max_size=1)
    await backend.open()
    try:
        _fill(pg_schema, 20_000, NOW + timedelta(days=365))
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'ANALYZE "{pg_schema}".sitq_jobs')
        await backend.enqueue([job(f"j{n}") for n in range(100)])
        held = await backend.claim(claim("w", limit=8))
        for _ in range(10):
            ids = [task.id for task in held]
            report = await backend.extend_leases("w", ids, timedelta(seconds=30), NOW)
            assert not report.lost
            finishes = [Finish(task_id, "w", TaskStatus.SUCCESS, NOW) for task_id in ids]
            settled = await backend.settle(finishes, claim("w", limit=8))
            assert settled.accepted == [True] * 8
            held = settled.claimed
        prepared = await _prepared_on_the_pool(backend)
    finally:
        await backend.close()
    assert len(prepared) == 2  # the settle's statement and the heartbeat's
    for _, statement, generic, custom in prepared:
        assert generic > 0 and custom == 0, statement


async def test_a_plan_made_on_an_empty_table_still_reads_the_indexes_once_it_fills(
    pg_schema: str,
) -> None:
    # A prepared statement keeps its generic plan for the session, or until an ANALYZE.
    # One made while the table was empty (a worker's first polls, under any
    # plan_cache_mode) scanned the whole table at each call once jobs came: a worker
    # that had run a few tasks drained a backlog at 67-72 tasks/s instead of 1,250-1,380.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema, max_size=1)
    await backend.open()
    try:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'ALTER TABLE "{pg_schema}".sitq_jobs SET (autovacuum_enabled = false)')
        for _ in range(20):  # prepared at the 6th; under auto, generic from the 11th
            assert await backend.claim(claim("w")) == []
        _fill(pg_schema, 20_000, NOW + timedelta(days=365))
        await backend.enqueue([job("due")])
        assert [task.id for task in await backend.claim(claim("w"))] == ["due"]
        [(name, _, generic, _)] = await _prepared_on_the_pool(backend)
        assert generic > 0
        [stats] = await backend.queue_stats(NOW)
        assert stats.counts[TaskStatus.PENDING] == 20_000
        # Nothing due: where a scan reads every job, and the index probes a few pages.
        params = {"kind": "task", "now": NOW, "limit": 10, "owner": "w", "lease_expires_at": NOW}
        pool = backend._loops[asyncio.get_running_loop()].pool
        async with pool.connection() as conn:
            call = _execute_prepared(
                psycopg.AsyncClientCursor(conn), name, backend._sql.claim_all, params
            )
            cursor = await conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + call)
            [[report]] = await cursor.fetchall()
            cursor = await conn.execute("SHOW enable_seqscan")
            seqscan = await cursor.fetchone()
    finally:
        await backend.close()
    plan = json.dumps(report, indent=1)
    assert _pages(plan) < 50, plan
    assert seqscan == ("off",)  # queue_stats turned it on for its transaction only


# -- LISTEN/NOTIFY ------------------------------------------------------------------------


async def test_enqueue_in_another_backend_wakes_a_worker_at_once(
    pg: PostgresBackend, pg_schema: str, tmp_path: Path
) -> None:
    other = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await other.open()
    # A poll interval far longer than the deadline: only a NOTIFY can wake it in time.
    worker = Worker(pg, poll_interval=60)
    await worker.start()
    try:
        await pg.wait_listening()
        await other.wait_listening()
        assert await other.next_due("task", None) is None
        client = TaskQueue(other)
        task_id = await client.enqueue(pg_tasks.record, str(tmp_path / "log"), 1)
        started = time.monotonic()
        # The other backend's get_result is woken by the worker's NOTIFY in turn.
        result = await client.get_result(task_id, timeout=10)
        assert result is not None and result.ok
        assert time.monotonic() - started < 5
    finally:
        await worker.stop()
        await other.close()


async def test_a_plain_notify_wakes_subscribers(pg: PostgresBackend) -> None:
    await pg.wait_listening()
    woken = pg.wakeup.subscribe()
    try:
        woken.clear()
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as c:
            await c.execute("SELECT pg_notify(%s, '')", (pg.channel,))
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        pg.wakeup.unsubscribe(woken)


def test_a_forked_child_hears_the_notifies_of_its_parent(pg_schema: str) -> None:
    # A fork copied the backend object with its NOTIFY token, which marks a process's
    # own NOTIFYs for its listener to skip: the child's worker slept through the
    # parent's enqueues and started them only at its poll interval (an hour here).
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    with SyncTaskQueue(backend) as client:  # so the parent's pool is in use at the fork
        report, reported = os.pipe()
        stop, stopped = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # the child: a worker, reporting in bytes; never return into pytest
            try:

                async def work() -> None:
                    # The parent's loops, pools and listeners are not the child's.
                    inherited = len(backend._loops)
                    worker = Worker(backend, poll_interval=3600)
                    await worker.start()
                    await backend.wait_listening()
                    os.write(reported, bytes([inherited]))
                    told = asyncio.Event()
                    asyncio.get_running_loop().add_reader(stop, told.set)
                    await told.wait()
                    await worker.stop()

                asyncio.run(work())
                os.write(reported, b"\x00")
            finally:
                os._exit(0)
        os.close(reported)
        try:
            ready, _, _ = select.select([report], [], [], 20)
            assert ready, "the child's worker did not start"
            inherited = os.read(report, 1)
            for _ in range(3):
                task_id = client.enqueue(pg_tasks.noop)
                result = client.get_result(task_id, timeout=10)
                assert result is not None and result.status == "success"
            assert inherited == b"\x00", "the child kept the parent's loop state"
            os.write(stopped, b"\x00")
            ready, _, _ = select.select([report], [], [], 20)
            assert ready and os.read(report, 1) == b"\x00", "the child's worker did not stop"
        finally:
            for fd in (report, stop, stopped):
                os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def listening_sessions(channel: str) -> int:
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %s",
            (f'LISTEN "{channel}"',),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_only_processes_that_wait_listen(pg: PostgresBackend) -> None:
    """An enqueue-only process (a web app) holds no LISTEN connection, so it is not
    woken by every other producer's enqueue; a worker's first wait starts one."""
    await TaskQueue(pg).enqueue(pg_tasks.record, "unused", 1)
    assert listening_sessions(pg.channel) == 0
    assert listening_sessions(pg.finished_channel) == 0
    await pg.wait_listening()
    assert listening_sessions(pg.channel) == 1
    await pg.watch_finished()
    await wait_until(lambda: listening_sessions(pg.finished_channel) == 1)


async def _work_notifications_until_marker(
    pg: PostgresBackend, write: object, channel: str | None = None
) -> list[str]:
    """Run ``write`` (a coroutine) while LISTENing on ``channel`` (the work channel
    unless given); return the payloads heard before a marker sent after it (NOTIFYs
    arrive in commit order)."""
    channel = channel or pg.channel
    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
        await conn.execute(f'LISTEN "{channel}"')
        await write  # type: ignore[misc]
        await conn.execute("SELECT pg_notify(%s, 'marker')", (channel,))
        heard: list[str] = []
        async with asyncio.timeout(10):
            async for notification in conn.notifies():
                if notification.payload == "marker":
                    return heard
                heard.append(notification.payload)
    raise AssertionError("the marker never arrived")


async def test_a_finish_is_announced_to_result_waiters_not_to_workers(
    pg: PostgresBackend, pg_schema: str
) -> None:
    other = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await other.open()
    try:
        finishes = await other.watch_finished()
        assert finishes is not other.wakeup
        await pg.enqueue([job("a")])
        await pg.claim(claim("w"))
        # Subscribed, and its first wake-up (sent on every (re)connection) given out.
        await other.wait_listening(finished=True)
        woken = finishes.subscribe()
        try:
            woken.clear()
            await pg.finish(Finish("a", "w", TaskStatus.SUCCESS, NOW))
            await asyncio.wait_for(woken.wait(), 10)
        finally:
            finishes.unsubscribe(woken)
        # Workers listen on the work channel: a plain finish says nothing there.
        await pg.enqueue([job("c")])
        await pg.claim(claim("w"))
        finish = pg.finish(Finish("c", "w", TaskStatus.SUCCESS, NOW))
        assert await _work_notifications_until_marker(pg, finish) == []
    finally:
        await other.close()


async def test_a_retry_and_a_series_next_run_are_announced_as_work(
    pg: PostgresBackend,
) -> None:
    await pg.enqueue([job("a"), job("b", interval=timedelta(hours=1), series_id="b")])
    await pg.claim(claim("w"))
    retry = pg.reschedule(Reschedule("a", "w", NOW + timedelta(seconds=5)))
    assert len(await _work_notifications_until_marker(pg, retry)) == 1
    next_run = job("b2", at=NOW + timedelta(hours=1), interval=timedelta(hours=1))
    finish = pg.finish(Finish("b", "w", TaskStatus.SUCCESS, NOW, next_run=next_run))
    assert len(await _work_notifications_until_marker(pg, finish)) == 1


async def test_only_outcomes_that_finish_a_job_are_announced_to_result_waiters(
    pg: PostgresBackend,
) -> None:
    await pg.enqueue([job("lost"), job("cancelled"), job("retried")])
    await pg.claim(claim("w", limit=3))
    finished = pg.finished_channel
    # A finish from a worker that does not hold the lease changes nothing: no news.
    stale = pg.finish(Finish("lost", "someone-else", TaskStatus.SUCCESS, NOW))
    assert await _work_notifications_until_marker(pg, stale, finished) == []
    # A retry of a task whose cancellation was requested cancels it: that is a finish.
    assert await pg.cancel("cancelled", NOW)
    cancelled = pg.reschedule(Reschedule("cancelled", "w", NOW))
    assert len(await _work_notifications_until_marker(pg, cancelled, finished)) == 1
    # A plain retry is work, not a finish.
    retried = pg.reschedule(Reschedule("retried", "w", NOW))
    assert await _work_notifications_until_marker(pg, retried, finished) == []


async def test_listener_reconnects_after_its_connection_is_killed(pg: PostgresBackend) -> None:
    await pg.wait_listening()
    assert terminate_other_connections() >= 1
    woken = pg.wakeup.subscribe()
    try:
        # Notify until the new listener hears one: it must come back on its own.
        async def heard() -> bool:
            woken.clear()
            async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
                await conn.execute("SELECT pg_notify(%s, '')", (pg.channel,))
            try:
                await asyncio.wait_for(woken.wait(), 0.2)
            except TimeoutError:
                return False
            return True

        await wait_until(heard, timeout=15)
    finally:
        pg.wakeup.unsubscribe(woken)


# -- lost connections ---------------------------------------------------------------------


async def test_operations_survive_killed_connections(pg: PostgresBackend) -> None:
    await pg.enqueue([job("a")])
    terminate_other_connections()
    assert (await pg.get("a")) is not None
    terminate_other_connections()
    await pg.enqueue([job("b")])
    assert len(await pg.claim(claim("w"))) == 2


async def test_worker_loses_no_task_when_connections_are_killed(
    pg: PostgresBackend, tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    total = 400
    client = TaskQueue(pg)
    ids = await client.enqueue_many(
        [(pg_tasks.record_slowly, (log, n, 0.002)) for n in range(total)]
    )
    worker = Worker(pg, max_concurrency=8, poll_interval=0.2, visibility_timeout=2)
    await worker.start()
    try:
        kills = 0
        for fraction in (0.2, 0.5, 0.8):
            await wait_until(lambda f=fraction: len(pg_tasks.read_counts(log)) >= total * f)
            terminate_other_connections()
            kills += 1

        await wait_until(lambda: len(pg_tasks.read_counts(log)) == total, timeout=60)
    finally:
        await worker.stop(timeout=10)
    counts = pg_tasks.read_counts(log)
    assert sorted(counts) == list(range(total))
    for task_id in ids:
        task = await pg.get(task_id)
        assert task is not None and task.status is TaskStatus.SUCCESS, task
    assert kills == 3


# -- settings of the role or database ----------------------------------------------------


def with_session_defaults(**settings: str) -> str:
    """POSTGRES_DSN with these settings as its sessions' defaults, as ALTER ROLE or
    ALTER DATABASE ... SET would make them."""
    escaped = {
        name: value.replace("\\", "\\\\").replace(" ", "\\ ") for name, value in settings.items()
    }
    return make_conninfo(
        POSTGRES_DSN, options=" ".join(f"-c {name}={value}" for name, value in escaped.items())
    )


@pytest.mark.parametrize(
    "settings",
    [
        # psycopg reads timestamptz only in the ISO DateStyle: each claim raised
        # NotImplementedError once its UPDATE had committed, so the jobs it leased
        # were never run and their attempts spent.
        {"DateStyle": "SQL, DMY"},
        # psycopg returns SQL_ASCII text as bytes: claims took every job and handed
        # out none (their status, b"running", was not "running"), silently.
        {"client_encoding": "SQL_ASCII"},
        # A queue name, an error outside LATIN1 raised UnicodeEncodeError.
        {"client_encoding": "LATIN1"},
    ],
)
async def test_session_defaults_of_the_role_or_database_change_nothing(
    pg_schema: str, settings: dict[str, str]
) -> None:
    backend = PostgresBackend(with_session_defaults(**settings), schema=pg_schema)
    await backend.open()
    try:
        queue = "files-é-キュー"
        await backend.enqueue([dataclasses.replace(job("a"), queue=queue)])
        assert await backend.next_due("task", (queue,)) == NOW
        (claimed,) = await backend.claim(dataclasses.replace(claim("w"), queues=(queue,)))
        assert (claimed.id, claimed.queue, claimed.available_at) == ("a", queue, NOW)
        error = "ValueError: naïve 🙂"
        finish = Finish("a", "w", TaskStatus.FAILED, NOW, error=error, traceback=error)
        assert (await backend.settle([finish], None)).accepted == [True]
        task = await backend.get("a")
        assert task is not None
        assert (task.status, task.queue, task.error, task.finished_at) == (
            TaskStatus.FAILED,
            queue,
            error,
            NOW,
        )
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("zone", "eta"),
    [
        # West of UTC, datetime.min read back as a date BC, and east of it the end of
        # datetime.max as year 10000: psycopg raised DataError on every read of the
        # task, and every claim once it was due failed.
        ("America/New_York", datetime.min.replace(tzinfo=UTC)),
        ("Asia/Tokyo", datetime.max.replace(tzinfo=UTC)),
    ],
)
async def test_the_extreme_etas_read_back_whatever_the_session_time_zone(
    pg_schema: str, zone: str, eta: datetime
) -> None:
    backend = PostgresBackend(with_session_defaults(TimeZone=zone), schema=pg_schema)
    await backend.open()
    try:
        await backend.enqueue([job("a", at=eta)])
        assert await backend.next_due("task", None) == eta
        task = await backend.get("a")
        assert task is not None and task.available_at == eta
        assert [task.id for task in await backend.list_jobs(TaskQuery())] == ["a"]
        claimed = await backend.claim(claim("w"))
        assert [(job.id, job.available_at) for job in claimed] == (
            [("a", eta)] if eta <= NOW else []
        )
    finally:
        await backend.close()


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
async def test_migrators_at_once_under_a_stricter_default_isolation_migrate_once(
    pg_schema: str, isolation: str
) -> None:
    # A migrator reads the schema's version, waits for the migration lock, and reads
    # it again in case another migrated meanwhile. Under a REPEATABLE READ or
    # SERIALIZABLE default the second read came from the first's snapshot: every
    # migrator but the first applied the migrations again and failed ("relation
    # sitq_jobs already exists"), so workers starting together on a new schema died.
    name = f"sitq-test-{pg_schema}"
    dsn = make_conninfo(
        with_session_defaults(default_transaction_isolation=isolation), application_name=name
    )
    key = _MIGRATION_LOCK_NAMESPACE + pg_schema
    opener, *migrators = [PostgresBackend(dsn, schema=pg_schema) for _ in range(3)]

    async def all_waiting(conn: psycopg.AsyncConnection[Any]) -> bool:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND wait_event_type = 'Lock'",
            (name,),
        )
        return await cursor.fetchone() == (3,)

    async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as holder:
        await holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
        # An open() migrates on a pooled connection, a migrate() on its own.
        starting = asyncio.gather(opener.open(), *(backend.migrate() for backend in migrators))
        try:
            await wait_until(lambda: all_waiting(holder))  # each having read the version
        finally:
            await holder.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
        _, *applied = await starting
    try:
        assert sum(applied) in (0, len(MIGRATIONS))
        await opener.enqueue([job("a")])
        assert (await opener.get("a")) is not None
    finally:
        await opener.close()


async def test_idle_connections_outlive_an_idle_session_timeout(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A pool's connections are idle between calls and a LISTEN connection always is:
    # under an idle_session_timeout (PostgreSQL 14+) the server ended them, so every
    # process logged a lost LISTEN connection and reconnected at that pace, and calls
    # found their pooled connection dead (each found so costs a failed try, a check of
    # the pool and a new connection).
    name = f"sitq-test-{pg_schema}"
    dsn = make_conninfo(with_session_defaults(idle_session_timeout="50ms"), application_name=name)
    backend = PostgresBackend(dsn, schema=pg_schema)
    await backend.open()

    def sessions() -> set[int]:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchall()
        return {pid for (pid,) in rows}

    try:
        await backend.wait_listening()
        before = sessions()
        assert len(before) == 2  # the pool's one connection, the listener
        with caplog.at_level("WARNING"):
            await asyncio.sleep(0.3)  # idle: the condition under test, six timeouts long
            assert sessions() == before
            assert (await backend.get("x")) is None
        assert sessions() == before
        assert caplog.records == []
    finally:
        await backend.close()


@pytest.mark.parametrize("setting", ["lock_timeout", "statement_timeout"])
async def test_a_statement_a_timeout_cancels_is_reported_as_such(
    pg_schema: str, setting: str
) -> None:
    # Cancelled statements were taken for lost connections: the pool was checked,
    # and the error read "PostgreSQL connection failed: canceling statement due to
    # lock timeout", which sends an operator looking at the network.
    backend = PostgresBackend(with_session_defaults(**{setting: "50ms"}), schema=pg_schema)
    await backend.open()
    try:
        await backend.enqueue([job("a")])
        pool = backend._loops[asyncio.get_running_loop()].pool
        checks = 0

        async def counted_check() -> None:
            nonlocal checks
            checks += 1

        pool.check = counted_check  # type: ignore[method-assign]
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as holder:
            await holder.execute(
                f'SELECT FROM "{pg_schema}".sitq_jobs WHERE id = %s FOR UPDATE', ("a",)
            )
            with pytest.raises(StorageUnavailableError, match=f"cancelled.*{setting}") as raised:
                await backend.cancel("a", NOW)
        assert "connection failed" not in str(raised.value)
        assert checks == 0
        assert await backend.cancel("a", NOW)  # the lock released: the same call succeeds
    finally:
        await backend.close()


async def test_conflicts_that_do_not_clear_leave_the_storage_unavailable(pg_schema: str) -> None:
    # A deadlock or serialization failure still there after the retries raised a plain
    # BackendError, which a worker takes for its outcome being refused: a task that
    # succeeded was recorded failed though the conflict was a passing one.
    backend = PostgresBackend(POSTGRES_DSN, schema=pg_schema)
    await backend.open()
    try:
        await backend.enqueue([job("a")])
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as admin:
            await admin.execute(
                f"""CREATE FUNCTION "{pg_schema}".deadlock() RETURNS trigger AS $$
                BEGIN RAISE EXCEPTION 'deadlock detected' USING ERRCODE = '40P01'; END
                $$ LANGUAGE plpgsql"""
            )
            await admin.execute(
                f'CREATE TRIGGER deadlock BEFORE UPDATE ON "{pg_schema}".sitq_jobs'
                f' FOR EACH ROW EXECUTE FUNCTION "{pg_schema}".deadlock()'
            )
            with pytest.raises(StorageUnavailableError, match="conflicts"):
                await backend.cancel("a", NOW)
            await admin.execute(f'DROP TRIGGER deadlock ON "{pg_schema}".sitq_jobs')
        assert await backend.cancel("a", NOW)  # the conflict gone: the same call succeeds
    finally:
        await backend.close()


async def test_a_read_only_database_makes_writes_wait_until_it_is_writable(
    pg_schema: str,
) -> None:
    # default_transaction_read_only (set by an operator, or by a managed service whose
    # disk is nearly full) or a standby: writes raised a plain BackendError, which a
    # worker takes for its outcome being refused (it records the task failed if the
    # next write gets through). And once the setting was lifted, the pool's sessions
    # kept the read-only default they began with, up to its max_lifetime (an hour).
    assert await PostgresBackend(POSTGRES_DSN, schema=pg_schema).migrate() == len(MIGRATIONS)
    role = f"sitq_read_only_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO "{role}"')
        admin.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA "{pg_schema}" TO "{role}"')
        admin.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA "{pg_schema}" TO "{role}"')
        admin.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = on')
    backend = PostgresBackend(
        make_conninfo(POSTGRES_DSN, user=role), schema=pg_schema, min_size=1, max_size=1
    )
    try:
        await backend.open()
        with pytest.raises(StorageUnavailableError, match=r"refuses writes.*read_only"):
            await backend.enqueue([job("a")])
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'ALTER ROLE "{role}" RESET default_transaction_read_only')
        await backend.enqueue([job("a")])
        assert [reserved.id for reserved in await backend.claim(claim("w"))] == ["a"]
    finally:
        await backend.close()
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')
