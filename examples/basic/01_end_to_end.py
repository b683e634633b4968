"""End to end: enqueue a task, run it in a worker, read its result.

Run: python examples/basic/01_end_to_end.py
"""

import asyncio
import tempfile
from pathlib import Path

from sitq import SQLiteBackend, TaskQueue, Worker


async def greet(name: str) -> str:
    return f"Hello, {name}!"


def add(a: int, b: int) -> int:
    return a + b


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "tasks.db")
        async with TaskQueue(backend=backend) as queue:
            greet_id = await queue.enqueue(greet, "World")
            add_id = await queue.enqueue(add, 2, b=3)
            print(f"Enqueued tasks {greet_id[-8:]} (async) and {add_id[-8:]} (sync)")

            worker = Worker(backend)
            await worker.start()
            print("Worker started in the background")

            for task_id in (greet_id, add_id):
                result = await queue.get_result(task_id, timeout=10)
                assert result is not None and result.status == "success"
                value = queue.deserialize_result(result)
                print(f"Task {task_id[-8:]}: status={result.status} value={value!r}")

            await worker.stop()
            print("Worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
