"""Benchmarks: sitq against its competitors, measured in the same run.

usage: python benchmarks/run.py [--quick] [--only sqlite|postgres] [--dsn DSN]

Prints one markdown table per part (progress goes to stderr). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import floors
import scenarios
from common import Drain, percentile
from report import Metric, Results, Target, at_least, below, ratio_to, table
from scenarios import Settings, System

T = TypeVar("T")
HUEYS = ("huey",)
#: A scenario is repeated (for the median) only while its runs took less than this.
REPEAT_BUDGET_SECONDS = 8.0
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def metrics_for(settings: Settings) -> dict[str, Metric]:
    found = {
        "enqueue": Metric("enqueue", "enqueue, one at a time", "/s"),
        "batch": Metric("batch", f"enqueue in batches of {settings.batch_size:,}", "/s"),
        "start_p50": Metric("start_p50", "enqueue-to-start p50 (idle worker)", "ms", False),
        "start_p99": Metric("start_p99", "enqueue-to-start p99 (idle worker)", "ms", False),
        "eta_p50": Metric("eta_p50", "eta lateness p50", "ms", False),
        "eta_p99": Metric("eta_p99", "eta lateness p99", "ms", False),
    }
    for concurrency in settings.concurrencies:
        found[f"drain_{concurrency}"] = Metric(
            f"drain_{concurrency}",
            f"drain {settings.drain_count:,} tasks, 1 process, concurrency {concurrency}",
            "/s",
        )
    c = settings.backlog_concurrency
    found["backlog"] = Metric(
        "backlog",
        f"drain with {settings.backlog_count:,} far-future tasks, concurrency {c}",
        "/s",
    )
    found["backlog_pct"] = Metric("backlog_pct", "backlog drain as % of plain drain", "%")
    return found


async def measure(systems: list[System], settings: Settings, targets: dict[str, Target]) -> Results:
    results = Results([system.name for system in systems])
    metric = metrics_for(settings)

    def register(key: str) -> Metric:
        return results.metric(metric[key], targets.get(key))

    for key in ["enqueue", "batch"] + [f"drain_{c}" for c in settings.concurrencies]:
        register(key)
    for key in ["backlog", "backlog_pct", "start_p50", "start_p99", "eta_p50", "eta_p99"]:
        register(key)

    def put_median_drains(key: str, drains: dict[str, list[Drain]], note_done: str) -> None:
        for name, runs in drains.items():
            drained = median_of(runs)
            note = f"{drained.completed:,} {note_done}" if drained.partial else ""
            results.put(name, metric[key], drained.rate, note)

    progress("enqueue, one at a time")
    count = settings.enqueue_count
    for name, rates in (
        await in_turns(systems, settings.repeats, lambda s: scenarios.enqueue_rate(s, count))
    ).items():
        results.put(name, metric["enqueue"], percentile(rates, 50))

    progress("enqueue in batches")
    for name, batches in (
        await in_turns(
            systems,
            settings.repeats,
            lambda s: scenarios.batch_rate(s, settings.batch_count, settings.batch_size),
        )
    ).items():
        batch = None if batches[0] is None else percentile([b or 0.0 for b in batches], 50)
        results.put(name, metric["batch"], batch, "" if batch else "no batch API")

    plain: dict[int, dict[str, list[Drain]]] = {}
    at = settings.backlog_concurrency
    for concurrency in sorted({*settings.concurrencies, at}):
        progress(f"drain, concurrency {concurrency}")
        plain[concurrency] = await in_turns(
            systems,
            settings.repeats,
            functools.partial(drain, settings=settings, concurrency=concurrency),
        )
        if concurrency in settings.concurrencies:
            put_median_drains(f"drain_{concurrency}", plain[concurrency], "done in time limit")

    progress(f"drain with {settings.backlog_count:,} far-future tasks")
    backlog = await in_turns(
        systems,
        settings.repeats,
        functools.partial(drain, settings=settings, concurrency=at, backlog=settings.backlog_count),
    )
    put_median_drains("backlog", backlog, f"done in {settings.drain_timeout:.0f}s")
    for name, runs in backlog.items():
        pct = 100 * median_of(runs).rate / median_of(plain[at][name]).rate
        results.put(name, metric["backlog_pct"], pct)

    for system in systems:
        if not system.latency_scenarios:
            continue
        progress(f"latencies of {system.name}")
        started = await scenarios.start_latency(system, settings.latency_samples)
        missing = f"{started.missing} never started" if started.missing else ""
        results.put(system.name, metric["start_p50"], 1000 * started.p(50), missing)
        results.put(system.name, metric["start_p99"], 1000 * started.p(99), missing)

        late = await scenarios.eta_lateness(system, settings.eta_samples, settings.eta_spread)
        missing = f"{late.missing} never started" if late.missing else ""
        results.put(system.name, metric["eta_p50"], 1000 * late.p(50), missing)
        results.put(system.name, metric["eta_p99"], 1000 * late.p(99), missing)
    return results


def progress(scenario: str) -> None:
    print(f"== {scenario}", file=sys.stderr, flush=True)


async def in_turns(
    systems: list[System], repeats: int, run: Callable[[System], Awaitable[T]]
) -> dict[str, list[T]]:
    """Up to ``repeats`` runs of one scenario for each system, the systems taking
    turns (sitq, huey, sitq, huey, ...): a shared machine's speed drifts over minutes,
    so each ratio compares runs made close together, never one system's runs with
    another's made a whole part later. A system runs again only while its runs so far
    took less than ``REPEAT_BUDGET_SECONDS``: a slow system's one run is long and
    steady."""
    runs: dict[str, list[T]] = {system.name: [] for system in systems}
    spent = dict.fromkeys(runs, 0.0)
    for turn in range(repeats):
        for system in systems:
            if turn and spent[system.name] >= REPEAT_BUDGET_SECONDS:
                continue
            started = time.monotonic()
            runs[system.name].append(await run(system))
            spent[system.name] += time.monotonic() - started
    return runs


async def drain(system: System, settings: Settings, concurrency: int, backlog: int = 0) -> Drain:
    return await scenarios.drain(
        system, settings.drain_count, concurrency, settings.drain_timeout, backlog
    )


def median_of(drains: list[Drain]) -> Drain:
    return sorted(drains, key=lambda run: run.rate)[len(drains) // 2]


def sqlite_targets() -> dict[str, Target]:
    return {
        # Checked against huey's default settings (the baseline); the
        # fsync=False column shows how fast huey gets when made less durable.
        "enqueue": Target(">= 2x huey", ratio_to(HUEYS, 2.0)),
        "drain_1": Target(">= 3x huey", ratio_to(HUEYS, 3.0)),
        "drain_8": Target(">= 3x huey", ratio_to(HUEYS, 3.0)),
        "eta_p99": Target("< 20 ms", below(20.0)),
        "backlog_pct": Target(">= 90%", at_least(90.0)),
    }


def postgres_targets() -> dict[str, Target]:
    return {
        "enqueue": Target(">= 2x pgqrs", ratio_to(("pgqrs",), 2.0)),
        "batch": Target(">= pgqrs", ratio_to(("pgqrs",), 1.0)),
        "drain_1": Target(">= 2x pgqrs", ratio_to(("pgqrs",), 2.0)),
        "drain_8": Target(">= 2x pgqrs", ratio_to(("pgqrs",), 2.0)),
        "start_p99": Target("< 10 ms", below(10.0)),
        "eta_p99": Target("< 20 ms", below(20.0)),
        "backlog_pct": Target(">= 90%", at_least(90.0)),
    }


def describe(settings: Settings, label: str) -> str:
    return (
        f"_{label}: measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({platform.machine()}, {_cpus()} CPUs, Python {platform.python_version()}); "
        f"worker/consumer in its own process; rates are the median of up to "
        f"{settings.repeats} run(s); latency samples: "
        f"{settings.latency_samples} start, {settings.eta_samples} eta._"
    )


def _cpus() -> str:
    import os

    return str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (about 1 min)")
    parser.add_argument("--only", choices=["sqlite", "postgres"], help="run one part")
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL server for part 2")
    args = parser.parse_args()
    settings = scenarios.QUICK if args.quick else scenarios.FULL
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sitq-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        if args.only in (None, "sqlite"):
            import sqlite_bench

            results = await measure(sqlite_bench.systems(scratch), settings, sqlite_targets())
            hops = await floors.thread_round_trips(settings.enqueue_count)
            huey_drain = results.values.get("drain_1", {}).get("huey")
            print("\n## SQLite: sitq (SQLiteBackend) vs huey (SqliteHuey)\n")
            print(describe(settings, "SQLite"))
            print()
            print(table(results))
            print()
            print(
                floors.rate_table(
                    [
                        (
                            "a sync no-op run in a thread from the event loop, one at a time",
                            hops,
                            "huey, drain at concurrency 1",
                            huey_drain,
                        )
                    ]
                )
            )
            print(flush=True)
        if args.only in (None, "postgres"):
            import pg_bench

            async with pg_bench.scratch_database(args.dsn) as dsn:
                systems = pg_bench.systems(scratch, dsn)
                results = await measure(systems, settings, postgres_targets())
                inserts = await floors.postgres_single_inserts(dsn, settings.enqueue_count)
                relaxed = await pg_bench.async_commit_enqueue_rate(
                    scratch, dsn, settings.enqueue_count
                )
            pgqrs_enqueue = results.values.get("enqueue", {}).get("pgqrs")
            print("\n## PostgreSQL: sitq (PostgresBackend) vs procrastinate vs pgqrs\n")
            print(describe(settings, "PostgreSQL"))
            print()
            print(table(results))
            print()
            print(
                floors.rate_table(
                    [
                        (
                            "one-row INSERT per autocommit statement, asyncio psycopg",
                            inserts,
                            "pgqrs, enqueue one at a time",
                            pgqrs_enqueue,
                        )
                    ]
                )
            )
            print()
            print(
                floors.rate_table(
                    [
                        (
                            "sitq enqueue one at a time, `synchronous_commit=off` in the DSN",
                            relaxed,
                            "pgqrs, enqueue one at a time",
                            pgqrs_enqueue,
                        )
                    ],
                    kind="setting (not sitq's default)",
                )
            )
            print(flush=True)
    print(f"(total {time.monotonic() - began:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
