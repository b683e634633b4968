"""SQLiteBackend: the embedded default. One file, any number of worker processes on
one machine.

How it works: the file is in WAL mode, so readers never wait for the writer. Every
write is a short ``BEGIN IMMEDIATE`` transaction run directly on the calling event
loop (statements take microseconds; a thread hop would cost more than the work).
When another process holds the write lock the call (opening the file included) does
not block the loop: it awaits a short, growing, jittered pause and tries again.

Wake-ups: writers in the same process wake waiters at once; writes by other processes
are noticed within about 5 ms through ``PRAGMA data_version``, polled on each event
loop where a worker, a consumer or ``get_result`` has waited.

A file deleted (with its -wal and -shm files) under open connections is noticed within
about a second (CHECK_FILE_EVERY_SECONDS): each logs an error and opens the path again,
creating the file and its tables if need be, rather than serving the old file unseen.
A file replaced while its -wal and -shm stay is beyond help: SQLite would read the old
write-ahead log into the new file (as for any SQLite application).

SQLite keeps the bookkeeping of its file locks in process memory, which a fork copies:
a fork waits for the SQLite calls under way to end (_FORK_GATE), so that no child
starts believing it holds a lock its parent held at that moment. The calls do not wait
for one another.

What it cannot do: serve machines that do not share the file (use PostgreSQL). Do not put the
file on a network filesystem: SQLite's locking is not reliable there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

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
from sitq.core import JobKind, ReservedTask, Task, TaskStatus
from sitq.errors import BackendError, StorageUnavailableError, ValidationError
from sitq.forking import renew_after_fork
from sitq.wakeup import Wakeup

T = TypeVar("T")

logger = logging.getLogger("sitq.sqlite")

#: How long a call keeps retrying while other processes hold the write lock.
LOCK_PATIENCE_SECONDS = 30.0
#: Outcomes recorded per statement (7 parameters each; SQLite allows 32,766).
FINISH_BATCH = 500
#: How often an open backend checks whether another process wrote to the file.
WATCH_EVERY_SECONDS = 0.005
#: How often a connection in use checks that its path still names the file it opened.
CHECK_FILE_EVERY_SECONDS = 1.0
#: The size the -wal file is cut back to when SQLite starts it over: without it, the
#: file keeps the size of the largest write (an ``enqueue_many`` of 100,000 calls
#: leaves 60-130 MB) for as long as any process has the database open.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)  # made once: building it costs more than the division

# Each entry is one schema version; PRAGMA user_version records how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sitq_jobs (
        id               TEXT PRIMARY KEY,
        queue            TEXT NOT NULL,
        kind             TEXT NOT NULL,
        status           TEXT NOT NULL,
        priority         INTEGER NOT NULL,
        payload          BLOB NOT NULL,
        enqueued_at      INTEGER NOT NULL,
        available_at     INTEGER NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        max_attempts     INTEGER NOT NULL,
        max_deliveries   INTEGER,
        interval_us      INTEGER,
        series_id        TEXT,
        owner            TEXT,
        lease_expires_at INTEGER,
        started_at       INTEGER,
        finished_at      INTEGER,
        result           BLOB,
        error            TEXT,
        traceback        TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    -- The claim path: due jobs by priority then due time. Far-future jobs sort after
    -- every due one, so a large backlog of scheduled work costs the claim nothing.
    CREATE INDEX sitq_jobs_due ON sitq_jobs (kind, priority DESC, available_at)
        WHERE status = 'pending';
    CREATE INDEX sitq_jobs_lease ON sitq_jobs (lease_expires_at) WHERE status = 'running';
    CREATE INDEX sitq_jobs_enqueued ON sitq_jobs (enqueued_at);
    CREATE INDEX sitq_jobs_finished ON sitq_jobs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX sitq_jobs_series ON sitq_jobs (series_id) WHERE series_id IS NOT NULL;
    """,
    # The slot a recurring run was due at, kept when a retry moves available_at.
    "ALTER TABLE sitq_jobs ADD COLUMN scheduled_at INTEGER",
    # Every claim looks for run-out leases of its own kind: a range of this index.
    """
    DROP INDEX sitq_jobs_lease;
    CREATE INDEX sitq_jobs_lease ON sitq_jobs (kind, lease_expires_at)
        WHERE status = 'running';
    """,
    # A claim or next_due for one queue (a consumer's, a worker's with --queues): its
    # due range alone. Filtered by queue, sitq_jobs_due read every due job of other
    # queues that was ahead of the queue's first one.
    """
    CREATE INDEX sitq_jobs_queue_due ON sitq_jobs (kind, queue, priority DESC, available_at)
        WHERE status = 'pending';
    """,
)

_TASK_COLUMNS = (
    "id, queue, kind, status, priority, attempts, max_attempts, enqueued_at, available_at,"
    " started_at, finished_at, interval_us, series_id, error, traceback, result"
)
_RESERVED_COLUMNS = (
    "id, queue, kind, payload, priority, attempts, max_attempts, available_at, enqueued_at,"
    " lease_expires_at, interval_us, series_id, max_deliveries,"
    " coalesce(scheduled_at, available_at), cancel_requested"
)


class _ForkGate:
    """SQLite calls pass it together; a fork waits until none is under way, and new
    calls wait for the fork. (One lock around every call made a long read in one
    thread stall every other thread's event loop, and logging inside it could
    deadlock.)"""

    def __init__(self) -> None:
        self.after_fork_in_child()

    # A context manager of its own, not a generator: it is on every call's path. So
    # is its lock, taken as itself: through the Condition, each "with" ran two Python
    # calls more (0.72 us per pass through the gate, 0.54 us so).
    def __enter__(self) -> None:
        with self._lock:
            while self._forks:
                self._cond.wait()
            self._calls += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._calls -= 1
            if self._forks and not self._calls:
                self._cond.notify_all()  # the fork waiting for the calls under way

    def before_fork(self) -> None:
        with self._cond:
            self._forks += 1  # a count: two threads may fork at once
            # Bounded: a fork from inside a call (a task never runs in one) must not
            # wait for itself for ever.
            self._cond.wait_for(lambda: not self._calls, timeout=30)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forks -= 1
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        # Fresh: the parent's calls and waiters are not in the child.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._calls = 0
        self._forks = 0


_FORK_GATE = _ForkGate()
if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(
        before=_FORK_GATE.before_fork,
        after_in_parent=_FORK_GATE.after_fork_in_parent,
        after_in_child=_FORK_GATE.after_fork_in_child,
    )

# One registry per process so every backend object on the same file shares wake-ups.
_WAKEUPS: dict[str, Wakeup] = {}


def _wakeup_for(path: str) -> Wakeup:
    # No lock: setdefault is atomic (two threads racing make one spare Wakeup), and a
    # module-level lock held by another thread at a fork would stay held in the child.
    return _WAKEUPS.setdefault(path, Wakeup())


def to_micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _maybe_time(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def _marks(values: Sequence[object]) -> str:
    """The placeholders of an ``IN (...)`` list of ``values``; ``NULL`` (matching
    nothing) for none, as ``IN ()`` is not SQL."""
    return ", ".join("?" * len(values)) or "NULL"


def _next_level(conn: sqlite3.Connection, kind: JobKind, below: int | None = None) -> int | None:
    """The highest priority among pending jobs of ``kind`` (below ``below``, if given):
    one probe of sitq_jobs_due."""
    statement = "SELECT max(priority) FROM sitq_jobs WHERE status = 'pending' AND kind = ?"
    if below is None:
        (level,) = conn.execute(statement, (kind,)).fetchone()
    else:
        (level,) = conn.execute(statement + " AND priority < ?", (kind, below)).fetchone()
    return cast(int | None, level)


@functools.cache  # one entry per number of queues served
def _claim_statements(queue_count: int | None) -> tuple[str, str]:
    """A claim's statements for ``queue_count`` queues (all if None), made once: the pick
    of jobs whose lease ran out (queues bound after kind and time), and the taking of
    due jobs at one priority level (queues bound as ``:q0``, ``:q1``...). Building them
    per claim was 5% of an empty claim's time, 15% with three queues.

    The due jobs taken are the first ``:limit`` of ``:kind`` at ``:level`` in due order
    (then enqueue order). For several queues, the first ``:limit`` of each queue's range
    of sitq_jobs_queue_due, merged. Given ``queue IN (...)``, SQLite reads sitq_jobs_due
    instead (its order spares a sort), and with it every due job of other queues
    ahead of theirs.
    """
    queue_filter = "" if queue_count is None else f" AND queue IN ({_marks(range(queue_count))})"
    expired = (
        "SELECT rowid FROM sitq_jobs WHERE status = 'running' AND kind = ?"
        f" AND lease_expires_at <= ?{queue_filter}"
        " ORDER BY priority DESC, available_at, rowid LIMIT ?"
    )
    pick = (
        "SELECT rowid FROM sitq_jobs WHERE status = 'pending' AND kind = :kind"
        " AND priority = :level AND available_at <= :now{} ORDER BY available_at LIMIT :limit"
    )
    if queue_count is None:
        due = pick.format("")
    elif queue_count == 1:
        due = pick.format(" AND queue = :q0")
    else:
        names = ", ".join(f"(:q{number})" for number in range(queue_count))
        due = (
            f"WITH served(name) AS (VALUES {names}) SELECT job.rowid FROM served,"
            f" sitq_jobs AS job WHERE job.rowid IN ({pick.format(' AND queue = served.name')})"
            " ORDER BY job.available_at, job.rowid LIMIT :limit"
        )
    take = (
        "UPDATE sitq_jobs SET status = 'running', owner = :owner,"
        " attempts = attempts + 1, lease_expires_at = :lease_end,"
        " started_at = CASE WHEN max_deliveries IS NOT NULL"
        " AND attempts >= max_deliveries THEN started_at ELSE :now END"
        f" WHERE rowid IN ({due}) RETURNING {_RESERVED_COLUMNS}"
    )
    return expired, take


_INSERT = (
    "INSERT INTO sitq_jobs (id, queue, kind, status, priority, payload, enqueued_at,"
    " available_at, max_attempts, max_deliveries, interval_us, series_id,"
    " scheduled_at) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?7)"
)


def _row(job: NewJob) -> tuple[Any, ...]:
    return (
        job.id,
        job.queue,
        job.kind,
        job.priority,
        job.payload,
        to_micros(job.enqueued_at),
        to_micros(job.available_at),
        job.max_attempts,
        job.max_deliveries,
        None if job.interval is None else job.interval // _MICROSECOND,
        job.series_id,
    )


class _OpenRaceError(Exception):
    """Opening needed a lock another connection holds: switching a new file to WAL
    and creating or upgrading the schema take locks, which SQLite reports as busy at
    once (the busy timeout is 0: waiting in SQLite would block the event loop). Or it
    looked at the WAL index while another connection created it, which can report an
    I/O error. Both pass."""


def _file_id(path: Path) -> tuple[int, int]:
    """What tells one file from another at ``path``; raises OSError if none is there."""
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _is_open_race(exc: sqlite3.OperationalError) -> bool:
    return _is_busy(exc) or getattr(exc, "sqlite_errorname", "").startswith("SQLITE_IOERR")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _clears_up(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is about the file or the disk under it, not the call, and may
    clear up (on its own or when an operator steps in): the same call may then succeed.

    A worker keeps such an outcome to record later; recording it as refused made a
    task that succeeded "failed" for good when the disk was full. Left out, as the
    call's own fault or lasting: SQLITE_TOOBIG (a value past SQLite's limit, refused
    every time), constraint and SQL errors, SQLITE_CORRUPT and SQLITE_NOTADB, and
    SQLITE_READONLY* (the connection was opened read-only, and stays so).
    """
    name: str = getattr(exc, "sqlite_errorname", "")
    return (
        name == "SQLITE_FULL"  # the disk is full (sitq sets no max_page_count)
        or name == "SQLITE_PROTOCOL"  # a race for the WAL index that SQLite gave up on
        # Every SQLITE_IOERR_*: a read, write, fsync or lock the filesystem failed.
        or name.startswith("SQLITE_IOERR")
        # The -wal or -shm file cannot be opened now (out of file descriptors, say).
        or name.startswith("SQLITE_CANTOPEN")
    )


#: The connections a forked child inherited: kept, never used nor closed there.
_INHERITED: list[sqlite3.Connection] = []


class SQLiteBackend(Backend):
    """Jobs in one SQLite file shared by every process on the machine."""

    pushes_wakeups = False
    multi_process = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path) if isinstance(path, str | os.PathLike) else None
        if not isinstance(text, str):
            # str() would turn None (an unset setting, say) into a file named "None".
            raise ValidationError(
                f"path must be a str or os.PathLike naming a file, got {type(path).__name__}"
            )
        if not text or text.endswith(("/", os.sep)) or "\x00" in text:
            # "sub/" made a file named sub; NUL raised a bare ValueError at open.
            raise ValidationError(f"path must name a file, got {text!r}")
        if text == ":memory:" or text.startswith("file::memory:"):
            raise ValidationError(
                "SQLiteBackend needs a file so workers can share it; "
                "use MemoryBackend for jobs that live in this process only"
            )
        try:
            self.path = Path(text).expanduser().resolve()
        except FileNotFoundError as exc:
            # Only os.getcwd() raises it here (resolve() is not strict).
            raise BackendError(
                f"cannot open SQLite database {text!r}: the current directory no longer exists"
            ) from exc
        except (OSError, RuntimeError) as exc:
            # A symlink loop, or ~user naming no one (RuntimeError before Python 3.13).
            raise BackendError(f"cannot open SQLite database {text!r}: {exc}") from exc
        if self.path.is_dir():  # ".", or a directory named by mistake
            raise ValidationError(f"path must name a file, not the directory {self.path}")
        super().__init__()
        self.wakeup = _wakeup_for(str(self.path))
        self._warned_newer = False  # see _migrate
        self._start_in_this_process()
        renew_after_fork(self)

    def _start_in_this_process(self) -> None:
        """Per-thread state (connection, watcher, open count): set here, and again in
        the child of a fork (see sitq.forking). SQLite forbids using a connection in a
        forked child: its lock bookkeeping is the parent's, so a read there is not
        protected against the parent's checkpoint. The forking thread's inherited one is
        kept referenced, so the garbage collector does not close it in the child
        (other threads' go with their thread states, which Python drops at a fork)."""
        inherited = getattr(getattr(self, "_local", None), "conn", None)
        if inherited is not None:
            _INHERITED.append(inherited)
        self._local = threading.local()

    # -- connections and transactions ---------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (WAL mode, schema migrated) on first use,
        and opened again if the file was deleted or replaced under it.

        Raises ``_OpenRaceError`` when opening needed a lock held elsewhere (see
        ``_OpenRaceError``); the caller tries again.
        """
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            if time.monotonic() < self._local.check_file_at or self._still_the_file():
                return conn
            # An open connection would go on with the deleted file, which no other
            # process sees: a worker would serve it, and nothing new, until restarted.
            logger.error(
                "SQLite database %s was deleted or replaced while open: opening the file"
                " now at that path (what was written to the old one since is lost)",
                self.path,
            )
            self._local.conn = None
            conn.close()
            self.wakeup.notify()  # waiters look at the new file at once
        if not self.path.parent.is_dir():
            raise BackendError(f"cannot open SQLite database {self.path}: no such directory")
        try:
            # No busy timeout: SQLite would wait for a lock by blocking this thread, and
            # so the event loop; _retrying waits for it asynchronously instead.
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as exc:
            raise BackendError(f"cannot open SQLite database {self.path}: {exc}") from exc
        try:
            # No lock once the file is in WAL mode: only a new file's switch takes one.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {int(WAL_SIZE_LIMIT_BYTES)}")
            # Each new connection looks (a read, no lock): the file may have been deleted
            # and created again since the last, and then has no tables.
            self._migrate(conn)
            file = _file_id(self.path)
        except sqlite3.OperationalError as exc:
            conn.close()
            if _is_open_race(exc):
                raise _OpenRaceError(str(exc)) from exc
            raise BackendError(f"cannot open SQLite database {self.path}: {exc}") from exc
        except OSError as exc:  # from _file_id: the file went as soon as it was opened
            conn.close()
            raise BackendError(f"cannot open SQLite database {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        # Kept only once it is ready: a failed set-up must not leave a half-open one.
        self._local.conn = conn
        self._local.file = file
        self._local.check_file_at = time.monotonic() + CHECK_FILE_EVERY_SECONDS
        return conn

    def _still_the_file(self) -> bool:
        """Whether the path still names this thread's connection's file. Asked at
        most every CHECK_FILE_EVERY_SECONDS, keeping a stat off each statement's path."""
        opened: tuple[int, int] = self._local.file
        try:
            same = _file_id(self.path) == opened
        except OSError:
            same = False  # gone; opening the path again says what is wrong, if anything
        self._local.check_file_at = time.monotonic() + CHECK_FILE_EVERY_SECONDS
        return same

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Read without the write lock: a file already up to date (nearly always) opens
        # while another process writes. Taking the lock to look held every new client,
        # and its event loop, behind the longest write under way.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS) and not self._warned_newer:
            self._warned_newer = True  # once, not at each thread's connection
            logger.warning(
                "%s has schema version %d, newer than this sitq knows (%d): upgrade sitq here",
                self.path,
                version,
                len(MIGRATIONS),
            )
        elif version < len(MIGRATIONS):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Again under the lock: another process may have migrated meanwhile.
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {number}")
                conn.execute("COMMIT")
            except BaseException:
                self._roll_back(conn)
                raise

    def _roll_back(self, conn: sqlite3.Connection) -> None:
        """End a transaction that failed, keeping its error the one reported.

        SQLite has already rolled back after some errors (a full disk, an I/O error),
        and a ROLLBACK then fails "no transaction is active", which hid the reason.
        """
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            # Closing rolls back too; the next call opens a fresh connection instead
            # of finding this one still in a transaction ("cannot start a transaction
            # within a transaction", for ever).
            logger.warning("could not roll back on %s; reopening it", self.path, exc_info=True)
            self._local.conn = None
            conn.close()

    async def _retrying(self, attempt: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``attempt``; while another process holds the lock (or is opening the
        file at the same moment), pause and retry."""
        pause = 0.0005
        deadline = time.monotonic() + LOCK_PATIENCE_SECONDS
        while True:
            try:
                with _FORK_GATE:
                    return attempt(self._connection())
            except _OpenRaceError as exc:
                if time.monotonic() > deadline:
                    raise StorageUnavailableError(
                        f"cannot open SQLite database {self.path}: {exc}"
                    ) from exc
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise self._translated(exc) from exc
                if time.monotonic() > deadline:
                    raise StorageUnavailableError(f"SQLite error on {self.path}: {exc}") from exc
            except sqlite3.Error as exc:
                raise self._translated(exc) from exc
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, 0.02)

    def _translated(self, exc: sqlite3.Error) -> BackendError:
        kind = StorageUnavailableError if _clears_up(exc) else BackendError
        return kind(f"SQLite error on {self.path}: {exc}")

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def attempt(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                self._roll_back(conn)
                raise
            return result

        return await self._retrying(attempt)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._retrying(work)

    async def open(self) -> None:
        """Open this thread's connection (and migrate the file) if need be, and take a
        share of it: each open() is matched by a close(), and the last closes it."""
        await self.ensure_open()
        self._local.users = getattr(self._local, "users", 0) + 1

    async def ensure_open(self) -> None:
        # Without a share: a client that opens on first use (a Producer, a Consumer)
        # leaves the closing to its caller's one close(), as any first use does.
        await self._retrying(lambda conn: None)

    async def watch_work(self) -> None:
        """Start watching for other processes' commits on this thread's loop, once
        (``watch_finished`` does the same: commits are all SQLite can tell apart).

        Only where something waits (a worker, a consumer, ``get_result``): a process
        that only enqueues is not woken every few milliseconds for nothing.
        """
        watcher: asyncio.Task[None] | None = getattr(self._local, "watcher", None)
        if (
            watcher is None
            or watcher.done()
            or watcher.get_loop() is not asyncio.get_running_loop()
        ):
            # One watcher per thread's loop; a loop that ended took its watcher with it.
            self._local.watcher = asyncio.create_task(
                self._watch_other_processes(), name=f"sitq-sqlite-watch:{self.path.name}"
            )

    async def _watch_other_processes(self) -> None:
        """Wake this process's waiters when another process commits to the file.

        SQLite has no notifications, but ``PRAGMA data_version`` changes whenever
        another connection commits; reading it costs microseconds. Polling it every
        few milliseconds lets idle workers start work enqueued by other processes (and
        ``get_result`` see their results) without waiting for a poll interval.
        """
        last = None
        while True:
            try:
                (version,) = await self._read(
                    lambda conn: conn.execute("PRAGMA data_version").fetchone()
                )
            except BackendError:
                version = None  # transient (locked, or the file is being replaced)
            if last is not None and version is not None and version != last:
                self.wakeup.notify()
            last = version if version is not None else last
            await asyncio.sleep(WATCH_EVERY_SECONDS)

    async def close(self) -> None:
        """Match an open() in this thread; the last (or a close() with none to match)
        stops the thread's watcher and closes its connection. Each thread (a worker's
        loop, a ``SyncTaskQueue``'s private loop) has its own, and a client sharing
        this backend object with a worker on one loop leaves the worker both."""
        users: int = getattr(self._local, "users", 0)
        if users > 1:
            self._local.users = users - 1
            return
        self._local.users = 0
        watcher: asyncio.Task[None] | None = getattr(self._local, "watcher", None)
        if watcher is not None:
            self._local.watcher = None
            watched = not watcher.done()
            watcher.cancel()
            if watcher.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            if watched:
                # Anyone still waiting (a worker whose backend was closed under it)
                # no longer hears other processes: wake them to look and watch again
                # (workers and consumers ask for watching before each wait).
                self.wakeup.notify()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = None
        with _FORK_GATE:
            conn.close()

    # -- rows to objects -----------------------------------------------------------

    @staticmethod
    def _reserved(row: Sequence[Any], lease_expires_at: datetime) -> ReservedTask:
        interval_us = row[10]
        available_at = from_micros(row[7])
        return ReservedTask(
            id=row[0],
            queue=row[1],
            kind=row[2],
            payload=row[3],
            priority=row[4],
            attempts=row[5],
            max_attempts=row[6],
            available_at=available_at,
            enqueued_at=available_at if row[8] == row[7] else from_micros(row[8]),
            lease_expires_at=lease_expires_at,  # the claim's, the same for every row
            interval=None if interval_us is None else timedelta(microseconds=interval_us),
            series_id=row[11],
            scheduled_at=available_at if row[13] == row[7] else from_micros(row[13]),
            cancel_requested=bool(row[14]),
        )

    @staticmethod
    def _insert(conn: sqlite3.Connection, jobs: Sequence[NewJob]) -> None:
        conn.executemany(_INSERT, [_row(job) for job in jobs])

    # -- the contract ------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> None:
        if len(jobs) == 1:
            # One statement is its own transaction: no BEGIN/COMMIT round of calls.
            row = _row(jobs[0])
            await self._retrying(lambda conn: conn.execute(_INSERT, row))
        else:
            await self._write(lambda conn: self._insert(conn, jobs))
        self.wakeup.notify()

    def _claim(self, conn: sqlite3.Connection, request: ClaimRequest) -> list[ReservedTask]:
        if request.queues == ():
            return []  # serving no queue, it takes nothing (a VALUES list needs one)
        now = to_micros(request.now)
        # Each queue once: a queue named twice would fill the pick with its jobs twice.
        queues = None if request.queues is None else tuple(dict.fromkeys(request.queues))
        pick_expired, take_due = _claim_statements(None if queues is None else len(queues))
        # Jobs whose lease ran out (a dead or stuck worker's) compete with due jobs
        # for the slots. The best ``limit`` of them turn 'pending' for the search
        # below (and as many more as jobs it finds turn dead, which free their
        # slots), owner kept, and those it does not take go back to 'running': the
        # write lock hides the switch, and a holder whose lease ran out keeps the
        # job (it can still extend or settle it) until a claim takes it.
        expired: list[int] = []

        def take_expired(count: int) -> None:
            found = [
                rowid
                for (rowid,) in conn.execute(
                    pick_expired, [request.kind, now, *(queues or ()), count]
                )
            ]
            if found:
                conn.executemany(
                    "UPDATE sitq_jobs SET status = 'pending' WHERE rowid = ?",
                    [(rowid,) for rowid in found],
                )
                expired.extend(found)

        take_expired(request.limit)
        # Due jobs, level by level: sitq_jobs_due orders pending jobs by (kind, priority
        # DESC, available_at), so within one priority "due now, earliest first" is a
        # range that ends at the first job not yet due. One range per priority present
        # (each found by probing for the next lower one), highest first, so scheduled
        # jobs cost nothing however many there are. One statement over all priorities
        # cannot stop early: when fewer than ``limit`` jobs were due it read every
        # scheduled job (14 ms with 200,000 of them, on every claim of an idle worker).
        # A job read more than its max_deliveries turns 'dead' instead, and does not
        # count against the limit: the same level is searched again for the slot. It
        # keeps the started_at of its last delivery: it was not started again.
        lease_expires_at = to_micros(request.now + request.lease)
        served = {f"q{number}": queue for number, queue in enumerate(queues or ())}
        rows: list[Any] = []
        level = _next_level(conn, request.kind)
        while level is not None and len(rows) < request.limit:
            found = conn.execute(
                take_due,
                {
                    "owner": request.owner,
                    "lease_end": lease_expires_at,
                    "now": now,
                    "kind": request.kind,
                    "level": level,
                    "limit": request.limit - len(rows),
                    **served,
                },
            ).fetchall()
            overdelivered = {row[0] for row in found if row[12] is not None and row[5] > row[12]}
            if overdelivered:
                conn.executemany(
                    "UPDATE sitq_jobs SET status = 'dead', owner = NULL, finished_at = ?,"
                    " attempts = attempts - 1,"
                    " error = 'delivered ' || (attempts - 1) || ' times without being finished'"
                    " WHERE id = ?",
                    [(now, job_id) for job_id in overdelivered],
                )
                take_expired(len(overdelivered))
            rows += [row for row in found if row[0] not in overdelivered]
            if not overdelivered and len(rows) < request.limit:
                level = _next_level(conn, request.kind, level)
        if expired:
            conn.executemany(
                "UPDATE sitq_jobs SET status = 'running' WHERE rowid = ? AND status = 'pending'",
                [(rowid,) for rowid in expired],
            )
        lease_end = from_micros(lease_expires_at)
        claimed = [self._reserved(row, lease_end) for row in rows]
        claimed.sort(key=lambda job: (-job.priority, job.available_at))
        return claimed

    async def claim(self, request: ClaimRequest) -> list[ReservedTask]:
        return await self._write(lambda conn: self._claim(conn, request))

    async def extend_leases(
        self, owner: str, ids: Sequence[str], lease: timedelta, now: datetime
    ) -> LeaseReport:
        if not ids:
            return LeaseReport()
        marks = _marks(ids)

        def work(conn: sqlite3.Connection) -> LeaseReport:
            rows = conn.execute(
                "UPDATE sitq_jobs SET lease_expires_at = ?"
                f" WHERE id IN ({marks}) AND owner = ? AND status = 'running'"
                " RETURNING id, cancel_requested",
                [to_micros(now + lease), *ids, owner],
            ).fetchall()
            held = {row[0] for row in rows}
            return LeaseReport(
                lost=frozenset(set(ids) - held),
                cancel_requested=frozenset(row[0] for row in rows if row[1]),
            )

        return await self._write(work)

    def _finish(self, conn: sqlite3.Connection, finish: Finish) -> bool:
        row = conn.execute(
            "UPDATE sitq_jobs SET status = ?, owner = NULL, lease_expires_at = NULL,"
            " finished_at = ?, result = ?, error = ?, traceback = ?"
            " WHERE id = ? AND owner = ? AND status = 'running' RETURNING cancel_requested",
            (
                finish.status.value,
                to_micros(finish.now),
                finish.result,
                finish.error,
                finish.traceback,
                finish.id,
                finish.owner,
            ),
        ).fetchone()
        if row is None:
            return False
        if finish.next_run is not None and not row[0]:
            self._insert(conn, [finish.next_run])
        return True

    def _finish_plain(self, conn: sqlite3.Connection, finishes: Sequence[Finish]) -> set[str]:
        """Record many outcomes without next runs; return the ids whose owner held them."""
        recorded: set[str] = set()
        for start in range(0, len(finishes), FINISH_BATCH):
            chunk = finishes[start : start + FINISH_BATCH]
            rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            params: list[Any] = []
            for finish in chunk:
                params += [
                    finish.id,
                    finish.owner,
                    finish.status.value,
                    to_micros(finish.now),
                    finish.result,
                    finish.error,
                    finish.traceback,
                ]
            done = conn.execute(
                "WITH outcome(id, owner, status, finished_at, result, error, traceback)"
                f" AS (VALUES {rows})"
                " UPDATE sitq_jobs SET status = outcome.status, owner = NULL,"
                " lease_expires_at = NULL, finished_at = outcome.finished_at,"
                " result = outcome.result, error = outcome.error,"
                " traceback = outcome.traceback"
                " FROM outcome WHERE sitq_jobs.id = outcome.id"
                " AND sitq_jobs.owner = outcome.owner AND sitq_jobs.status = 'running'"
                " RETURNING sitq_jobs.id",
                params,
            ).fetchall()
            recorded.update(row[0] for row in done)
        return recorded

    def _reschedule(self, conn: sqlite3.Connection, reschedule: Reschedule) -> bool:
        row = conn.execute(
            "UPDATE sitq_jobs SET"
            " status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'pending' END,"
            " finished_at = CASE WHEN cancel_requested THEN ? ELSE NULL END,"
            # Cancelled, the job is not due again: it keeps the due time it ran at.
            " available_at = CASE WHEN cancel_requested THEN available_at ELSE ? END,"
            " owner = NULL, lease_expires_at = NULL,"
            " attempts = attempts - ?, error = coalesce(?, error),"
            " traceback = coalesce(?, traceback)"
            " WHERE id = ? AND owner = ? AND status = 'running' RETURNING id",
            (
                to_micros(reschedule.finished_at_if_cancelled),
                to_micros(reschedule.available_at),
                1 if reschedule.undo_attempt else 0,
                reschedule.error,
                reschedule.traceback,
                reschedule.id,
                reschedule.owner,
            ),
        ).fetchone()
        return row is not None

    async def finish(self, finish: Finish) -> bool:
        done = await self._write(lambda conn: self._finish(conn, finish))
        if done:
            self.wakeup.notify()
        return done

    async def reschedule(self, reschedule: Reschedule) -> bool:
        done = await self._write(lambda conn: self._reschedule(conn, reschedule))
        if done:
            self.wakeup.notify()
        return done

    async def settle(self, outcomes: Sequence[Outcome], claim: ClaimRequest | None) -> Settled:
        def work(conn: sqlite3.Connection) -> Settled:
            # Plain finishes (no next run to insert) are the hot path: one statement.
            plain = [o for o in outcomes if isinstance(o, Finish) and o.next_run is None]
            recorded = self._finish_plain(conn, plain)
            accepted = [
                o.id in recorded
                if isinstance(o, Finish) and o.next_run is None
                else self._finish(conn, o)
                if isinstance(o, Finish)
                else self._reschedule(conn, o)
                for o in outcomes
            ]
            claimed = self._claim(conn, claim) if claim is not None else []
            return Settled(accepted, claimed)

        settled = await self._write(work)
        if outcomes:
            self.wakeup.notify()
        return settled

    async def cancel(self, job_id: str, now: datetime) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "UPDATE sitq_jobs SET"
                " status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,"
                " finished_at = CASE WHEN status = 'pending' THEN ? ELSE finished_at END,"
                " cancel_requested = 1"
                " WHERE id = ? AND status IN ('pending', 'running') RETURNING id",
                (to_micros(now), job_id),
            ).fetchone()
            return row is not None

        done = await self._write(work)
        if done:
            self.wakeup.notify()
        return done

    async def requeue(self, job_id: str, now: datetime) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "UPDATE sitq_jobs SET status = 'pending', available_at = ?1, attempts = 0,"
                " scheduled_at = ?1, started_at = NULL,"
                " finished_at = NULL, error = NULL, traceback = NULL, result = NULL,"
                " cancel_requested = 0,"
                # A series that lives on gets this run once more, not a second series
                # (see _REQUEUE in postgres_sql).
                " interval_us = CASE WHEN EXISTS (SELECT 1 FROM sitq_jobs AS s"
                "  WHERE s.series_id = sitq_jobs.series_id AND s.id <> sitq_jobs.id"
                "  AND s.status IN ('pending', 'running')) THEN NULL ELSE interval_us END"
                " WHERE id = ? AND status IN ('failed', 'dead', 'cancelled') RETURNING id",
                (to_micros(now), job_id),
            ).fetchone()
            return row is not None

        done = await self._write(work)
        if done:
            self.wakeup.notify()
        return done

    async def delete(self, job_id: str) -> bool:
        return await self._write(
            lambda conn: conn.execute("DELETE FROM sitq_jobs WHERE id = ?", (job_id,)).rowcount > 0
        )

    async def get(self, job_id: str) -> Task | None:
        row = await self._read(
            lambda conn: conn.execute(
                f"SELECT {_TASK_COLUMNS} FROM sitq_jobs WHERE id = ?", (job_id,)
            ).fetchone()
        )
        return None if row is None else task_from_row(row, from_micros)

    async def list_jobs(self, query: TaskQuery) -> list[Task]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("status", None if query.status is None else query.status.value),
            ("queue", query.queue),
            ("kind", query.kind),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.ids is not None:
            clauses.append(f"id IN ({_marks(query.ids)})")
            params.extend(query.ids)
        if query.statuses is not None:
            clauses.append(f"status IN ({_marks(query.statuses)})")
            params.extend(status.value for status in query.statuses)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT {_TASK_COLUMNS}{', payload' if query.payloads else ''}"
                f" FROM sitq_jobs{where}"
                " ORDER BY enqueued_at DESC, rowid DESC LIMIT ?",
                [*params, query.limit],
            ).fetchall()
        )
        return [task_from_row(row, from_micros) for row in rows]

    async def queue_stats(self, now: datetime) -> list[QueueStats]:
        moment = to_micros(now)
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT queue, status, count(*),"
                " sum(status = 'pending' AND available_at > :now),"
                " sum(status = 'running' AND lease_expires_at <= :now),"
                " min(CASE WHEN status = 'pending' AND available_at <= :now THEN available_at"
                " WHEN status = 'running' AND lease_expires_at <= :now THEN lease_expires_at"
                " END) FROM sitq_jobs GROUP BY queue, status ORDER BY queue",
                {"now": moment},
            ).fetchall()
        )
        return stats_from_counts(
            (queue, status, count, scheduled, expired, _maybe_time(oldest))
            for queue, status, count, scheduled, expired, oldest in rows
        )

    async def next_due(self, kind: JobKind, queues: tuple[str, ...] | None) -> datetime | None:
        queue_filter = ""
        if queues is not None:
            queue_filter = f" AND queue IN ({_marks(queues)})"

        def earliest(conn: sqlite3.Connection) -> int | None:
            # Level by level, as the claim does: min(available_at) over all priorities
            # cannot use sitq_jobs_due and read every pending job.
            found: int | None = None
            level = _next_level(conn, kind)
            while level is not None:
                (due,) = conn.execute(
                    "SELECT min(available_at) FROM sitq_jobs"
                    f" WHERE status = 'pending' AND kind = ? AND priority = ?{queue_filter}",
                    [kind, level, *(queues or ())],
                ).fetchone()
                if due is not None and (found is None or due < found):
                    found = due
                level = _next_level(conn, kind, level)
            (lease_end,) = conn.execute(
                "SELECT min(lease_expires_at) FROM sitq_jobs"
                f" WHERE status = 'running' AND kind = ?{queue_filter}",
                [kind, *(queues or ())],
            ).fetchone()
            if lease_end is not None and (found is None or lease_end < found):
                found = lease_end
            return found

        return _maybe_time(await self._read(earliest))

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
        conditions = [f"status IN ({_marks(statuses)})"]
        params: list[Any] = [status.value for status in statuses]
        if kind is not None:
            conditions.append("kind = ?")
            params.append(kind)
        if queues is not None:
            conditions.append(f"queue IN ({_marks(queues)})")
            params.extend(queues)
        where = " AND ".join(conditions)
        return await self._write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM sitq_jobs WHERE rowid IN (SELECT rowid FROM sitq_jobs"
                    f" WHERE finished_at < ? AND {where} LIMIT ?)",
                    [
                        to_micros(finished_before),
                        *params,
                        -1 if limit is None else limit,  # SQLite: a negative LIMIT is none
                    ],
                ).rowcount
            )
        )
