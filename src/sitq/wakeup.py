"""In-process wake-ups: a write in one thread or event loop wakes waiters in any other.

Workers sleep until the earlier of their poll interval and the next known due time;
a :class:`Wakeup` cuts that sleep short when work is enqueued (or a task finishes) in
the same process. Backends that can push wake-ups across processes (PostgreSQL's
LISTEN/NOTIFY) feed the same object.
"""

from __future__ import annotations

import asyncio
import threading

from sitq.forking import renew_after_fork


class Wakeup:
    """Thread-safe broadcast to asyncio events living on any number of loops."""

    def __init__(self) -> None:
        self._start_in_this_process()
        renew_after_fork(self)

    def _start_in_this_process(self) -> None:
        """Set here, and again in the child of a fork: the copied lock may have been
        held by another thread of the parent (the child's first subscribe then hung),
        and the copied waiters live on the parent's loops, which do not run here."""
        self._lock = threading.Lock()
        self._waiters: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}

    def subscribe(self) -> asyncio.Event:
        """An event, bound to the running loop, set by every later :meth:`notify`."""
        event = asyncio.Event()
        with self._lock:
            self._waiters[event] = asyncio.get_running_loop()
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        with self._lock:
            self._waiters.pop(event, None)

    def notify(self) -> None:
        if not self._waiters:
            # Nobody waits (a process that only enqueues): nothing to do. Racing a
            # subscribe is no worse than with the lock: either way that waiter misses
            # this notify only if it subscribed after it.
            return
        with self._lock:
            waiters = list(self._waiters.items())
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for event, loop in waiters:
            if loop is current:
                event.set()
            elif not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the loop closed between the check and the call
                    pass
