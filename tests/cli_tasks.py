"""Task functions for the CLI tests: importable by a worker subprocess (``--import``)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def add(a: int, b: int) -> int:
    return a + b


def boom(message: str) -> None:
    raise RuntimeError(message)


def whoami() -> int:
    return os.getpid()


async def stubborn(started: str) -> None:
    """Mark ``started``, then run for ever, ignoring every cancellation."""
    with open(started, "w") as marker:  # noqa: ASYNC230 (a tiny write, once)
        marker.write(str(os.getpid()))
    while True:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass


def slow(started: str, seconds: float) -> str:
    """Mark ``started`` (a file path) as soon as it runs, then take ``seconds``."""
    Path(started).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "slept"


class Point:
    """A result of a type the inspecting process must import to print."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __repr__(self) -> str:
        return f"Point({self.x})"


def point(x: int) -> Point:
    return Point(x)


def huge_int() -> int:
    return 10**5000  # repr() refuses it: past Python's 4,300-digit limit
