"""Run one sitq worker process until SIGTERM (started by the benchmarks, not by hand).

usage: sitq_worker.py BACKEND_URL [--concurrency N] [--poll SECONDS] [--schema NAME]

BACKEND_URL is ``sqlite:////abs/path.db`` or a PostgreSQL DSN. Without ``--poll`` the
worker keeps sitq's default poll interval.
"""

from __future__ import annotations

import argparse

from sitq import Worker
from sitq.backends.base import Backend


def backend_for(url: str, schema: str | None) -> Backend:
    if url.startswith("sqlite:"):
        from sitq.backends.sqlite import SQLiteBackend

        return SQLiteBackend(url[len("sqlite://") :])
    from sitq.backends.postgres import PostgresBackend

    return PostgresBackend(url, schema=schema)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--poll", type=float, default=None)
    parser.add_argument("--schema", default=None)
    args = parser.parse_args()
    options = {} if args.poll is None else {"poll_interval": args.poll}
    worker = Worker(backend_for(args.url, args.schema), max_concurrency=args.concurrency, **options)
    worker.run()


if __name__ == "__main__":
    main()
