"""The one seam through which sitq reads the time, so tests can control "now"."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Tells the current time (aware, UTC) and sleeps on that time scale."""

    def now(self) -> datetime: ...

    async def sleep_until(self, deadline: datetime, wakeup: asyncio.Event) -> None:
        """Return at ``deadline`` or as soon as ``wakeup`` is set, whichever is first."""
        ...


class SystemClock:
    """Wall-clock time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, deadline: datetime, wakeup: asyncio.Event) -> None:
        seconds = (deadline - self.now()).total_seconds()
        if seconds <= 0 or wakeup.is_set():
            return
        try:
            await asyncio.wait_for(wakeup.wait(), seconds)
        except TimeoutError:
            pass


class FakeClock:
    """A clock that only moves when told to; sleepers wake when it passes their deadline.

    Used by tests to run interval series and retry backoff without waiting.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        self._moved = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float | timedelta) -> None:
        step = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        self._now += step
        self._moved.set()
        self._moved = asyncio.Event()

    async def sleep_until(self, deadline: datetime, wakeup: asyncio.Event) -> None:
        while self._now < deadline and not wakeup.is_set():
            moved = asyncio.ensure_future(self._moved.wait())
            woken = asyncio.ensure_future(wakeup.wait())
            try:
                await asyncio.wait({moved, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
                woken.cancel()


SYSTEM_CLOCK = SystemClock()
