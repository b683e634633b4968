"""Helpers shared by every benchmark: timing, percentiles, start stamps, worker processes.

Tasks in every system under test record when they start by appending a line
``<key> <time.time()>`` to a *stamp file* (see :func:`stamp`). The parent process reads
those files to compute drain rates (first to last completion) and latencies, so every
system is measured the same way, from outside, with the same clock.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable

# -- stamps (run inside the task, in the worker process) ------------------------------

_fds: dict[str, int] = {}
_fds_lock = threading.Lock()


def stamp(path: str, key: str = "-") -> None:
    """Append ``key`` and the current time to ``path``: one small O_APPEND write."""
    now = time.time()
    fd = _fds.get(path)
    if fd is None:
        with _fds_lock:
            fd = _fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                _fds[path] = fd
    os.write(fd, f"{key} {now!r}\n".encode())


def read_stamps(path: str | Path) -> list[tuple[str, float]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        key, _, moment = line.rpartition(" ")
        if key:
            rows.append((key, float(moment)))
    return rows


def count_lines(path: str | Path) -> int:
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_stamps(path: str | Path, count: int, timeout: float, pause: float = 0.02) -> int:
    """Block until ``path`` holds ``count`` stamps or ``timeout`` passes; return how many."""
    deadline = time.monotonic() + timeout
    seen = count_lines(path)
    while seen < count and time.monotonic() < deadline:
        time.sleep(pause)
        seen = count_lines(path)
    return seen


async def await_stamps(path: str | Path, count: int, timeout: float, pause: float = 0.002) -> int:
    """Async flavour of :func:`wait_for_stamps` with a finer poll (for latencies)."""
    import asyncio

    deadline = time.monotonic() + timeout
    seen = count_lines(path)
    while seen < count and time.monotonic() < deadline:
        await asyncio.sleep(pause)
        seen = count_lines(path)
    return seen


# -- statistics -----------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (``pct`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Drain:
    """Completions observed while a worker drained a queue."""

    expected: int
    times: list[float]

    @property
    def completed(self) -> int:
        return len(self.times)

    @property
    def rate(self) -> float:
        """Tasks per second from the first completion to the last."""
        if len(self.times) < 2:
            return math.nan
        span = max(self.times) - min(self.times)
        return (len(self.times) - 1) / span if span > 0 else math.nan

    @property
    def partial(self) -> bool:
        return self.completed < self.expected


def drain_from(path: str | Path, expected: int) -> Drain:
    return Drain(expected, [moment for _, moment in read_stamps(path)])


@dataclass
class Latencies:
    """Seconds between a reference time (enqueue or eta) and each task's start."""

    samples: list[float] = field(default_factory=list)
    missing: int = 0

    def p(self, pct: float) -> float:
        return percentile(self.samples, pct)


def latencies(path: str | Path, reference: dict[str, float]) -> Latencies:
    started = dict(read_stamps(path))
    result = Latencies()
    for key, moment in reference.items():
        if key in started:
            result.samples.append(started[key] - moment)
        else:
            result.missing += 1
    return result


# -- worker processes -----------------------------------------------------------------


class WorkerProcess:
    """A worker (or consumer) script from this folder, run in its own process."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.command = [PYTHON, str(HERE / script), *args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> WorkerProcess:
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        assert process.stderr is not None
        errors = process.stderr.read().decode(errors="replace")
        process.stderr.close()
        interesting = [line for line in errors.splitlines() if "Traceback" in line]
        if interesting:
            print(f"[{Path(self.command[1]).name} wrote errors]\n{errors[-3000:]}", file=sys.stderr)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.command[1]} exited early with {self.process.returncode}")


def note(message: str) -> None:
    """Progress on stderr, so stdout stays a clean table."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


def remove(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def noop() -> None:
    """The no-op task (sitq enqueues this module-level function by reference)."""


async def astamp(path: str, key: str = "-") -> None:
    """:func:`stamp` as a coroutine function, for workers that run async tasks inline."""
    stamp(path, key)


async def anoop() -> None:
    """The async no-op task."""
