"""The ``sitq`` command, driven for real in subprocesses against SQLite and PostgreSQL.

Tasks come from ``cli_tasks`` (next to this file); workers run with this directory as
their working directory and import it with ``--import cli_tasks``. Nothing sleeps to
let things settle: every wait is for a condition (a line on stderr, a task status, a
file) with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest

import cli_tasks
from conftest import POSTGRES_DSN
from sitq import SQLiteBackend, SyncTaskQueue, Task, TaskStatus, ValidationError
from sitq.backends.base import Backend, NewJob
from sitq.backends.url import backend_from_url
from sitq.cli.output import parse_duration
from sitq.cli.worker import RESTART_AFTER_SECONDS

TESTS_DIR = Path(__file__).parent
_SCRIPT = Path(sys.executable).parent / "sitq"
SITQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "sitq.cli"]
WAIT = 15.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITQ_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def sitq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SITQ, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS_DIR,
        env=env or _env(),
    )


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    pause = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class WorkerProcess:
    """A ``sitq worker`` subprocess whose stderr lines are collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*SITQ, "worker", *args],
            cwd=TESTS_DIR,
            env=env or _env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._new.put(line)

    def wait_line(self, pattern: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.lines if regex.search(line)]
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            if self.proc.poll() is not None and self._reader.is_alive():
                self._reader.join(left)  # read what the process wrote before exiting
                continue
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(
                    f"no line matching {pattern!r} (x{count}); stderr:\n{self.stderr}"
                )
            try:
                self._new.get(timeout=min(left, 0.5))
            except queue.Empty:
                pass

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class Store:
    """One database for a test: its URL for the CLI, a client for the test itself."""

    url: str
    tmp: Path
    clients: list[SyncTaskQueue] = field(default_factory=list)

    def client(self) -> SyncTaskQueue:
        client = SyncTaskQueue(backend_from_url(self.url))
        self.clients.append(client)
        return client

    def status(self, task_id: str) -> TaskStatus | None:
        task = self.task(task_id)
        return None if task is None else task.status

    def task(self, task_id: str) -> Task | None:
        return self.clients[0].get_task(task_id)

    def wait_status(self, task_id: str, status: TaskStatus, timeout: float = WAIT) -> None:
        wait_for(lambda: self.status(task_id) is status, f"task {task_id} {status}", timeout)

    def close(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'sitq.db'}"
    else:
        schema = request.getfixturevalue("pg_schema")
        url = f"{POSTGRES_DSN}?schema={schema}"
    store = Store(url, tmp_path)
    store.client()  # creates the database, so inspection commands find it
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'sitq.db'}", tmp_path)
    store.client()
    yield store
    store.close()


def start_worker(store: Store, *args: str, **env: str) -> WorkerProcess:
    worker = WorkerProcess(
        "--backend",
        store.url,
        "--import",
        "cli_tasks",
        "--poll-interval",
        "0.05",
        *args,
        env=_env(**env) if env else None,
    )
    worker.wait_line(r"worker \S+ started")
    return worker


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.kill()


# -- the worker ------------------------------------------------------------------------


def test_backend_urls_name_a_sqlite_file_or_are_refused(tmp_path: Path) -> None:
    relative = backend_from_url("sqlite:///tasks.db")
    assert isinstance(relative, SQLiteBackend) and relative.path == Path("tasks.db").resolve()
    absolute = backend_from_url(f"sqlite:///{tmp_path / 'q.db'}")
    assert isinstance(absolute, SQLiteBackend) and absolute.path == tmp_path / "q.db"
    # A query once became part of the file's name; "/" named no file at all.
    for url in (
        "sqlite:///q.db?mode=ro",
        "sqlite:///q.db#x",
        "sqlite:////",
        "sqlite:///d/",
        "sqlite://",
    ):
        with pytest.raises(ValidationError, match="sqlite URL"):
            backend_from_url(url)
    # " sqlite:///tasks.db" (an env file's stray space) named /tasks.db, at the root.
    for url in (
        " sqlite:///tasks.db",
        "\tsqlite:///tasks.db",
        "sqlite:///tasks.db\r",
        " postgresql://localhost/db",
        "memory:// ",
    ):
        with pytest.raises(ValidationError, match="must not start or end with whitespace"):
            backend_from_url(url)
    with pytest.raises(ValidationError, match=r"unknown backend scheme '\\x01sqlite'"):
        backend_from_url("\x01sqlite:///tasks.db")


def test_worker_runs_tasks_and_sigterm_lets_the_running_task_finish(
    store: Store, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(store, "--concurrency", "2")
    workers.append(worker)
    client = store.clients[0]
    quick = client.enqueue(cli_tasks.add, 2, 3)
    store.wait_status(quick, TaskStatus.SUCCESS)
    assert client.deserialize_result(client.get_result(quick, timeout=5)) == 5  # type: ignore[arg-type]

    marker = store.tmp / "started"
    slow = client.enqueue(cli_tasks.slow, str(marker), 0.5)
    wait_for(marker.exists, "the slow task to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.stderr
    assert store.status(slow) is TaskStatus.SUCCESS
    # One INFO line per task event, with id, queue, attempt and duration.
    assert re.search(
        rf"task success id={slow} queue=default attempt=1 duration=0\.[5-9]\d*s", worker.stderr
    ), worker.stderr
    assert "SIGTERM received" in worker.stderr


def test_second_signal_exits_at_once_and_the_lease_keeps_the_task(
    sqlite_store: Store, workers: list[WorkerProcess]
) -> None:
    worker = start_worker(sqlite_store)
    workers.append(worker)
    marker = sqlite_store.tmp / "started"
    slow = sqlite_store.clients[0].enqueue(cli_tasks.slow, str(marker), 30)
    wait_for(marker.exists, "the slow task to start")
    worker.signal(signal.SIGINT)
    worker.wait_line("SIGINT received")
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=5) == 128 + signal.SIGINT
    assert "exiting now" in worker.stderr
    # Still leased: another worker runs it once the lease expires.
    assert sqlite_store.status(slow) is TaskStatus.RUNNING


@pytest.mark.parametrize("kind", ["sync", "async, ignoring cancellation"])
def test_tasks_still_running_after_the_grace_period_are_handed_back(
    sqlite_store: Store, workers: list[WorkerProcess], kind: str
) -> None:
    worker = start_worker(sqlite_store, "--grace", "0.2")
    workers.append(worker)
    marker = sqlite_store.tmp / "started"
    client = sqlite_store.clients[0]
    if kind == "sync":
        slow = client.enqueue(cli_tasks.slow, str(marker), 30)
    else:
        slow = client.enqueue(cli_tasks.stubborn, str(marker))
    wait_for(marker.exists, "the slow task to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0, worker.stderr
    task = sqlite_store.task(slow)
    assert task is not None
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 0  # the interrupted attempt is not counted
    assert f"handed back task {slow}" in worker.stderr


def test_burst_drains_the_backlog_showing_progress_and_json_logs(sqlite_store: Store) -> None:
    # A queue name that reads like more fields: they are data, not parsed from text.
    queue = "my queue attempt=7"
    ids = sqlite_store.clients[0].enqueue_many(
        [(cli_tasks.add, (i, 1)) for i in range(30)], queue=queue
    )
    result = sitq(
        "worker",
        "--burst",
        "--import",
        "cli_tasks",
        "--log-format",
        "json",
        env=_env(SITQ_BACKEND_URL=sqlite_store.url, SITQ_CONCURRENCY="4"),
    )
    assert result.returncode == 0, result.stderr
    assert all(sqlite_store.status(task_id) is TaskStatus.SUCCESS for task_id in ids)
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(r["message"].startswith("burst: 30 tasks due") for r in records)
    assert any("stopped: 30 tasks processed" in r["message"] for r in records)
    events = [r for r in records if r.get("event") == "success"]
    assert {r["task_id"] for r in events} == set(ids)
    assert all(r["queue"] == queue and r["attempt"] == 1 for r in events)
    assert all(r["duration_seconds"] >= 0 and r["level"] == "info" for r in events)
    assert "concurrency=4" in next(r["message"] for r in records if "started:" in r["message"])


def test_burst_progress_rewrites_one_line_on_a_terminal(sqlite_store: Store) -> None:
    marker = sqlite_store.tmp / "started"
    task_id = sqlite_store.clients[0].enqueue(cli_tasks.slow, str(marker), 0.7)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [*SITQ, "worker", "-b", sqlite_store.url, "--burst", "-i", "cli_tasks"],
            cwd=TESTS_DIR,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            timeout=30,
            check=False,
        )
    finally:
        os.close(terminal)
    chunks = []
    try:
        with contextlib.suppress(OSError):  # EIO once everything written was read
            while chunk := os.read(controller, 4096):
                chunks.append(chunk)
    finally:
        os.close(controller)
    written = b"".join(chunks).decode()
    assert proc.returncode == 0, written
    assert "\rburst: 0 processed, 1 due or running" in written
    assert sqlite_store.status(task_id) is TaskStatus.SUCCESS


def test_several_processes_share_the_work_and_stop_on_sigterm(
    sqlite_store: Store, workers: list[WorkerProcess]
) -> None:
    worker = WorkerProcess(
        "--backend",
        sqlite_store.url,
        "--import",
        "cli_tasks",
        "--poll-interval",
        "0.05",
        "--processes",
        "2",
    )
    workers.append(worker)
    started = worker.wait_line(r"worker \S+ started", count=2)
    assert len({re.search(r"\[(\d+)\]", line)[1] for line in started}) == 2  # type: ignore[index]
    ids = sqlite_store.clients[0].enqueue_many([(cli_tasks.whoami, ()) for _ in range(10)])
    for task_id in ids:
        sqlite_store.wait_status(task_id, TaskStatus.SUCCESS)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.stderr
    assert len(worker.wait_line(r"worker \S+ stopped", count=2)) == 2


# -- inspection ----------------------------------------------------------------------


def test_list_show_cancel_and_retry(store: Store) -> None:
    client = store.clients[0]
    later = client.enqueue(cli_tasks.add, 1, 2, delay=timedelta(hours=1))
    bad = client.enqueue(cli_tasks.boom, "kaput", queue="bad")
    ran = sitq("worker", "-b", store.url, "--burst", "-i", "cli_tasks", "--queues", "bad")
    assert ran.returncode == 0, ran.stderr
    assert store.status(bad) is TaskStatus.FAILED

    listed = sitq("tasks", "list", "-b", store.url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {t["id"]: t["status"] for t in json.loads(listed.stdout)} == {
        later: "pending",
        bad: "failed",
    }
    failed = sitq("tasks", "list", "-b", store.url, "--status", "failed")
    assert failed.stdout.splitlines()[0].split()[:3] == ["ID", "QUEUE", "STATUS"]
    assert bad in failed.stdout and later not in failed.stdout
    by_queue = json.loads(sitq("tasks", "list", "-b", store.url, "--queue", "bad", "--json").stdout)
    assert [t["id"] for t in by_queue] == [bad]

    shown = sitq("tasks", "show", bad, "-b", store.url)
    assert shown.returncode == 0
    assert "RuntimeError: kaput" in shown.stdout and "Traceback" in shown.stdout
    as_json = json.loads(sitq("tasks", "show", bad, "-b", store.url, "--json").stdout)
    assert as_json["error"] == "RuntimeError: kaput" and "boom" in as_json["traceback"]

    queues = json.loads(sitq("queues", "-b", store.url, "--json").stdout)
    assert {q["queue"]: (q["scheduled"], q["failed"]) for q in queues} == {
        "bad": (0, 1),
        "default": (1, 0),
    }
    assert sitq("queues", "-b", store.url).stdout.startswith("QUEUE")

    assert sitq("tasks", "retry", bad, "-b", store.url).returncode == 0
    assert store.status(bad) is TaskStatus.PENDING
    assert sitq("tasks", "retry", bad, "-b", store.url).returncode == 4
    assert sitq("tasks", "cancel", later, "-b", store.url).returncode == 0
    assert store.status(later) is TaskStatus.CANCELLED
    again = sitq("tasks", "cancel", later, "-b", store.url)
    assert (again.returncode, again.stderr) == (
        4,
        f"Error: task {later} is already cancelled; nothing to cancel\n",
    )
    for command in ("show", "cancel", "retry"):
        missing = sitq("tasks", command, "nope", "-b", store.url)
        assert (missing.returncode, missing.stderr) == (1, "Error: no task with id 'nope'\n")


def test_queue_metrics_and_messages(store: Store) -> None:
    client = store.clients[0]
    client.enqueue(cli_tasks.add, 1, 2, queue="reminders", delay=60)
    message_id = "m-" + os.urandom(4).hex()

    async def put_message() -> None:
        backend: Backend = backend_from_url(store.url)
        await backend.open()
        try:
            now = client.queue.clock.now()
            await backend.enqueue(
                [
                    NewJob(
                        id=message_id,
                        queue="reminders",
                        kind="message",
                        payload=b'{"remind": "ada"}',
                        enqueued_at=now,
                        available_at=now + timedelta(seconds=30),
                    )
                ]
            )
        finally:
            await backend.close()

    asyncio.run(put_message())
    metrics = sitq("queue", "metrics", "reminders", "-b", store.url, "--json")
    assert metrics.returncode == 0, metrics.stderr
    data = json.loads(metrics.stdout)
    assert (data["queue"], data["total"], data["scheduled"], data["pending"]) == (
        "reminders",
        2,
        2,
        0,
    )
    assert data["next_due_at"] is not None and data["newest_enqueued_at"] is not None
    text = sitq("queue", "metrics", "reminders", "-b", store.url).stdout
    assert "scheduled (not yet due):  2" in text

    for group in ("messages", "message"):  # pgqrs spells it `message list`
        listed = sitq(group, "list", "--queue", "reminders", "-b", store.url, "--json")
        assert listed.returncode == 0, listed.stderr
        ((listed_id, payload),) = [(m["id"], m["payload"]) for m in json.loads(listed.stdout)]
        assert (listed_id, payload) == (message_id, {"remind": "ada"})
    table = sitq("messages", "list", "--queue", "reminders", "-b", store.url).stdout
    assert "VISIBLE AT" in table and message_id in table and '{"remind":"ada"}' in table
    assert message_id not in sitq("tasks", "list", "-b", store.url).stdout


def test_purge_reports_progress_and_removes_finished_jobs(sqlite_store: Store) -> None:
    client = sqlite_store.clients[0]
    ids = client.enqueue_many([(cli_tasks.add, (i, i)) for i in range(5)])
    pending = client.enqueue(cli_tasks.add, 0, 0, delay=3600)
    assert sitq("worker", "-b", sqlite_store.url, "--burst", "-i", "cli_tasks").returncode == 0
    kept = sitq("purge", "--older-than", "1d", "-b", sqlite_store.url, "--json")
    assert json.loads(kept.stdout)["purged"] == 0
    purged = sitq("purge", "--older-than", "0s", "--status", "success", "-b", sqlite_store.url)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith("purged 5 jobs")
    assert "[1/1] success: removed 5" in purged.stderr
    assert all(sqlite_store.status(task_id) is None for task_id in ids)
    assert (
        sitq(
            "purge", "--older-than", "0s", "--status", "pending", "-b", sqlite_store.url
        ).returncode
        == 2
    )
    assert sqlite_store.status(pending) is TaskStatus.PENDING


def test_migrate(store: Store, tmp_path: Path) -> None:
    result = sitq("migrate", "-b", store.url)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    if store.url.startswith("postgresql"):
        # The store's schema was made before: nothing left to apply.
        assert "applied 0 migration(s)" in result.stdout
    fresh = tmp_path / "fresh.db"
    assert sitq("migrate", "-b", f"sqlite:///{fresh}").returncode == 0
    assert fresh.exists()


# -- errors: one line, a stable exit code, never a traceback ---------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["tasks", "list", "-b", "sqlite:///{tmp}/missing.db"], 1, "does not exist"),
        (["tasks", "list", "-b", "sqlite:///{tmp}/no/dir/x.db"], 1, "directory"),
        (["worker", "-b", "sqlite:///{tmp}/no/dir/x.db"], 1, "directory"),
        (["queues", "-b", "not a url"], 2, "backend URL must look like"),
        (["queues", "-b", "redis://localhost"], 2, "unknown backend scheme"),
        (["queues"], 2, "SITQ_BACKEND_URL"),
        (["purge", "--older-than", "3 weeks", "-b", "sqlite:///{tmp}/x.db"], 2, "duration"),
        # Past the API's 36,525 days, or past what a timedelta holds at all.
        (["purge", "--older-than", "37000d", "-b", "sqlite:///{tmp}/x.db"], 2, "--older-than"),
        (["purge", "--older-than", "1e300", "-b", "sqlite:///{tmp}/x.db"], 2, "too long"),
        (["worker", "-b", "memory://", "--retention", "9999999999d"], 2, "--retention"),
        (["tasks", "list", "--status", "lost", "-b", "sqlite:///{tmp}/x.db"], 2, "lost"),
        (["worker", "-b", "sqlite:///{tmp}/x.db", "-i", "no_such_module"], 2, "no_such_module"),
        (["worker", "-b", "memory://", "-i", "cli_exits_on_import"], 2, "SystemExit"),
        (["worker", "-b", "memory://", "--grace", "nan"], 2, "finite"),
        (["worker", "-b", "memory://", "-q", ","], 2, "names no queue"),
        # A name no backend can store (a lone surrogate) was an unexpected error, exit 3.
        (["messages", "list", "--queue", "\udcff", "-b", "memory://"], 2, "--queue"),
        (["queue", "metrics", "\udcff", "-b", "memory://"], 2, "NAME"),
        (["tasks", "list", "--limit", str(2**40), "-b", "memory://"], 2, "--limit"),
        (["tasks", "list", "-b", "postgresql://postgres@127.0.0.1:1/x"], 3, "Connection refused"),
    ],
)
def test_errors(args: list[str], code: int, message: str, tmp_path: Path) -> None:
    if "postgresql" in args[-1]:
        pytest.importorskip("psycopg")
    result = sitq(*(arg.replace("{tmp}", str(tmp_path)) for arg in args))
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "missing.db").exists()
    if code != 2:  # usage errors also print click's usage hint
        assert result.stderr.count("\n") == 1, result.stderr


def test_a_relative_sqlite_url_in_a_deleted_directory_is_not_found(tmp_path: Path) -> None:
    # The current directory's deletion surfaced as "unexpected FileNotFoundError" (exit 3).
    gone = tmp_path / "gone"
    gone.mkdir()
    enter_then_delete = 'cd "$0" && rmdir "$0" && exec "$@"'
    for url, code in (("sqlite:///tasks.db", 1), (f"sqlite:///{tmp_path}/tasks.db", 0)):
        gone.mkdir(exist_ok=True)
        result = subprocess.run(
            ["sh", "-c", enter_then_delete, str(gone), *SITQ, "migrate", "-b", url],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        assert result.returncode == code, result.stderr
        if code:
            assert result.stderr == (
                "Error: cannot open SQLite database 'tasks.db':"
                " the current directory no longer exists\n"
            )
    assert (tmp_path / "tasks.db").exists()  # an absolute URL works from there


def test_inspecting_a_missing_postgres_schema_is_not_found_and_creates_nothing(
    pg_schema: str,
) -> None:
    import psycopg

    result = sitq("queues", "-b", f"{POSTGRES_DSN}?schema={pg_schema}")
    assert result.returncode == 1
    assert f'no sitq schema "{pg_schema}"' in result.stderr
    with psycopg.connect(POSTGRES_DSN) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s",
            (pg_schema,),
        ).fetchone()
    assert row == (0,)


def test_missing_postgres_database_is_not_found() -> None:
    from conftest import require_postgres

    require_postgres()
    url = POSTGRES_DSN.rsplit("/", 1)[0] + "/sitq_no_such_database"
    result = sitq("tasks", "list", "-b", url)
    assert result.returncode == 1
    assert 'database "sitq_no_such_database" does not exist' in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 604800),
        ("12h", 43200),
        ("30m", 1800),
        ("45s", 45),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("90", 90),
        ("0s", 0),
        ("2w", 1209600),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "3x", "h", "1h 30m", "-5s", "5s1", "inf", "nan"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_supervisor_forwards_a_second_signal(
    sqlite_store: Store, workers: list[WorkerProcess]
) -> None:
    worker = WorkerProcess(
        "--backend", sqlite_store.url, "--import", "cli_tasks", "--processes", "2"
    )
    workers.append(worker)
    worker.wait_line(r"worker \S+ started", count=2)
    marker = sqlite_store.tmp / "started"
    slow = sqlite_store.clients[0].enqueue(cli_tasks.slow, str(marker), 30)
    wait_for(marker.exists, "the slow task to start")
    worker.signal(signal.SIGTERM)
    worker.wait_line("SIGTERM received", count=2)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=5) == 128 + signal.SIGTERM
    assert sqlite_store.status(slow) is TaskStatus.RUNNING


def test_supervisor_restarts_a_worker_process_that_dies(
    sqlite_store: Store, workers: list[WorkerProcess]
) -> None:
    # Documented in cli.md, untested until now: a child that dies while running (OOM
    # killer, a crash) is replaced, and the group goes on.
    worker = WorkerProcess(
        "--backend", sqlite_store.url, "--import", "cli_tasks", "--poll-interval", "0.05",
        "--processes", "2",
    )  # fmt: skip
    workers.append(worker)
    started = worker.wait_line(r"worker \S+ started", count=2)
    seen = time.monotonic()
    victim = int(re.search(r"\[(\d+)\]", started[0])[1])  # type: ignore[index]
    # Only a child past its first seconds is restarted (one dying sooner is taken for
    # bad configuration): the condition under test, not a pause to let things settle.
    wait_for(lambda: time.monotonic() - seen > RESTART_AFTER_SECONDS, "the start-up window")
    os.kill(victim, signal.SIGKILL)
    worker.wait_line(rf"worker process {victim} exited with -9; starting a new one")
    worker.wait_line(r"worker \S+ started", count=3)
    ids = sqlite_store.clients[0].enqueue_many([(cli_tasks.whoami, ()) for _ in range(10)])
    for task_id in ids:
        sqlite_store.wait_status(task_id, TaskStatus.SUCCESS)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0, worker.stderr


def test_supervisor_stops_the_group_when_a_worker_process_fails_at_start(
    sqlite_store: Store, workers: list[WorkerProcess]
) -> None:
    # Documented in cli.md, untested until now: a child that exits in its first
    # seconds (a bad configuration) stops the group with its exit code, rather than
    # being restarted for ever.
    worker = WorkerProcess(
        "--backend", sqlite_store.url, "--import", "cli_fails_in_children", "--processes", "2"
    )
    workers.append(worker)
    code = worker.wait()
    assert code not in (0, None), worker.stderr
    assert "misconfigured" in worker.stderr
    assert "at start; stopping" in worker.stderr
    assert "starting a new one" not in worker.stderr


def _importing_slowly(
    store: Store, workers: list[WorkerProcess], importers: int, *options: str, **env: str
) -> WorkerProcess:
    """``sitq worker`` importing a slow task module (cli_slow_import), once
    ``importers`` processes are inside that import."""
    markers = store.tmp / "importing"
    markers.mkdir()
    worker = WorkerProcess(
        "--backend",
        store.url,
        "--import",
        "cli_slow_import",
        *options,
        env=_env(SITQ_TEST_IMPORT_MARKERS=str(markers), **env),
    )
    workers.append(worker)
    wait_for(lambda: len(list(markers.iterdir())) == importers, "the imports to start")
    return worker


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_worker_starts_exits_0(
    sqlite_store: Store, workers: list[WorkerProcess], signum: int
) -> None:
    # Before the worker sets its handlers (here: importing a slow task module), SIGINT
    # printed click's "Aborted!" and exited 1, SIGTERM killed it silently (143).
    worker = _importing_slowly(sqlite_store, workers, 1)
    worker.signal(signum)
    assert worker.wait() == 0, worker.stderr
    assert f"{signal.Signals(signum).name} received before the worker started" in worker.stderr


def test_a_signal_while_the_supervisors_workers_start_stops_them_all_cleanly(
    sqlite_store: Store, workers: list[WorkerProcess]
) -> None:
    worker = _importing_slowly(
        sqlite_store, workers, 3, "--processes", "3", SITQ_TEST_SLOW_IN_CHILDREN="1"
    )
    # Ctrl-C: forwarded to children still starting, it failed them with exit 1.
    worker.signal(signal.SIGINT)
    assert worker.wait() == 0, worker.stderr
    assert worker.stderr.count("SIGTERM received before the worker started") == 3


def test_inspecting_an_sqlite_database_of_something_else_leaves_it_alone(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
        conn.commit()
    result = sitq("queues", "-b", f"sqlite:///{other}")
    assert result.returncode == 1
    assert "without sitq's tables" in result.stderr
    with contextlib.closing(sqlite3.connect(other)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
    assert (tables, mode) == ({"users"}, "delete"), "inspection turned it into a sitq database"


def test_show_prints_a_result_of_a_type_from_the_current_directory(sqlite_store: Store) -> None:
    task_id = sqlite_store.clients[0].enqueue(cli_tasks.point, 3)
    ran = sitq("worker", "-b", sqlite_store.url, "--burst", "-i", "cli_tasks")
    assert ran.returncode == 0, ran.stderr
    # The console script, not `python -m`: only the latter put the current directory
    # on sys.path by itself.
    script = Path(sys.executable).parent / "sitq"
    shown = subprocess.run(
        [str(script), "tasks", "show", task_id, "--result", "-b", sqlite_store.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS_DIR,
        env=_env(),
    )
    assert shown.returncode == 0, shown.stderr
    assert "Point(3)" in shown.stdout, shown.stdout


def test_show_prints_the_task_when_its_value_has_no_repr(sqlite_store: Store) -> None:
    # repr() of the value raised, and the command exited 3 printing nothing of the task.
    task_id = sqlite_store.clients[0].enqueue(cli_tasks.huge_int)
    ran = sitq("worker", "-b", sqlite_store.url, "--burst", "-i", "cli_tasks")
    assert ran.returncode == 0, ran.stderr
    for extra in ([], ["--json"]):
        shown = sitq("tasks", "show", task_id, "--result", *extra, "-b", sqlite_store.url)
        assert shown.returncode == 0, shown.stderr
        assert task_id in shown.stdout and "success" in shown.stdout
        assert "whose repr() failed" in shown.stdout, shown.stdout


def test_postgres_urls_take_any_case_of_scheme_and_their_own_connect_timeout(
    pg_schema: str,
) -> None:
    url = POSTGRES_DSN.replace("postgresql://", "PostgreSQL://", 1)
    assert url != POSTGRES_DSN
    migrated = sitq("migrate", "-b", f"{url}?schema={pg_schema}")
    assert migrated.returncode == 0, migrated.stderr
    # A bad connect_timeout of the URL's own: the server's words at once, not a
    # 10-second wait for the pool (the check used to override it with its own).
    bad = sitq("queues", "-b", f"{POSTGRES_DSN}?connect_timeout=abc&schema={pg_schema}")
    assert bad.returncode == 3
    assert "connect_timeout" in bad.stderr


def test_a_file_that_is_not_a_database_is_one_line_exit_3(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database" * 100)
    result = sitq("queues", "-b", f"sqlite:///{garbage}")
    assert result.returncode == 3
    assert result.stderr.startswith("Error: ") and "not a database" in result.stderr
    assert result.stderr.count("\n") == 1
