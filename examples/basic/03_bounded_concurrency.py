"""Bounded concurrency: a worker runs at most max_concurrency tasks at once.

Run: python examples/basic/03_bounded_concurrency.py
"""

import asyncio
import tempfile
import time
from pathlib import Path

from sitq import SQLiteBackend, TaskQueue, Worker


async def slow_task(n: int) -> tuple[int, float, float]:
    started = time.monotonic()
    await asyncio.sleep(0.5)
    return n * n, started, time.monotonic()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of [start, end) spans that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "tasks.db")
        async with TaskQueue(backend=backend) as queue:
            ids = [await queue.enqueue(slow_task, n) for n in range(6)]
            print("Enqueued 6 tasks of 0.5 s each; worker max_concurrency=2")

            worker = Worker(backend, max_concurrency=2, poll_interval=0.1)
            started = time.perf_counter()
            await worker.start()
            values, spans = [], []
            for task_id in ids:
                result = await queue.get_result(task_id, timeout=20)
                assert result is not None and result.status == "success"
                value, start, end = queue.deserialize_result(result)
                values.append(value)
                spans.append((start, end))
            elapsed = time.perf_counter() - started
            await worker.stop()

            peak = most_at_once(spans)
            print(f"Results: {values}")
            print(f"At most {peak} tasks ran at once; all 6 took {elapsed:.1f} s (3 rounds of 2)")
            assert peak == 2


if __name__ == "__main__":
    asyncio.run(main())
