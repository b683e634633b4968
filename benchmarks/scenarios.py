"""The measurements, written once against a small adapter interface (:class:`System`)
so sitq and each competitor go through exactly the same steps."""

from __future__ import annotations

import asyncio
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from common import (
    Drain,
    Latencies,
    WorkerProcess,
    await_stamps,
    drain_from,
    latencies,
    note,
    wait_for_stamps,
)


class System(ABC):
    """One queue system under test. Every scenario starts from :meth:`fresh` storage."""

    name: str
    #: False skips the enqueue-to-start and eta scenarios (for variants of a system).
    latency_scenarios = True

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._runs = 0

    def new_path(self, stem: str) -> str:
        self._runs += 1
        return str(self.scratch / f"{self.name}-{stem}-{self._runs}")

    @abstractmethod
    async def fresh(self) -> None:
        """Start from empty storage (a new file, schema or queue)."""

    async def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`fresh` created."""

    @abstractmethod
    async def enqueue_noops(self, count: int) -> None:
        """Enqueue ``count`` no-op tasks one call at a time (the timed loop)."""

    async def enqueue_noop_batches(self, count: int, batch: int) -> bool:
        """Enqueue ``count`` no-op tasks ``batch`` at a time; False if unsupported."""
        return False

    @abstractmethod
    async def enqueue_stamps(self, path: str, count: int) -> None:
        """Set-up (not timed): ``count`` tasks that stamp ``path``, as fast as possible."""

    @abstractmethod
    async def enqueue_stamp(self, path: str, key: str, eta: float | None = None) -> float | None:
        """One task that stamps ``key`` into ``path``, due now or at ``eta`` (epoch s).

        Returns the due time actually used when the system cannot honour ``eta``
        exactly (pgqrs takes whole seconds of delay), else ``None``."""

    @abstractmethod
    async def add_far_future(self, count: int) -> None:
        """Set-up (not timed): ``count`` tasks due in a day."""

    @abstractmethod
    def worker(self, concurrency: int) -> WorkerProcess:
        """The system's worker process, default settings except ``concurrency``."""


@dataclass
class Settings:
    enqueue_count: int
    batch_count: int
    batch_size: int
    drain_count: int
    concurrencies: tuple[int, ...]
    backlog_count: int
    backlog_concurrency: int
    latency_samples: int
    eta_samples: int
    eta_spread: float
    drain_timeout: float
    #: Enqueue and plain-drain runs per system; the table shows the median run.
    repeats: int


FULL = Settings(
    enqueue_count=5_000,
    batch_count=20_000,
    batch_size=1_000,
    drain_count=5_000,
    concurrencies=(1, 8),
    backlog_count=200_000,
    backlog_concurrency=8,
    latency_samples=30,
    eta_samples=40,
    eta_spread=3.0,
    drain_timeout=30.0,
    repeats=3,
)
QUICK = Settings(
    enqueue_count=1_000,
    batch_count=5_000,
    batch_size=1_000,
    drain_count=1_000,
    concurrencies=(8,),
    backlog_count=20_000,
    backlog_concurrency=8,
    latency_samples=12,
    eta_samples=20,
    eta_spread=2.0,
    drain_timeout=15.0,
    repeats=1,
)


async def enqueue_rate(system: System, count: int) -> float:
    await system.fresh()
    try:
        started = time.perf_counter()
        await system.enqueue_noops(count)
        return count / (time.perf_counter() - started)
    finally:
        await system.cleanup()


async def batch_rate(system: System, count: int, batch: int) -> float | None:
    await system.fresh()
    try:
        started = time.perf_counter()
        if not await system.enqueue_noop_batches(count, batch):
            return None
        return count / (time.perf_counter() - started)
    finally:
        await system.cleanup()


async def drain(
    system: System, count: int, concurrency: int, timeout: float, backlog: int = 0
) -> Drain:
    """Enqueue ``count`` tasks (after ``backlog`` far-future ones), then start one worker
    process and time from its first completion to its last."""
    await system.fresh()
    try:
        if backlog:
            started = time.perf_counter()
            await system.add_far_future(backlog)
            note(
                f"{system.name}: {backlog} far-future tasks in {time.perf_counter() - started:.1f}s"
            )
        path = system.new_path("drain")
        await system.enqueue_stamps(path, count)
        with system.worker(concurrency) as worker:
            done = await asyncio.to_thread(wait_for_stamps, path, count, timeout)
            worker.check_alive()
        result = drain_from(path, count)
        note(
            f"{system.name}: drained {done}/{count} at {result.rate:,.0f}/s "
            f"(concurrency {concurrency}, backlog {backlog})"
        )
        return result
    finally:
        await system.cleanup()


async def _warm_up(system: System, path: str) -> None:
    """Wait for the worker to run one task, so it is up; then let it go idle."""
    await system.enqueue_stamp(path, "warm-up")
    if await await_stamps(path, 1, timeout=30.0) < 1:
        raise RuntimeError(f"{system.name}: the worker never ran its warm-up task")
    await asyncio.sleep(1.0)


async def start_latency(system: System, samples: int) -> Latencies:
    """Enqueue-to-start with an idle worker already running: one task at a time, each
    after a random 0.1-0.5 s pause once the previous one started."""
    await system.fresh()
    try:
        path = system.new_path("latency")
        reference: dict[str, float] = {}
        with system.worker(1) as worker:
            await _warm_up(system, path)
            for index in range(samples):
                await asyncio.sleep(random.uniform(0.1, 0.5))
                key = f"s{index}"
                reference[key] = time.time()
                await system.enqueue_stamp(path, key)
                await await_stamps(path, index + 2, timeout=15.0)
            worker.check_alive()
        return latencies(path, reference)
    finally:
        await system.cleanup()


async def eta_lateness(system: System, samples: int, spread: float) -> Latencies:
    """Tasks due 1.5 s to 1.5 s + ``spread`` from now, enqueued up front while an idle
    worker with default settings runs; lateness = start - eta."""
    await system.fresh()
    try:
        path = system.new_path("eta")
        reference: dict[str, float] = {}
        with system.worker(1) as worker:
            await _warm_up(system, path)
            base = time.time() + 1.5
            for index in range(samples):
                key = f"e{index}"
                reference[key] = base + spread * index / samples + random.uniform(0, 0.01)
                used = await system.enqueue_stamp(path, key, eta=reference[key])
                if used is not None:
                    reference[key] = used
            await await_stamps(path, samples + 1, timeout=spread + 15.0, pause=0.05)
            worker.check_alive()
        return latencies(path, reference)
    finally:
        await system.cleanup()
