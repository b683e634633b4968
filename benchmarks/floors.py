"""Floors: what the one step no library on top of the driver can skip costs here,
measured in the same run as the systems. A target that asks for more than its floor
allows shows up as such, instead of as a gap in sitq.

* A sync task run from an asyncio worker, one at a time, crosses to a thread and back
  (a wake-up each way); sitq's concurrency-1 drain of sync tasks pays that and a
  write transaction per task.
* A single durable enqueue on PostgreSQL from asyncio psycopg is at least one
  autocommit INSERT: a round trip and a WAL flush.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg


def _noop() -> None:
    return None


async def thread_round_trips(count: int) -> float:
    """No-op calls/s run in a thread from the event loop, awaited one at a time."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        await loop.run_in_executor(pool, _noop)  # the thread exists before timing
        started = time.perf_counter()
        for _ in range(count):
            await loop.run_in_executor(pool, _noop)
        return count / (time.perf_counter() - started)


async def postgres_single_inserts(dsn: str, count: int) -> float:
    """Rows/s, one INSERT per autocommit statement (prepared), with asyncio psycopg."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE floor_inserts (id bigserial PRIMARY KEY, v text)")
        try:
            insert = "INSERT INTO floor_inserts (v) VALUES (%s)"
            for _ in range(10):  # past psycopg's prepare threshold
                await conn.execute(insert, ("x",))
            started = time.perf_counter()
            for _ in range(count):
                await conn.execute(insert, ("x",))
            return count / (time.perf_counter() - started)
        finally:
            await conn.execute("DROP TABLE floor_inserts")


def rate_table(rows: list[tuple[str, float, str, float | None]], kind: str = "floor") -> str:
    """Rows of (``kind``, rate, compared with, that row's rate) as a markdown table."""
    lines = [f"| {kind} | rate | compared with | ratio |", "|---|---|---|---|"]
    for label, rate, other, other_rate in rows:
        ratio = "n/a" if not other_rate else f"{rate / other_rate:.2f}x"
        lines.append(f"| {label} | {rate:,.0f}/s | {other} | {ratio} |")
    return "\n".join(lines)
