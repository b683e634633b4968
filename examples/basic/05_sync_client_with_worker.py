"""Sync client: enqueue from blocking code while a worker runs on the same SQLite file.

Run: python examples/basic/05_sync_client_with_worker.py
"""

import asyncio
import tempfile
import threading
from pathlib import Path

from sitq import SQLiteBackend, SyncTaskQueue, Worker


def multiply(a: int, b: int) -> int:
    return a * b


def run_worker(backend: SQLiteBackend, stop: threading.Event) -> None:
    async def serve() -> None:
        worker = Worker(backend, poll_interval=0.1)
        await worker.start()
        await asyncio.to_thread(stop.wait)
        await worker.stop()

    asyncio.run(serve())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "tasks.db")
        stop = threading.Event()
        worker_thread = threading.Thread(target=run_worker, args=(backend, stop))
        worker_thread.start()
        print("Async worker running in a background thread")

        with SyncTaskQueue(backend) as queue:
            task_ids = [queue.enqueue(multiply, n, 10) for n in range(1, 4)]
            print(f"Enqueued {len(task_ids)} tasks from plain synchronous code")
            for task_id in task_ids:
                result = queue.get_result(task_id, timeout=10)
                assert result is not None and result.status == "success"
                print(f"Task {task_id[-8:]}: {queue.deserialize_result(result)}")

        stop.set()
        worker_thread.join()
        print("Worker stopped")


if __name__ == "__main__":
    main()
