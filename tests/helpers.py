"""Helpers for tests: waiting on conditions with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import warnings
from collections.abc import Callable


async def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.005
) -> None:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def in_forked_child(work: Callable[[], int], timeout: float = 10.0) -> int:
    """Run ``work()`` in a forked child and return the code (0-255) it returns; fail
    if the child hangs. The child never returns into pytest."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        pid = os.fork()
    if pid == 0:
        code = 255
        try:
            code = work()
        finally:
            os.write(write, bytes([code]))
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        assert ready, "the forked child hung"
        return os.read(read, 1)[0]
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def remove_sqlite_files(path: object) -> None:
    """Delete an SQLite database with its -wal and -shm files, as an operator might."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}{suffix}")
