"""The LISTEN side of :mod:`sitq.backends.postgres`: NOTIFYs become in-process wake-ups.

One dedicated connection per backend object (a pooled connection cannot stay in
LISTEN: the pool would hand it to other work). It reconnects with a growing, jittered
backoff; NOTIFYs sent while it was down are lost, so every (re)connection wakes the
waiters once and they look for themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import psycopg

from sitq.backends.postgres_sql import SESSION_SETUP
from sitq.wakeup import Wakeup

logger = logging.getLogger("sitq.postgres")

#: Reconnection backoff, seconds: first pause and ceiling.
BACKOFF = (0.05, 2.0)


async def listen(
    dsn: str,
    channel: str,
    wakeup: Wakeup,
    listening: asyncio.Event,
    own_payload: str,
) -> None:
    """Call ``wakeup.notify()`` for every NOTIFY on ``channel``, until cancelled.

    ``listening`` is set while subscribed. ``channel`` must be a plain identifier;
    ``dsn`` should carry a ``connect_timeout`` (see ``with_connect_timeout``).
    Notifications carrying ``own_payload`` came from this process, which woke its
    waiters already when it wrote; waking them again would only cost a query.
    """
    pause = BACKOFF[0]
    while True:
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            # Keepalives: a peer that vanished without closing (a host or network
            # failure) must not leave us listening to nothing forever.
            conn = await psycopg.AsyncConnection.connect(
                dsn,
                autocommit=True,
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
            )
            await conn.execute(SESSION_SETUP)
            await conn.execute(f'LISTEN "{channel}"')
            listening.set()
            pause = BACKOFF[0]
            # Anything written while we were not listening was not announced.
            wakeup.notify()
            async for notification in conn.notifies():
                if notification.payload != own_payload:
                    wakeup.notify()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a lost connection or a server restart
            logger.warning("LISTEN connection lost (%s); reconnecting in %.2fs", exc, pause)
        finally:
            listening.clear()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        await asyncio.sleep(pause * random.uniform(0.5, 1.0))
        pause = min(pause * 2, BACKOFF[1])
