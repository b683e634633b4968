"""Real worker processes sharing one SQLite file.

Each worker is a separate Python process (``proc_worker.py``). Tasks record every run
in a log file with one ``O_APPEND`` write (``proc_tasks``), so the tests count
executions without trusting the database under test, and cross-check the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import proc_tasks
from helpers import wait_until
from sitq import SQLiteBackend, Task, TaskQueue, TaskStatus
from sitq.worker import MAX_LOST_RUNS

WORKER_SCRIPT = Path(__file__).with_name("proc_worker.py")

Process = asyncio.subprocess.Process


class Workers:
    """Worker processes on one SQLite file, all stopped (or killed) at the end."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.procs: list[Process] = []

    async def start(
        self, count: int, *, concurrency: int, lease: float, poll: float = 0.1
    ) -> list[Process]:
        started = await asyncio.gather(
            *(self._start_one(concurrency, lease, poll) for _ in range(count))
        )
        return list(started)

    async def _start_one(self, concurrency: int, lease: float, poll: float) -> Process:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        args = [str(WORKER_SCRIPT), str(self.db), str(concurrency), str(lease), str(poll)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=asyncio.subprocess.PIPE, env=env
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.split() == [b"ready", str(proc.pid).encode()], line
        return proc

    def check_alive(self, *, except_: Process | None = None) -> None:
        for proc in self.procs:
            if proc is not except_ and proc.returncode is not None:
                raise AssertionError(f"worker {proc.pid} exited with {proc.returncode}")

    async def stop(self) -> list[int]:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes: list[int] = []
        for proc in self.procs:
            try:
                codes.append(await asyncio.wait_for(proc.wait(), 20))
            except TimeoutError:
                proc.kill()
                codes.append(await proc.wait())
        return codes


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "shared.db"


@pytest.fixture
async def workers(db: Path) -> AsyncIterator[Workers]:
    group = Workers(db)
    try:
        yield group
    finally:
        await group.stop()


@pytest.fixture
async def queue(db: Path) -> AsyncIterator[TaskQueue]:
    async with TaskQueue(SQLiteBackend(db)) as client:
        yield client


async def all_tasks(queue: TaskQueue) -> list[Task]:
    return await queue.list_tasks(limit=10_000)


async def succeeded(queue: TaskQueue) -> int:
    return (await queue.counts())["success"]


async def test_four_processes_run_each_of_400_tasks_exactly_once(
    queue: TaskQueue, workers: Workers, tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    total = 400
    procs = await workers.start(4, concurrency=4, lease=5.0)
    await queue.enqueue_many([(proc_tasks.record_slowly, (log, n, 0.01)) for n in range(total)])

    def all_ran() -> bool:
        workers.check_alive()
        return len(proc_tasks.read_counts(log)) >= total

    await wait_until(all_ran, timeout=60, interval=0.05)

    async def all_recorded() -> bool:
        return await succeeded(queue) == total

    # A task writes the log just before its worker commits the outcome.
    await wait_until(all_recorded, timeout=10, interval=0.05)
    assert await workers.stop() == [0, 0, 0, 0]

    counts = proc_tasks.read_counts(log)
    assert sorted(counts) == list(range(total))
    assert set(counts.values()) == {1}, "some task ran twice"
    ran_in = {pid for pids in proc_tasks.read_pids(log).values() for pid in pids}
    assert ran_in <= {proc.pid for proc in procs}
    assert len(ran_in) == 4, "not every process took part"
    tasks = await all_tasks(queue)
    assert len(tasks) == total
    assert {(t.status, t.attempts) for t in tasks} == {(TaskStatus.SUCCESS, 1)}


async def test_a_killed_worker_loses_nothing_and_only_its_running_tasks_run_again(
    queue: TaskQueue, workers: Workers, tmp_path: Path
) -> None:
    started, done = str(tmp_path / "started.log"), str(tmp_path / "done.log")
    marker = tmp_path / "go"
    total, slots = 20, 4
    ids = await queue.enqueue_many(
        [(proc_tasks.start_then_wait, (started, done, n, str(marker))) for n in range(total)]
    )
    (victim,) = await workers.start(1, concurrency=slots, lease=1.0)

    def victim_busy() -> bool:
        workers.check_alive()
        return len(proc_tasks.read_counts(started)) == slots

    # The victim holds exactly as many tasks as it has slots, all blocked mid-run.
    await wait_until(victim_busy, timeout=30)
    victim.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(victim.wait(), 10) == -signal.SIGKILL
    in_flight = set(proc_tasks.read_counts(started))
    assert len(in_flight) == slots
    assert proc_tasks.read_counts(done) == {}
    statuses = {t.status for t in await all_tasks(queue)}
    assert statuses == {TaskStatus.RUNNING, TaskStatus.PENDING}

    marker.touch()
    (rescuer,) = await workers.start(1, concurrency=slots, lease=1.0)

    def all_done() -> bool:
        workers.check_alive(except_=victim)
        return len(proc_tasks.read_counts(done)) >= total

    # The victim's tasks come back once their 1 s leases run out.
    await wait_until(all_done, timeout=30, interval=0.02)

    async def all_recorded() -> bool:
        return await succeeded(queue) == total

    await wait_until(all_recorded, timeout=10, interval=0.02)

    starts = proc_tasks.read_counts(started)
    assert sorted(starts) == list(range(total))
    assert {n for n, seen in starts.items() if seen > 1} == in_flight
    assert set(starts.values()) == {1, 2}
    assert set(proc_tasks.read_counts(done).values()) == {1}
    assert set().union(*proc_tasks.read_pids(done).values()) == {rescuer.pid}
    attempts = {t.id: t.attempts for t in await all_tasks(queue)}
    rerun_ids = {ids[n] for n in in_flight}
    assert {task_id for task_id, count in attempts.items() if count == 2} == rerun_ids
    assert {count for task_id, count in attempts.items() if task_id not in rerun_ids} == {1}


async def test_worker_run_stops_at_once_on_a_second_signal(
    queue: TaskQueue, workers: Workers, tmp_path: Path
) -> None:
    # The first Ctrl-C waits for running tasks; a second one did nothing, leaving
    # only SIGKILL to end a worker stuck on a long task.
    started, done = str(tmp_path / "started.log"), str(tmp_path / "done.log")
    task_id = await queue.enqueue(
        proc_tasks.start_then_wait, started, done, 0, str(tmp_path / "never")
    )
    (worker,) = await workers.start(1, concurrency=1, lease=30.0)
    await wait_until(lambda: proc_tasks.read_counts(started) == {0: 1}, timeout=30)
    # Signals sent back to back merge into one, so send until it exits: the first
    # lets the blocked task run on (it would for a minute), a second ends it.
    deadline = time.monotonic() + 20
    while worker.returncode is None:
        assert time.monotonic() < deadline, "repeated SIGINTs did not stop the worker"
        worker.send_signal(signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.wait(), 0.5)
    assert worker.returncode == -signal.SIGINT  # an uncaught KeyboardInterrupt's exit
    task = await queue.get_task(task_id)
    assert task is not None and task.status is TaskStatus.RUNNING  # its lease holds it


async def test_a_task_longer_than_the_visibility_timeout_runs_once(
    queue: TaskQueue, workers: Workers, tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    # Two workers with two slots each for three tasks: one worker always has a free
    # slot and keeps polling, so a lease that were not renewed would be taken over.
    await workers.start(2, concurrency=2, lease=0.5, poll=0.05)
    ids = await queue.enqueue_many([(proc_tasks.record_slowly, (log, n, 2.0)) for n in range(3)])

    def all_ran() -> bool:
        workers.check_alive()
        counts = proc_tasks.read_counts(log)
        assert set(counts.values()) <= {1}, f"a lease ran out and a task ran again: {counts}"
        return len(counts) >= 3

    await wait_until(all_ran, timeout=30, interval=0.05)

    async def all_recorded() -> bool:
        assert all_ran()
        return await succeeded(queue) == 3

    await wait_until(all_recorded, timeout=10, interval=0.05)
    assert await workers.stop() == [0, 0]
    assert proc_tasks.read_counts(log) == {0: 1, 1: 1, 2: 1}
    for task_id in ids:
        result = await queue.get_result(task_id, timeout=0)
        assert result is not None and result.status == "success"
        assert result.attempts == 1, "the lease ran out and the task was claimed again"


async def test_a_task_that_kills_its_worker_every_time_fails_after_the_lost_runs_allowed(
    queue: TaskQueue, workers: Workers, tmp_path: Path
) -> None:
    started, done = str(tmp_path / "started.log"), str(tmp_path / "done.log")
    poison = await queue.enqueue(proc_tasks.kill_own_worker, started, 0)
    fine = await queue.enqueue_many([(proc_tasks.record, (done, n)) for n in range(5)])
    for _ in range(MAX_LOST_RUNS):
        # Each worker takes the poison task once the last one's lease runs out, and dies.
        (worker,) = await workers.start(1, concurrency=1, lease=0.5)
        assert await asyncio.wait_for(worker.wait(), 30) == -signal.SIGKILL
    (survivor,) = await workers.start(1, concurrency=1, lease=0.5)
    result = await queue.get_result(poison, timeout=30)
    assert result is not None and result.status == "failed"
    assert result.error is not None and result.error.startswith("WorkerLost:")
    for task_id in fine:
        outcome = await queue.get_result(task_id, timeout=30)
        assert outcome is not None and outcome.status == "success"
    assert survivor.returncode is None  # it failed the task instead of running it
    assert proc_tasks.read_counts(started) == {0: MAX_LOST_RUNS}
    assert proc_tasks.read_counts(done) == dict.fromkeys(range(5), 1)
