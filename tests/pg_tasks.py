"""Task functions for the PostgreSQL tests, importable by worker subprocesses.

Each task records its id with one ``O_APPEND`` write, which the kernel makes atomic
for short lines, so concurrent processes can count executions in one file.
"""

from __future__ import annotations

import asyncio
import os
import time


def record(path: str, task_no: int) -> int:
    line = f"{task_no} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return task_no


def record_slowly(path: str, task_no: int, seconds: float) -> int:
    time.sleep(seconds)
    return record(path, task_no)


async def noop() -> None:
    await asyncio.sleep(0)


def read_counts(path: str) -> dict[int, int]:
    """How many times each task number was recorded."""
    counts: dict[int, int] = {}
    try:
        with open(path) as handle:
            for line in handle:
                number = int(line.split()[0])
                counts[number] = counts.get(number, 0) + 1
    except FileNotFoundError:
        pass
    return counts
