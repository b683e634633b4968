"""Run one pgqrs consumer process until SIGTERM.

usage: pgqrs_worker.py CONCURRENCY   (DSN, schema and queue from SITQ_BENCH_PGQRS_*)

pgqrs is a library, not a worker. Its fast way to consume is a batch: this process
dequeues up to CONCURRENCY messages in one call (so it holds as many leases as a
sitq worker with that many slots), stamps the file named in each, and archives the
batch in one call (pgqrs' acknowledgement). With nothing visible it polls again
after ``POLL_SECONDS``, the pace of pgqrs' own ``consume_iter``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pgqrs
from common import stamp

#: Sleep between polls of an empty queue. consume_iter's default started work 29 ms
#: (p50) / 51 ms (p99) after its enqueue in these benchmarks: a poll every 50 ms.
POLL_SECONDS = 0.05


def config() -> Any:
    settings = pgqrs.Config(
        os.environ["SITQ_BENCH_PGQRS_DSN"], schema=os.environ["SITQ_BENCH_PGQRS_SCHEMA"]
    )
    # pgqrs throttles producers by default (1,000/s); measure the queue, not the throttle.
    settings.max_enqueue_per_second = None
    settings.max_enqueue_burst = None
    return settings


async def consume(store: Any, queue: str, batch_size: int) -> None:
    consumer = await store.consumer(queue)
    while True:
        messages = await consumer.dequeue(batch_size=batch_size)
        if not messages:
            await asyncio.sleep(POLL_SECONDS)
            continue
        for message in messages:
            payload = message.payload
            stamp(payload["path"], payload.get("key", "-"))
        await consumer.archive_many([message.id for message in messages])


async def main() -> None:
    store = await pgqrs.connect_with(config())
    await consume(store, os.environ["SITQ_BENCH_PGQRS_QUEUE"], int(sys.argv[1]))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
