"""Time arithmetic with no I/O: eta and delay validation, interval slots, retry backoff."""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sitq.errors import ValidationError
from sitq.validation import INT32_MAX, int_in_range

#: The longest duration sitq accepts, about 100 years: a longer delay, timeout or
#: interval is surely a mistake, and the bound keeps "now + duration" far from
#: ``datetime.max``, so due times and lease deadlines never overflow.
MAX_DURATION = timedelta(days=36_525)


def require_aware_utc(value: object, name: str) -> datetime:
    """Return ``value`` converted to UTC; reject anything but an aware datetime."""
    if not isinstance(value, datetime):
        raise ValidationError(f"{name} must be a datetime, got {type(value).__name__}")
    try:
        # value.utcoffset(), not tzinfo.utcoffset(value): it also checks the offset is
        # a timedelta of less than a day. A custom tzinfo may raise anything here.
        offset = value.utcoffset()
    except Exception as exc:
        raise ValidationError(
            f"{name} has a tzinfo that gives no valid UTC offset ({type(exc).__name__}: {exc})"
        ) from exc
    if offset is None:
        raise ValidationError(
            f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc)); "
            f"got naive datetime {value.isoformat()}"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # Near datetime.min or max, the offset can push the UTC time out of range.
        raise ValidationError(f"{name} is out of range in UTC: {value.isoformat()}") from None
    except Exception as exc:
        # astimezone asks the tzinfo again, and a custom one need not answer alike.
        raise ValidationError(
            f"{name} could not be converted to UTC ({type(exc).__name__}: {exc})"
        ) from exc


def seconds_from(value: object, name: str) -> timedelta:
    """A duration from zero to ``MAX_DURATION``, given as seconds (int or float) or a
    ``timedelta``."""
    if isinstance(value, timedelta):
        seconds: float = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationError(f"{name} must be a finite number of seconds, got {value!r}")
        seconds = value
    else:
        raise ValidationError(
            f"{name} must be seconds (int or float) or a timedelta, got {type(value).__name__}"
        )
    if seconds < 0:
        raise ValidationError(f"{name} must not be negative, got {value!r}")
    # Checked before building a timedelta, which overflows from about 2.7 million years.
    if seconds > MAX_DURATION.total_seconds():
        raise ValidationError(
            f"{name} must be at most {MAX_DURATION.days} days "
            f"({MAX_DURATION.total_seconds():.0f} seconds), got {value!r}"
        )
    return value if isinstance(value, timedelta) else timedelta(seconds=seconds)


def due_time(now: datetime, eta: object = None, delay: object = None) -> datetime:
    """When a new job becomes available: ``eta``, ``now + delay``, or ``now``.

    A past ``eta`` is allowed and means "run at once".
    """
    if eta is not None and delay is not None:
        raise ValidationError("give either eta or delay, not both")
    if eta is not None:
        return require_aware_utc(eta, "eta")
    if delay is not None:
        return now + seconds_from(delay, "delay")
    return now


def interval_from(value: object) -> timedelta | None:
    """An interval given as a ``timedelta`` or an int of milliseconds (omniQ's rule)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        milliseconds: float = value / timedelta(milliseconds=1)
    elif isinstance(value, int) and not isinstance(value, bool):
        milliseconds = value
    else:
        raise ValidationError(
            f"interval must be a timedelta or an int of milliseconds, got {type(value).__name__}"
        )
    if milliseconds <= 0:
        raise ValidationError(f"interval must be positive, got {value!r}")
    # Checked before building a timedelta, which overflows from about 2.7 million years.
    if milliseconds > MAX_DURATION / timedelta(milliseconds=1):
        raise ValidationError(f"interval must be at most {MAX_DURATION.days} days, got {value!r}")
    return value if isinstance(value, timedelta) else timedelta(milliseconds=milliseconds)


def next_interval_run(
    scheduled_at: datetime, interval: timedelta, now: datetime, started_at: datetime
) -> datetime | None:
    """The next slot of a recurring series after the run that was due at
    ``scheduled_at``, started at ``started_at`` and ended at ``now``.

    Slots stay on the grid ``scheduled_at + k * interval`` so the series never drifts
    with run time. A slot that passed while the run was under way is the next run,
    due at once (the latest such slot: the others are skipped, not piled up). A slot
    that passed before the run started (it started late, say with no worker up) was
    served by that run, so the next is the first slot after ``now``: a late series
    does not run twice in a row.

    ``None`` when that slot is past ``datetime.max``: the series has run its last.
    """
    elapsed = now - scheduled_at
    try:
        slot = scheduled_at + max(1, math.floor(elapsed / interval)) * interval
        return slot + interval if slot <= started_at else slot
    except OverflowError:
        return None


#: The most retries a task may have: its attempt count, one more, is stored in a
#: PostgreSQL ``integer``.
MAX_RETRIES = INT32_MAX - 1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how late a failed task is tried again.

    Attempt ``n`` (1-based, the one that just failed) waits
    ``min(max_backoff, backoff * factor ** (n - 1))`` seconds; with ``jitter`` the wait
    is drawn uniformly from the upper half of that, so retries of many tasks that
    failed together spread out instead of stampeding.
    """

    max_retries: int = 0
    backoff: float = 1.0
    factor: float = 2.0
    max_backoff: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        int_in_range(self.max_retries, "max_retries", 0, MAX_RETRIES)
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, timedelta):
                # delay_for does float arithmetic on it.
                raise ValidationError(f"{name} must be seconds (int or float), got timedelta")
            seconds_from(value, name)
        if isinstance(self.factor, bool) or not isinstance(self.factor, int | float):
            raise ValidationError(f"factor must be a number, got {type(self.factor).__name__}")
        # This also rejects NaN, inf and ints too large for a float.
        if not 1 <= self.factor <= sys.float_info.max:
            raise ValidationError(f"factor must be a finite number >= 1, got {self.factor!r}")
        if not isinstance(self.jitter, bool):
            raise ValidationError(f"jitter must be a bool, got {self.jitter!r}")

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1

    def delay_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        # float ** int is one pow() call whatever the exponent (an int factor would
        # build a big int); it raises OverflowError where the growth passes any cap.
        try:
            growth = float(self.factor) ** exponent
        except OverflowError:
            growth = math.inf
        delay = min(self.backoff * growth, self.max_backoff) if self.backoff else 0.0
        if self.jitter and delay > 0:
            return (rng or random).uniform(delay / 2, delay)
        return delay
