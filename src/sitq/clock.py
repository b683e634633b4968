"""The one seam through which sitq reads the time, so tests can control "now"."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sitq.errors import ValidationError
from sitq.scheduling import require_aware_utc, seconds_from
from sitq.validation import implementation


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

    Used by tests to run interval series and retry backoff without waiting. One clock
    may serve several event loops (a clock shared by tests that each run their own
    loop, or a sync client's loop thread): sleepers of each loop are woken on theirs.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = datetime(2030, 1, 1, tzinfo=UTC)
        # Aware and in UTC, like SystemClock's: a naive start was once stored as given,
        # and each backend then read those times its own way (or failed).
        self._now = require_aware_utc(start, "start")
        # One event per loop: an asyncio.Event belongs to the loop that first waits on
        # it, and waiting on it from another fails at once (a sleeper would spin).
        self._moved: dict[asyncio.AbstractEventLoop, asyncio.Event] = {}

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float | timedelta) -> None:
        """Move the time forward by ``seconds`` (an int, a float or a ``timedelta``).

        Not back: a negative step, taken silently once, made due work not due again,
        more likely a slip than an intent.
        """
        step = seconds_from(seconds, "seconds")
        try:
            self._now += step
        except OverflowError:
            raise ValidationError(
                f"seconds={seconds!r} would move the clock past datetime.max"
            ) from None
        moved, self._moved = self._moved, {}
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, event in moved.items():
            if loop is current:
                event.set()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    async def sleep_until(self, deadline: datetime, wakeup: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not wakeup.is_set():
            # The event first, then the time: an advance() from another thread in
            # between either sets this event or moved the time before we read it.
            event = self._moved.get(loop)
            if event is None:
                event = self._moved[loop] = asyncio.Event()
            if self._now >= deadline:
                return
            moved = asyncio.ensure_future(event.wait())
            woken = asyncio.ensure_future(wakeup.wait())
            try:
                await asyncio.wait({moved, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
                woken.cancel()


SYSTEM_CLOCK = SystemClock()


def clock_or_system(clock: Clock | None) -> Clock:
    """The ``clock=`` argument of the API, checked; the system clock when ``None``."""
    if clock is None:
        return SYSTEM_CLOCK
    return implementation(clock, "clock", ("now", "sleep_until"))
