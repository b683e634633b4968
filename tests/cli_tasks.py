"""Task functions for the CLI tests: importable by a worker subprocess (``--import``)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def add(a: int, b: int) -> int:
    return a + b


def boom(message: str) -> None:
    raise RuntimeError(message)


def whoami() -> int:
    return os.getpid()


def slow(started: str, seconds: float) -> str:
    """Mark ``started`` (a file path) as soon as it runs, then take ``seconds``."""
    Path(started).write_text(str(os.getpid()))
    time.sleep(seconds)
    return "slept"
