"""A worker process for the multi-process tests.

    python proc_worker.py DBPATH CONCURRENCY LEASE [POLL] [--burst]

Serves the SQLite file ``DBPATH`` until SIGTERM (or SIGKILL from the test), or with
``--burst`` until no due task is left. Prints ``ready <pid>`` once the backend is
open, so a test can wait for every worker before it enqueues. Started as a script, so
this directory (with ``proc_tasks``/``pg_tasks``) is on ``sys.path`` for unpickling.
``pg_worker.py`` runs the same :func:`run_worker` on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import sys

from sitq import SQLiteBackend, Worker
from sitq.backends.base import Backend


def run_worker(
    backend: Backend, concurrency: int, lease: float, poll: float = 0.5, burst: bool = False
) -> int:
    """Open ``backend``, announce readiness on stdout, then work; returns tasks run."""
    worker = Worker(
        backend,
        max_concurrency=concurrency,
        poll_interval=poll,
        visibility_timeout=lease,
        retention=None,
    )

    async def announce() -> None:
        await backend.open()
        await backend.close()

    asyncio.run(announce())
    print(f"ready {os.getpid()}", flush=True)
    return worker.run(burst=burst)


def main(argv: list[str]) -> None:
    burst = "--burst" in argv
    args = [arg for arg in argv if arg != "--burst"]
    path, concurrency, lease = args[:3]
    poll = float(args[3]) if len(args) > 3 else 0.5
    run_worker(SQLiteBackend(path), int(concurrency), float(lease), poll, burst)


if __name__ == "__main__":
    main(sys.argv[1:])
