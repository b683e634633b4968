"""procrastinate's side of the PostgreSQL benchmark: an App with the two tasks.

The worker process builds the same app from ``SITQ_BENCH_PROC_CONNINFO``.
"""

from __future__ import annotations

import os

from common import stamp as write_stamp
from procrastinate import App, PsycopgConnector


def make_app(conninfo: str) -> App:
    app = App(connector=PsycopgConnector(conninfo=conninfo))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    @app.task(name="stamp")
    async def stamp(path: str, key: str = "-") -> None:
        write_stamp(path, key)

    return app


def worker_main() -> None:
    """Run one procrastinate worker until SIGTERM (concurrency from argv[1])."""
    import asyncio
    import sys

    app = make_app(os.environ["SITQ_BENCH_PROC_CONNINFO"])

    async def work() -> None:
        async with app.open_async():
            await app.run_worker_async(concurrency=int(sys.argv[1]), install_signal_handlers=True)

    asyncio.run(work())


if __name__ == "__main__":
    worker_main()
