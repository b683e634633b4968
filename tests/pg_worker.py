"""A worker process for the PostgreSQL scale tests: ``python pg_worker.py DSN SCHEMA N LEASE``.

Runs until SIGTERM (or is SIGKILLed by the test). Started as a script, so this
directory (with ``pg_tasks``) is on ``sys.path`` for unpickling the tasks. The
worker loop itself is ``proc_worker.run_worker``, shared with the SQLite process tests.
"""

from __future__ import annotations

import sys

from proc_worker import run_worker
from sitq.backends.postgres import PostgresBackend


def main() -> None:
    dsn, schema, concurrency, lease = sys.argv[1:5]
    backend = PostgresBackend(dsn, schema=schema, max_size=4)
    run_worker(backend, int(concurrency), float(lease), poll=0.5)


if __name__ == "__main__":
    main()
