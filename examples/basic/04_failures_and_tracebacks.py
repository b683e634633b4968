"""Failures: a task's exception is recorded with its full traceback; the worker goes on.

Run: python examples/basic/04_failures_and_tracebacks.py
"""

import asyncio
import tempfile
from pathlib import Path

from sitq import SQLiteBackend, TaskQueue, Worker


def divide(a: float, b: float) -> float:
    return a / b


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "tasks.db")
        async with TaskQueue(backend=backend) as queue:
            bad_id = await queue.enqueue(divide, 1, 0)
            good_id = await queue.enqueue(divide, 10, 4)

            worker = Worker(backend, poll_interval=0.1)
            await worker.start()

            failed = await queue.get_result(bad_id, timeout=10)
            assert failed is not None and failed.status == "failed"
            print(f"divide(1, 0): status={failed.status}")
            print(f"  error: {failed.error}")
            print("  traceback:")
            for line in (failed.traceback or "").rstrip().splitlines():
                print(f"    {line}")

            ok = await queue.get_result(good_id, timeout=10)
            assert ok is not None and ok.status == "success"
            print(f"divide(10, 4): status={ok.status} value={queue.deserialize_result(ok)}")
            print("The failure did not stop the worker.")

            await worker.stop()


if __name__ == "__main__":
    asyncio.run(main())
