"""A worker process for the PostgreSQL scale tests: ``python pg_worker.py DSN SCHEMA N``.

Runs until SIGTERM (or is SIGKILLed by the test). Started as a script, so this
directory (with ``pg_tasks``) is on ``sys.path`` for unpickling the tasks.
"""

from __future__ import annotations

import sys

from sitq import Worker
from sitq.backends.postgres import PostgresBackend


def main() -> None:
    dsn, schema, concurrency, lease = sys.argv[1:5]
    backend = PostgresBackend(dsn, schema=schema, max_size=4)
    worker = Worker(
        backend,
        max_concurrency=int(concurrency),
        poll_interval=0.5,
        visibility_timeout=float(lease),
        retention=None,
    )
    worker.run()


if __name__ == "__main__":
    main()
