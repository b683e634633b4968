"""Run one pgqrs consumer process until SIGTERM.

usage: pgqrs_worker.py CONCURRENCY   (DSN, schema and queue from SITQ_BENCH_PGQRS_*)

pgqrs is a library, not a worker: this process runs CONCURRENCY copies of its
consuming iterator (``store.consume_iter``, default poll interval), each stamping the
file named in a message and then archiving the message (pgqrs' acknowledgement).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pgqrs
from common import stamp


def config() -> Any:
    settings = pgqrs.Config(
        os.environ["SITQ_BENCH_PGQRS_DSN"], schema=os.environ["SITQ_BENCH_PGQRS_SCHEMA"]
    )
    # pgqrs throttles producers by default (1,000/s); measure the queue, not the throttle.
    settings.max_enqueue_per_second = None
    settings.max_enqueue_burst = None
    return settings


async def consume(store: Any, queue: str) -> None:
    messages = store.consume_iter(queue)
    async for message in messages:
        payload = message.payload
        stamp(payload["path"], payload.get("key", "-"))
        await messages.archive(message.id)


async def main() -> None:
    store = await pgqrs.connect_with(config())
    queue = os.environ["SITQ_BENCH_PGQRS_QUEUE"]
    await asyncio.gather(*(consume(store, queue) for _ in range(int(sys.argv[1]))))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
