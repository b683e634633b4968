"""Task functions for the multi-process tests, importable by worker subprocesses.

The counting primitives are the PostgreSQL tests' (``pg_tasks``): each execution
appends ``"<task_no> <pid>"`` to a log file with one ``O_APPEND`` write, atomic for
short lines, so the test counts runs without trusting the database under test.
"""

from __future__ import annotations

import os
import signal
import time

from pg_tasks import read_counts, record, record_slowly

__all__ = [
    "kill_own_worker",
    "read_counts",
    "read_pids",
    "record",
    "record_slowly",
    "start_then_wait",
]


def kill_own_worker(started_log: str, task_no: int) -> None:
    """Record the start, then SIGKILL the worker process running it (a poison task)."""
    record(started_log, task_no)
    os.kill(os.getpid(), signal.SIGKILL)


def start_then_wait(started_log: str, done_log: str, task_no: int, marker: str) -> int:
    """Record the start, block until ``marker`` exists, then record the completion.

    A worker killed while this blocks leaves a start without a completion.
    """
    record(started_log, task_no)
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            raise TimeoutError(f"marker {marker} never appeared")
        time.sleep(0.01)
    return record(done_log, task_no)


def read_pids(path: str) -> dict[int, set[int]]:
    """Which process ids recorded each task number."""
    pids: dict[int, set[int]] = {}
    try:
        with open(path) as handle:
            for line in handle:
                number, pid = (int(field) for field in line.split())
                pids.setdefault(number, set()).add(pid)
    except FileNotFoundError:
        pass
    return pids
