"""Delayed execution: tasks with an eta run only once their time has come.

Run: python examples/basic/02_eta_delayed_execution.py
"""

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sitq import SQLiteBackend, TaskQueue, Worker


def task_func(label: str) -> str:
    return f"{label} ran at {datetime.now(UTC):%H:%M:%S.%f}"


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "tasks.db")
        async with TaskQueue(backend=backend) as queue:
            now = datetime.now(UTC)
            etas = {
                label: now + timedelta(seconds=n)
                for n, label in enumerate(["First task", "Second task", "Third task"], start=1)
            }
            ids = {
                label: await queue.enqueue(task_func, label, eta=eta) for label, eta in etas.items()
            }
            print(f"Enqueued 3 tasks at {now:%H:%M:%S}, due in 1, 2 and 3 seconds (UTC etas)")

            worker = Worker(backend, poll_interval=0.5)
            await worker.start()

            for label, task_id in ids.items():
                result = await queue.get_result(task_id, timeout=10)
                assert result is not None and result.status == "success"
                assert result.started_at is not None
                late = (result.started_at - etas[label]).total_seconds()
                assert late >= 0, "a task never runs before its eta"
                print(f"{queue.deserialize_result(result)} ({late * 1000:.0f} ms after its eta)")

            await worker.stop()


if __name__ == "__main__":
    asyncio.run(main())
