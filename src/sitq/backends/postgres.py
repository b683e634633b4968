"""PostgresBackend: one database shared by any number of workers on any number of hosts.

How it works: jobs live in one table in a schema of their own (``sitq`` unless told
otherwise), created and upgraded by versioned migrations under an advisory lock, so
many processes may start at once. A claim is one ``UPDATE`` over a ``FOR UPDATE SKIP
LOCKED`` selection, so concurrent workers never wait for each other nor take the
same job; jobs whose lease ran out are part of that selection, so no separate rescuer
is needed. Every write that makes work available sends a ``NOTIFY`` on a channel
named after the schema; once a worker or consumer waits for work (``watch_work``),
the backend keeps a listening connection that wakes it at once, whatever process or
host wrote. Finishes go to a second channel, heard only by processes that wait for
results (``watch_finished``), so a busy worker does not wake every other process
once per task. Polling stays the fallback.

What it cannot do:

* Use the database clock: every time comes from the caller, so hosts whose clocks
  disagree see due times and lease expiry shifted by the difference (run NTP).
* Deliver a ``NOTIFY`` sent while the listening connection was down; the listener
  wakes its workers once when it reconnects, and polling covers the rest.
* Run behind a transaction-mode connection pooler (PgBouncer): LISTEN needs a session,
  and statements are prepared. Point ``dsn`` at PostgreSQL or a session-mode pooler.
* Share connections between event loops: each loop that uses the object (a
  ``SyncTaskQueue``'s thread, a ``Worker.run``) gets its own pool and listener.
* Know whether a transaction committed when the connection dies during ``COMMIT``;
  the retry that follows may then report a job as no longer held (its outcome was in
  fact stored) or, for ``enqueue``, report duplicate ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import random
import threading
import uuid
import weakref
from base64 import b64encode
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sitq.backends.base import (
    Backend,
    ClaimRequest,
    Finish,
    LeaseReport,
    NewJob,
    Outcome,
    QueueStats,
    Reschedule,
    Settled,
    TaskQuery,
    stats_from_counts,
    task_from_row,
)
from sitq.backends.postgres_listen import listen
from sitq.backends.postgres_sql import (
    SCHEMA_NAME,
    SESSION_SETUP,
    Statements,
    claim_order,
    micros,
    reserved_from_row,
    utc,
    utc_required,
)
from sitq.core import JobKind, ReservedTask, Task, TaskStatus
from sitq.errors import BackendError, StorageUnavailableError, ValidationError
from sitq.forking import renew_after_fork
from sitq.scheduling import seconds_from
from sitq.validation import INT32_MAX, int_in_range
from sitq.wakeup import Wakeup

__all__ = ["PostgresBackend"]

T = TypeVar("T")

#: How long the pool keeps retrying a lost connection (1 s, 2 s, 4 s ... apart) before
#: it gives up and lets the next call start afresh. psycopg_pool's 300 s default let
#: the gaps grow to two minutes: after a 140 s outage a worker found its pool empty
#: for 108 s more, though the server was back.
RECONNECT_TIMEOUT = 10.0

logger = logging.getLogger("sitq.postgres")
Conn = psycopg.AsyncConnection[Any]
Cursor = psycopg.AsyncCursor[Any]

#: Transient conflicts (deadlock, serialization) are retried this many times.
CONFLICT_RETRIES = 5
_MIGRATION_LOCK_NAMESPACE = "sitq.migrate."


@dataclass(eq=False)
class _Listener:
    """One LISTEN connection's task, and an event set while it is subscribed."""

    task: asyncio.Task[None]
    listening: asyncio.Event


@dataclass(eq=False)
class _LoopState:
    """The connections one event loop uses."""

    pool: AsyncConnectionPool[Conn]
    #: Every connection the pool made (see _close_pool).
    connections: weakref.WeakSet[Conn]
    #: open() calls not yet matched by a close() (ensure_open() takes no share, as
    #: on SQLite): the pool closes at the last one.
    users: int
    #: Closes the pool if the loop ends without ``close()``.
    keeper: asyncio.Task[None] | None = None
    #: By channel; each started by the first wait for what its channel announces.
    listeners: dict[str, _Listener] = field(default_factory=dict)


async def _close_pool(pool: AsyncConnectionPool[Conn], connections: weakref.WeakSet[Conn]) -> None:
    """Close ``pool`` and its idle connections, even when closing it fails.

    ``AsyncConnectionPool.close()`` takes the idle connections out of the pool, waits
    for the pool's worker tasks, and only then closes them. At the end of
    ``asyncio.run`` those workers were cancelled along with every other task, so the
    wait raises ``CancelledError`` (as it does when the closer itself is cancelled)
    and the connections, known to no one, stayed open until the garbage collector
    found them. So they are closed here. One still lent out is mid-statement or
    mid-transaction, not idle: its task gives it back to the closed pool, which
    closes it.
    """
    try:
        await pool.close()
    except BaseException:
        for conn in list(connections):
            if conn.pgconn.transaction_status == TransactionStatus.IDLE:
                await conn.close()  # does not wait: it only ends the session
        raise


def _split_schema(dsn: str) -> tuple[str, str | None]:
    """Take a ``schema=`` query parameter out of a URL DSN (libpq would reject it)."""
    if "://" not in dsn:
        return dsn, None
    parts = urlsplit(dsn)
    # The other parameters are kept as written: decoding and encoding them again
    # would turn %20 into "+", which libpq does not read as a space.
    fields = parts.query.split("&") if parts.query else []
    schemas = [unquote(field[len("schema=") :]) for field in fields if field.startswith("schema=")]
    if not schemas:
        return dsn, None
    if len(schemas) > 1:
        raise ValidationError(f"the URL gives schema= more than once: {schemas}")
    query = "&".join(field for field in fields if not field.startswith("schema="))
    return urlunsplit(parts._replace(query=query)), schemas[0]


def with_connect_timeout(dsn: str, seconds: float) -> str:
    """``dsn`` with libpq's ``connect_timeout`` (whole seconds, at least 1) unless it
    sets its own: without one, a connection attempt to a silent host waits for ever."""
    if "connect_timeout" in conninfo_to_dict(dsn):
        return dsn
    return make_conninfo(dsn, connect_timeout=max(1, math.ceil(seconds)))


class PostgresBackend(Backend):
    """Jobs in a PostgreSQL schema, shared by workers on any number of hosts.

    Args:
        dsn: a libpq connection string or URL (``postgresql://user@host/db``). A URL may
            carry ``?schema=name``.
        schema: the schema holding sitq's tables (created if missing). Different
            schemas are independent queue systems in one database.
        min_size, max_size: bounds of the connection pool (ints, ``0 <= min_size <=
            max_size``, ``max_size >= 1``).
        connect_timeout: seconds (or a ``timedelta``, positive) to wait for the first
            connection in :meth:`open`.
    """

    pushes_wakeups = True
    multi_process = True

    def __init__(
        self,
        dsn: str,
        schema: str | None = None,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float | timedelta = 10.0,
    ) -> None:
        super().__init__()
        if not isinstance(dsn, str):
            raise ValidationError(f"dsn must be a str, got {type(dsn).__name__}")
        dsn, url_schema = _split_schema(dsn)
        if schema is not None and url_schema is not None and schema != url_schema:
            raise ValidationError(
                f"schema={schema!r} disagrees with the URL's schema={url_schema!r}"
            )
        name = schema if schema is not None else url_schema if url_schema is not None else "sitq"
        if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
            raise ValidationError(
                f"schema must be a plain identifier (letters, digits, _), got {name!r}"
            )
        if name.startswith("pg_"):
            # PostgreSQL refuses to create it, so open() failed, on first use.
            raise ValidationError(f"schema names starting with pg_ are PostgreSQL's, got {name!r}")
        int_in_range(min_size, "min_size", 0, INT32_MAX)
        int_in_range(max_size, "max_size", 1, INT32_MAX)
        if max_size < min_size:
            raise ValidationError(f"bad pool size: min_size={min_size}, max_size={max_size}")
        # Checked here: NaN and infinity once passed open() and then failed every LISTEN
        # connection for ever (libpq takes whole seconds), and zero or less made open()
        # give up at once, reported as "cannot connect".
        timeout = seconds_from(connect_timeout, "connect_timeout")
        if timeout <= timedelta(0):
            raise ValidationError(f"connect_timeout must be positive, got {connect_timeout!r}")
        self.dsn = dsn
        self.schema = name
        # Two NOTIFY channels: one says "there is work" (new, retried, requeued jobs)
        # and every process listens to it; the other says "a job finished" and only
        # processes waiting for a result listen to it, so a busy worker's finishes do
        # not wake every other worker process (and its own listener) once per job.
        self.channel = name
        self.finished_channel = f"{name[:54]}_finished"  # identifiers: 63 bytes at most
        self._finished = Wakeup()
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout = timeout.total_seconds()
        self._sql = Statements.for_schema(name)
        self._opened = False
        self._migrated = False
        self._start_in_this_process()
        renew_after_fork(self)

    def _start_in_this_process(self) -> None:
        """The state that belongs to one process: set here, and again in the child
        of a fork (see sitq.forking)."""
        # One pool and one listener per event loop: asyncio connections belong to the
        # loop that made them, and a SyncTaskQueue (its own loop thread) and a Worker
        # (asyncio.run) may share this object. In a forked child the copies are the
        # parent's: their loops do not run there, and their sockets are the parent's
        # sessions, so they are dropped unclosed (psycopg never ends a connection
        # that another process made).
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._open_locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        # New in a child too: another thread of the parent may have held it at the fork.
        self._loops_lock = threading.Lock()
        # Marks our own NOTIFYs so our listener can skip them (see postgres_listen).
        # One per process: a forked child sharing its parent's skipped the parent's
        # enqueues (and the parent the child's finishes), found only by polling.
        self._token = uuid.uuid4().hex

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (in the running event loop), migrate the schema and start listening.

        May be called from several event loops, each getting its own pool, and several
        times in one: each open() is matched by a close(), and the loop's pool closes
        at the last (a client closing must not cut off a worker sharing the object).
        """
        await self._open_in_this_loop(share=True)

    async def ensure_open(self) -> None:
        await self._open_in_this_loop(share=False)

    async def _open_in_this_loop(self, *, share: bool) -> None:
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            self._forget_closed_loops()
            # A worker and a client sharing this object may open it at the same moment.
            lock = self._open_locks.setdefault(loop, asyncio.Lock())
        async with lock:
            state = self._loops.get(loop)
            if state is not None:
                if share:
                    state.users += 1
                return
            await self._open(loop, users=1 if share else 0)
        self._opened = True

    def _forget_closed_loops(self) -> None:
        """With ``_loops_lock`` held: drop what belongs to event loops that have closed
        (their sockets went with them: nothing is left to close). Loops whose open()
        failed too: they have an open lock and no pool, and were kept, each holding its
        closed loop, for ever (3 KiB per failed open from a new loop, such as a
        ``SyncTaskQueue`` made per request while the server is down)."""
        for stale in [other for other in {*self._loops, *self._open_locks} if other.is_closed()]:
            self._loops.pop(stale, None)
            self._open_locks.pop(stale, None)

    async def _open(self, loop: asyncio.AbstractEventLoop, users: int) -> None:
        connections: weakref.WeakSet[Conn] = weakref.WeakSet()

        async def configure(conn: Conn) -> None:
            connections.add(conn)
            await conn.execute(SESSION_SETUP)

        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.dsn,
            min_size=self.min_size,
            max_size=self.max_size,
            kwargs={"autocommit": True},
            open=False,
            name=f"sitq-{self.schema}",
            reconnect_timeout=RECONNECT_TIMEOUT,
            configure=configure,
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await _close_pool(pool, connections)
            if not isinstance(exc, Exception):  # cancelled: the pool is closed, go on
                raise
            # The pool says only "initialization incomplete"; the server's own words
            # ("too many clients", "database ... does not exist") went to its log.
            reason = await self._connection_refusal() or str(exc)
            raise BackendError(f"cannot connect to PostgreSQL: {reason}") from exc
        state = _LoopState(pool, connections, users)
        with self._loops_lock:
            self._loops[loop] = state
        try:
            if not self._migrated:
                # A schema newer than this code only warns here: during a rolling
                # deploy, workers not yet upgraded keep working on it.
                await self._transaction(
                    functools.partial(self._apply_migrations, refuse_newer=False)
                )
                self._migrated = True
        except BaseException:
            await self.close()
            raise
        state.keeper = asyncio.create_task(self._keep(loop, state), name=f"sitq-pool-{self.schema}")

    async def _connection_refusal(self) -> str | None:
        """Why one connection attempt fails now, in the server's (or libpq's) words;
        ``None`` if it succeeds."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                with_connect_timeout(self.dsn, self.connect_timeout)
            )
        except psycopg.Error as exc:
            return " ".join(str(exc).split())
        await conn.close()
        return None

    async def _keep(self, loop: asyncio.AbstractEventLoop, state: _LoopState) -> None:
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            # Cancelled by the loop shutting down (the end of ``asyncio.run`` in
            # ``Worker.run``) rather than by close(): close the pool while we still can.
            with self._loops_lock:
                abandoned = self._loops.get(loop) is state
                if abandoned:
                    del self._loops[loop]
                    self._open_locks.pop(loop, None)
            if abandoned:
                # The CancelledError the pool's cancelled workers make close() raise
                # (see _close_pool) is the one already on its way out of this task.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await _close_pool(state.pool, state.connections)

    async def close(self) -> None:
        """Match an open(): at the last, close this event loop's pool and listener.
        The backend may be opened again."""
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            state = self._loops.get(loop)
            if state is not None and state.users > 1:
                state.users -= 1
                return
            self._loops.pop(loop, None)
            self._open_locks.pop(loop, None)
            self._forget_closed_loops()
            # _opened stays set: a client that kept using the object after another
            # closed this loop's pool (a Producer after its TaskQueue's context, say)
            # connects again rather than failing "not open".
        if state is None:
            return
        for task in [*(listener.task for listener in state.listeners.values()), state.keeper]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await _close_pool(state.pool, state.connections)
        if state.listeners:
            # Anyone still waiting here (a worker whose backend was closed under it)
            # no longer hears NOTIFYs: wake them to look, reconnect, and listen again
            # (workers and consumers ask for listening before each wait).
            self.wakeup.notify()
            self._finished.notify()

    # Listening is lazy: a process that only enqueues (a web app, say) holds no LISTEN
    # connection and is not woken by every other producer's enqueue.

    async def _listen(self, finished: bool) -> _Listener:
        """This loop's listener for new work (or finished jobs), started if need be.

        It is not awaited: what is announced before it subscribes goes unheard, and
        workers and ``get_result`` find it at their next look.
        """
        channel, wakeup = (
            (self.finished_channel, self._finished) if finished else (self.channel, self.wakeup)
        )
        state = await self._state()
        listener = state.listeners.get(channel)
        if listener is None or listener.task.done():
            listening = asyncio.Event()
            task = asyncio.create_task(
                listen(
                    with_connect_timeout(self.dsn, self.connect_timeout),
                    channel,
                    wakeup,
                    listening,
                    self._token,
                ),
                name=f"sitq-listen-{channel}",
            )
            listener = state.listeners[channel] = _Listener(task, listening)
        return listener

    async def watch_work(self) -> None:
        await self._listen(finished=False)

    async def watch_finished(self) -> Wakeup:
        await self._listen(finished=True)
        return self._finished

    async def wait_listening(self, timeout: float = 10.0, *, finished: bool = False) -> None:
        """Listen for new work (or, with ``finished``, for finished jobs), and return
        once subscribed (for tests, and callers that must not miss the next one)."""
        listener = await self._listen(finished)
        try:
            await asyncio.wait_for(listener.listening.wait(), timeout)
        except TimeoutError as exc:
            raise BackendError("the LISTEN connection did not come up") from exc

    async def migrate(self) -> int:
        """Create or upgrade the schema; safe to run from many processes at once.

        Returns how many migrations this call applied (0 when already current). On a
        backend not open in this event loop it connects for the call alone, so that a
        deploy step can migrate without :meth:`open` (which migrates first itself).
        Raises ``BackendError`` for a schema newer than this code knows: a deploy step
        of older code must not say it is up to date.
        """
        if asyncio.get_running_loop() not in self._loops:
            applied = await self._migrate_on_own_connection()
            self._migrated = True
            return applied
        return await self._transaction(self._apply_migrations)

    async def _migrate_on_own_connection(self) -> int:
        dsn = with_connect_timeout(self.dsn, self.connect_timeout)
        try:
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        except psycopg.Error as exc:
            raise BackendError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            await conn.execute(SESSION_SETUP)
            async with conn.transaction():
                return await self._apply_migrations(conn)
        except psycopg.Error as exc:
            raise BackendError(f"PostgreSQL error: {exc}") from exc
        finally:
            await conn.close()

    async def _apply_migrations(self, conn: Conn, *, refuse_newer: bool = True) -> int:
        """Apply the migrations ``conn``'s transaction has not seen; count them. A
        schema newer than this code is refused, or with ``refuse_newer=False`` only
        warned of."""
        # Look before creating anything: CREATE ... IF NOT EXISTS needs the CREATE
        # privilege even when there is nothing to create, and an account allowed only
        # rows must be able to open a schema that a deploy step migrated.
        version, known = await self._schema_version(conn), len(self._sql.migrations)
        if version > known:
            message = (
                f"schema {self.schema} is at version {version}, newer than this sitq "
                f"knows ({known}): upgrade sitq here"
            )
            if refuse_newer:
                raise BackendError(message)
            logger.warning("%s", message)
        if version >= known:
            return 0
        # Serialises concurrent migrators (CREATE SCHEMA IF NOT EXISTS alone races);
        # the lock is released at commit.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))",
            (_MIGRATION_LOCK_NAMESPACE + self.schema,),
        )
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self._sql.schema}")
            await conn.execute(self._sql.migration_table)
            current = await self._schema_version(conn)  # another migrator may have run
            pending = self._sql.migrations[current:]
            for number, script in enumerate(pending, start=current + 1):
                await conn.execute(script)
                await conn.execute(
                    f"INSERT INTO {self._sql.schema}.sitq_migrations (version) VALUES (%s)",
                    (number,),
                )
        except pg_errors.InsufficientPrivilege as exc:
            # An account allowed only rows, on a schema this sitq is newer than: the
            # server's words ("permission denied for database app") do not say why
            # anything was being created.
            raise BackendError(
                f"schema {self.schema} needs migrating (version {version} of {known}), and"
                f" this account may not create tables there: run `sitq migrate` (or"
                f" migrate()) with one that may. {exc}"
            ) from exc
        return len(pending)

    async def _schema_version(self, conn: Conn) -> int:
        """How many migrations the schema has had (0 without its migrations table)."""
        table = f"{self._sql.schema}.sitq_migrations"
        cursor = await conn.execute("SELECT to_regclass(%s)", (table,))
        found = await cursor.fetchone()
        if found is None or found[0] is None:
            return 0
        cursor = await conn.execute(f"SELECT coalesce(max(version), 0) FROM {table}")
        row = await cursor.fetchone()
        return int(row[0]) if row else 0

    # -- connections, transactions, errors ------------------------------------------------

    async def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is not None:
            return state
        if not self._opened:
            raise BackendError("PostgresBackend is not open: await backend.open() first")
        # Opened, but from another event loop (a sync client's thread, say), or closed
        # here since by another client sharing the object: connect here.
        await self.ensure_open()
        return self._loops[loop]

    async def _run(self, work: Callable[[Conn], Awaitable[T]], transaction: bool) -> T:
        """Run ``work`` on a pooled connection, in a transaction if asked.

        A connection that died (server restart, ``pg_terminate_backend``) or whose
        session is read-only is replaced and the work retried once, as is a statement
        a timeout cancelled; deadlocks and serialization failures, which roll the
        whole transaction back, are retried a few times. What still fails becomes a
        :class:`StorageUnavailableError` if a later call may succeed, otherwise a
        :class:`BackendError`.
        """
        pool = (await self._state()).pool
        reconnected = cancelled = read_only = False
        conflicts = 0
        while True:
            try:
                async with pool.connection() as conn:
                    try:
                        if not transaction:
                            return await work(conn)
                        async with conn.transaction():
                            return await work(conn)
                    except pg_errors.ReadOnlySqlTransaction:
                        # A session keeps the read-only default it began with: once
                        # the role's or database's is lifted, only new ones can write.
                        await conn.close()  # so the pool replaces it
                        raise
            except PoolTimeout as exc:
                # No connection came within the pool's wait (the server is down or
                # full). It is an OperationalError too, but retrying would double the
                # wait for nothing: the pool already kept trying.
                raise StorageUnavailableError(f"PostgreSQL connection failed: {exc}") from exc
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                conflicts += 1
                if conflicts > CONFLICT_RETRIES:
                    # Still a conflict with other transactions, which end: a worker's
                    # outcomes must wait for a later try, not be recorded as refused.
                    raise StorageUnavailableError(
                        f"PostgreSQL kept failing on conflicts with other transactions: {exc}"
                    ) from exc
                await asyncio.sleep(random.uniform(0.001, 0.01) * conflicts)
            except pg_errors.ReadOnlySqlTransaction as exc:
                # A standby, or default_transaction_read_only (which managed services
                # turn on when the disk is nearly full): writes may come back, so the
                # outcomes a worker holds must wait rather than be recorded refused.
                if read_only:
                    raise StorageUnavailableError(
                        "PostgreSQL refuses writes (a standby, or default_transaction_read_only"
                        f" set for this role or database): {exc}"
                    ) from exc
                read_only = True
            except (pg_errors.QueryCanceled, pg_errors.LockNotAvailable) as exc:
                # The server gave up on the statement (a timeout the role or database
                # sets) and rolled it back: no sign of dead connections to check for.
                # Once more, as after a lost one: the wait may have been a moment's.
                if cancelled:
                    raise StorageUnavailableError(_cancelled(exc)) from exc
                cancelled = True
            except psycopg.OperationalError as exc:
                if reconnected:
                    raise StorageUnavailableError(f"PostgreSQL connection failed: {exc}") from exc
                reconnected = True
                # The pool's idle connections probably died together (a restart):
                # have it test and replace them all, not hand us the next dead one.
                with contextlib.suppress(Exception):
                    await pool.check()
            except psycopg.Error as exc:
                raise BackendError(f"PostgreSQL error: {exc}") from exc

    async def _transaction(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._run(work, transaction=True)

    async def _read(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._run(work, transaction=False)

    async def _notify(self, conn: Conn, *, work: bool, finished: bool) -> None:
        """Announce, at commit (so listeners never look before the write is visible),
        that jobs became due (``work``) and/or finished (``finished``)."""
        channels = [self.channel] * work + [self.finished_channel] * finished
        await conn.execute(
            "SELECT pg_notify(channel, %s) FROM unnest(%s::text[]) AS channel",
            (self._token, channels),
        )

    def _wake(self, *, work: bool, finished: bool) -> None:
        """Wake this process's waiters directly: our listeners skip our own NOTIFYs."""
        if work:
            self.wakeup.notify()
        if finished:
            self._finished.notify()

    def _insert_params(self, jobs: Sequence[NewJob]) -> tuple[str, dict[str, Any]]:
        """How to insert ``jobs``: (shape, params), the shape being ``"one"`` (scalars),
        ``"uniform"`` (jobs alike but for id and payload, the usual batch of one task
        with one set of options: arrays for those two, scalars for the rest) or
        ``"many"`` (one array per column). See ``_INSERT_*`` in postgres_sql."""
        params: dict[str, Any] = {"channel": self.channel, "token": self._token}
        first = jobs[0]

        def common(job: NewJob) -> tuple[Any, ...]:
            return (
                job.queue,
                job.kind,
                job.priority,
                job.enqueued_at,
                job.available_at,
                job.max_attempts,
                job.max_deliveries,
                job.interval,
                job.series_id,
            )

        shape = "one" if len(jobs) == 1 else "uniform"
        if shape == "uniform":
            head = common(first)
            if any(common(job) != head for job in jobs):
                shape = "many"
        if shape == "many":
            params.update(
                id=[job.id for job in jobs],
                queue=[job.queue for job in jobs],
                kind=[job.kind for job in jobs],
                priority=[job.priority for job in jobs],
                payload=[job.payload for job in jobs],
                enqueued_at=[job.enqueued_at for job in jobs],
                available_at=[job.available_at for job in jobs],
                max_attempts=[job.max_attempts for job in jobs],
                max_deliveries=[job.max_deliveries for job in jobs],
                interval_us=[micros(job.interval) for job in jobs],
                series_id=[job.series_id for job in jobs],
            )
            return shape, params
        one = shape == "one"
        params.update(
            id=first.id if one else [job.id for job in jobs],
            payload=first.payload if one else [job.payload for job in jobs],
            enqueued_at=first.enqueued_at,
            available_at=first.available_at,
            queue=first.queue,
            kind=first.kind,
            priority=first.priority,
            max_attempts=first.max_attempts,
            max_deliveries=first.max_deliveries,
            interval_us=micros(first.interval),
            series_id=first.series_id,
        )
        return shape, params

    async def _insert(self, conn: Conn, jobs: Sequence[NewJob]) -> None:
        """Insert ``jobs`` and announce them as work: one statement (see ``_ANNOUNCE``),
        so in autocommit one round trip, whatever the number of jobs."""
        shape, params = self._insert_params(jobs)
        statement = {
            "one": self._sql.enqueue_one,
            "uniform": self._sql.enqueue_uniform,
            "many": self._sql.enqueue_many,
        }[shape]
        await conn.execute(statement, params)

    # -- the contract ----------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        if not jobs:
            return
        await self._read(lambda conn: self._insert(conn, jobs))
        self.wakeup.notify()

    @staticmethod
    def _claim_params(request: ClaimRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "kind": request.kind,
            "now": request.now,
            "limit": request.limit,
            "owner": request.owner,
            "lease_expires_at": request.now + request.lease,
        }
        if request.queues is not None:
            # Each queue once: a queue named twice (--queues a,a) would have its due
            # range read twice, and its jobs fill the pick twice (fewer taken).
            params["queues"] = list(dict.fromkeys(request.queues))
        return params

    async def _send_claim(self, conn: Conn, request: ClaimRequest) -> Cursor | None:
        if request.limit <= 0:
            return None
        statement = self._sql.claim_all if request.queues is None else self._sql.claim_queues
        return await conn.execute(statement, self._claim_params(request))

    @staticmethod
    def _leased(rows: Sequence[Sequence[Any]]) -> tuple[list[ReservedTask], int]:
        """The jobs a claim leased, and how many of the slots went to jobs that turned
        'dead' instead (read too many times: they come back too, marked so)."""
        live = [row for row in rows if row[12] == "running"]
        reserved = [reserved_from_row(row) for row in sorted(live, key=claim_order)]
        return reserved, len(rows) - len(live)

    async def _claimed(self, cursor: Cursor | None) -> tuple[list[ReservedTask], int]:
        if cursor is None:
            return [], 0
        return self._leased(await cursor.fetchall())

    async def claim(self, request: ClaimRequest) -> list[ReservedTask]:
        async def work(conn: Conn) -> tuple[list[ReservedTask], int]:
            return await self._claimed(await self._send_claim(conn, request))

        # One statement, atomic on its own: autocommit spares the BEGIN and COMMIT.
        claimed, died = await self._read(work)
        return claimed + await self._refill(request, len(claimed), died)

    async def _refill(self, request: ClaimRequest, leased: int, died: int) -> list[ReservedTask]:
        """Claim again for the slots that jobs turning 'dead' took, if the claim was full
        (else nothing else was due). Each round moves those jobs out of the way."""
        if died and leased + died == request.limit:
            return await self.claim(replace(request, limit=died))
        return []

    async def extend_leases(
        self, owner: str, ids: Sequence[str], lease: timedelta, now: datetime
    ) -> LeaseReport:
        if not ids:
            return LeaseReport()

        async def work(conn: Conn) -> list[Any]:
            cursor = await conn.execute(
                self._sql.extend,
                {"lease_expires_at": now + lease, "ids": list(ids), "owner": owner},
            )
            return await cursor.fetchall()

        rows = await self._read(work)  # one statement: atomic in autocommit
        held = {row[0] for row in rows}
        return LeaseReport(
            lost=frozenset(set(ids) - held),
            cancel_requested=frozenset(row[0] for row in rows if row[1]),
        )

    def _finish_params(self, finish: Finish) -> dict[str, Any]:
        return {
            "status": finish.status.value,
            "finished_at": finish.now,
            "result": finish.result,
            "error": finish.error,
            "traceback": finish.traceback,
            "finished_id": finish.id,
            "finished_by": finish.owner,
            "finished_channel": self.finished_channel,
            "token": self._token,
        }

    async def _send_outcome(self, conn: Conn, outcome: Outcome) -> Cursor:
        if isinstance(outcome, Finish):
            return await conn.execute(self._sql.finish, self._finish_params(outcome))
        return await conn.execute(
            self._sql.reschedule,
            {
                "at": outcome.available_at,
                "finished_at": outcome.finished_at_if_cancelled,
                "undo": 1 if outcome.undo_attempt else 0,
                "error": outcome.error,
                "traceback": outcome.traceback,
                "id": outcome.id,
                "owner": outcome.owner,
                "channel": self.channel,
                "finished_channel": self.finished_channel,
                "token": self._token,
            },
        )

    async def finish(self, finish: Finish) -> bool:
        return (await self.settle([finish], None)).accepted[0]

    async def reschedule(self, reschedule: Reschedule) -> bool:
        return (await self.settle([reschedule], None)).accepted[0]

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        # A retry or a series' next run makes a job due; any outcome may finish one (a
        # retry of a task whose cancellation was requested cancels it). Each statement
        # announces what it changed (the outcomes by pg_notify in their RETURNING, so
        # only rows they did change; the next runs' insert as an enqueue does).
        due = any(isinstance(o, Reschedule) or o.next_run is not None for o in outcomes)
        plain = [o for o in outcomes if isinstance(o, Finish) and o.next_run is None]
        if len(plain) == 1 == len(outcomes) and claim is not None:
            # A worker's usual settle at concurrency 1: one statement, one round trip.
            work = functools.partial(self._finish_and_claim, finish=plain[0], claim=claim)
        elif len(plain) > 1 and len(plain) == len(outcomes):
            # A worker's usual settle at higher concurrency, a consumer's archive_many.
            work = functools.partial(self._finish_many, finishes=plain, claim=claim)
        else:
            work = functools.partial(self._pipelined_settle, outcomes=outcomes, claim=claim)
        settled, died = await self._read(work)
        if any(settled.accepted):
            self._wake(work=due, finished=True)
        if claim is not None and died:
            more = await self._refill(claim, len(settled.claimed), died)
            settled = Settled(settled.accepted, settled.claimed + more)
        return settled

    async def _finish_and_claim(
        self, conn: Conn, *, finish: Finish, claim: ClaimRequest
    ) -> tuple[Settled, int]:
        """One finish with no next run, and a claim: one statement, atomic in
        autocommit (see _FINISH_AND_CLAIM)."""
        if claim.queues is None:
            statement = self._sql.finish_and_claim_all
        else:
            statement = self._sql.finish_and_claim_queues
        cursor = await conn.execute(
            statement, self._claim_params(claim) | self._finish_params(finish)
        )
        rows = await cursor.fetchall()
        claimed, died = self._leased([row[1:] for row in rows if row[1] is not None])
        return Settled([rows[0][0] is not None], claimed), died

    async def _finish_many(
        self, conn: Conn, *, finishes: Sequence[Finish], claim: ClaimRequest | None
    ) -> tuple[Settled, int]:
        """Finishes with no next runs, and a claim if asked: one statement, atomic in
        autocommit (see _FINISHES)."""
        params = {
            "finishes": _finishes_document(finishes),
            "finished_channel": self.finished_channel,
            "token": self._token,
        }
        if claim is None:
            cursor = await conn.execute(self._sql.finish_many, params)
        else:
            if claim.queues is None:
                statement = self._sql.finish_many_and_claim_all
            else:
                statement = self._sql.finish_many_and_claim_queues
            cursor = await conn.execute(statement, self._claim_params(claim) | params)
        rows = await cursor.fetchall()
        recorded = set(rows[0][0] or ())
        settled = [finish.id in recorded for finish in finishes]
        if claim is None:
            return Settled(settled, []), 0
        claimed, died = self._leased([row[1:] for row in rows if row[1] is not None])
        return Settled(settled, claimed), died

    async def _pipelined_settle(
        self, conn: Conn, *, outcomes: Sequence[Outcome], claim: ClaimRequest | None
    ) -> tuple[Settled, int]:
        """Any outcomes and a claim, pipelined on an autocommit connection with no
        BEGIN/COMMIT: everything is sent before any answer is read, and reading (a
        flush, not a Sync) leaves the statements in one implicit transaction that the
        Sync at the end of the pipeline commits (or rolls back, on an error). So the
        whole turn (outcomes with their NOTIFYs, claim) is atomic. It costs two round
        trips (the answers, then the Sync's commit), plus one more when a recurring
        task's next run must be inserted."""
        # Rows are updated in id order so two transactions touching the same jobs
        # (this settle and the same worker's heartbeat) cannot deadlock.
        order = sorted(range(len(outcomes)), key=lambda index: outcomes[index].id)
        async with conn.pipeline():
            sent = [await self._send_outcome(conn, outcomes[index]) for index in order]
            claim_cursor = None if claim is None else await self._send_claim(conn, claim)
            accepted = [False] * len(outcomes)
            next_runs: list[NewJob] = []
            for index, cursor in zip(order, sent, strict=True):
                row = await cursor.fetchone()
                accepted[index] = row is not None
                outcome = outcomes[index]
                # A cancelled series stops: no next run.
                if row is not None and isinstance(outcome, Finish) and not row[0]:
                    if outcome.next_run is not None:
                        next_runs.append(outcome.next_run)
            claimed, died = await self._claimed(claim_cursor)
            if next_runs:
                await self._insert(conn, next_runs)
        return Settled(accepted, claimed), died

    async def _update_one(
        self,
        statement: str,
        params: dict[str, Any],
        *,
        work: bool,
        finished: bool,
        lock: str | None = None,
    ) -> bool:
        async def update(conn: Conn) -> bool:
            if lock is not None:
                await conn.execute(lock, params)
            cursor = await conn.execute(statement, params)
            done = await cursor.fetchone() is not None
            if done:
                await self._notify(conn, work=work, finished=finished)
            return done

        done = await self._transaction(update)
        if done:
            self._wake(work=work, finished=finished)
        return done

    async def cancel(self, job_id: str, now: datetime) -> bool:
        # A pending job is cancelled at once (finished); a running one when its
        # worker's heartbeat sees the request, which needs no announcement.
        return await self._update_one(
            self._sql.cancel, {"id": job_id, "now": now}, work=False, finished=True
        )

    async def requeue(self, job_id: str, now: datetime) -> bool:
        return await self._update_one(
            self._sql.requeue,
            {"id": job_id, "now": now},
            work=True,
            finished=False,
            lock=self._sql.lock_series,
        )

    async def delete(self, job_id: str) -> bool:
        async def work(conn: Conn) -> bool:
            cursor = await conn.execute(self._sql.delete, {"id": job_id})
            return cursor.rowcount > 0

        return await self._read(work)

    async def get(self, job_id: str) -> Task | None:
        async def work(conn: Conn) -> Any:
            cursor = await conn.execute(self._sql.get, {"id": job_id})
            return await cursor.fetchone()

        row = await self._read(work)
        return None if row is None else task_from_row(row, utc_required)

    async def list_jobs(self, query: TaskQuery) -> list[Task]:
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": query.limit}
        for column, value in (
            ("status", None if query.status is None else query.status.value),
            ("queue", query.queue),
            ("kind", query.kind),
        ):
            if value is not None:
                clauses.append(f"{column} = %({column})s")
                params[column] = value
        if query.ids is not None:
            clauses.append("id = ANY(%(ids)s)")
            params["ids"] = list(query.ids)
        if query.statuses is not None:
            clauses.append("status = ANY(%(statuses)s)")
            params["statuses"] = [status.value for status in query.statuses]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        prefix = self._sql.list_with_payload_prefix if query.payloads else self._sql.list_prefix
        statement = f"{prefix}{where} ORDER BY enqueued_at DESC, seq DESC LIMIT %(limit)s"

        async def work(conn: Conn) -> list[Any]:
            cursor = await conn.execute(statement, params)
            return await cursor.fetchall()

        return [task_from_row(row, utc_required) for row in await self._read(work)]

    async def queue_stats(self, now: datetime) -> list[QueueStats]:
        async def work(conn: Conn) -> list[Any]:
            # It reads every row: with sequential scans off (SESSION_SETUP) it sorted
            # them all to group them, 2-3x slower.
            await conn.execute("SET LOCAL enable_seqscan = on")
            cursor = await conn.execute(self._sql.queue_stats, {"now": now})
            return await cursor.fetchall()

        return stats_from_counts(
            (queue, status, count, scheduled, expired, utc(oldest))
            for queue, status, count, scheduled, expired, oldest in await self._transaction(work)
        )

    async def next_due(self, kind: JobKind, queues: tuple[str, ...] | None) -> datetime | None:
        params: dict[str, Any] = {"kind": kind}
        statement = self._sql.next_due_all
        if queues is not None:
            statement = self._sql.next_due_queues
            params["queues"] = list(dict.fromkeys(queues))

        async def work(conn: Conn) -> Any:
            cursor = await conn.execute(statement, params)
            return await cursor.fetchone()

        row = await self._read(work)
        return None if row is None else utc(row[0])

    async def purge(
        self,
        finished_before: datetime,
        statuses: Sequence[TaskStatus],
        limit: int | None = None,
        *,
        kind: JobKind | None = None,
        queues: tuple[str, ...] | None = None,
    ) -> int:
        if not statuses:
            return 0

        async def work(conn: Conn) -> int:
            cursor = await conn.execute(
                self._sql.purge,
                {
                    "before": finished_before,
                    "statuses": [status.value for status in statuses],
                    "limit": limit,
                    "kind": kind,
                    "queues": None if queues is None else list(queues),
                },
            )
            return cursor.rowcount

        return await self._read(work)


def _cancelled(exc: psycopg.Error) -> str:
    """What a cancelled statement's error says: the setting that most likely cut it
    short, which a message from the server (in its language) may not name."""
    setting = "lock_timeout" if isinstance(exc, pg_errors.LockNotAvailable) else "statement_timeout"
    return (
        f"PostgreSQL cancelled the statement twice (is the {setting} set for this role"
        f" or database too short for sitq?): {exc}"
    )


def _finishes_document(finishes: Sequence[Finish]) -> str:
    """The JSON document _FINISHES reads: one object per finish, results in base64."""
    return json.dumps(
        [
            {
                "id": finish.id,
                "owner": finish.owner,
                "status": finish.status.value,
                "finished_at": finish.now.isoformat(),
                "result": None if finish.result is None else b64encode(finish.result).decode(),
                "error": finish.error,
                "traceback": finish.traceback,
            }
            for finish in finishes
        ]
    )
