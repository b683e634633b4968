"""Time arithmetic with no I/O: eta and delay validation, interval slots, retry backoff."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sitq.errors import ValidationError


def require_aware_utc(value: object, name: str) -> datetime:
    """Return ``value`` converted to UTC; reject anything but an aware datetime."""
    if not isinstance(value, datetime):
        raise ValidationError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValidationError(
            f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc)); "
            f"got naive datetime {value.isoformat()}"
        )
    return value.astimezone(UTC)


def seconds_from(value: object, name: str) -> timedelta:
    """A non-negative duration given as seconds (int or float) or a ``timedelta``."""
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValidationError(f"{name} must be a finite number of seconds, got {value!r}")
        duration = timedelta(seconds=value)
    else:
        raise ValidationError(
            f"{name} must be seconds (int or float) or a timedelta, got {type(value).__name__}"
        )
    if duration < timedelta(0):
        raise ValidationError(f"{name} must not be negative, got {value!r}")
    return duration


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
        interval = value
    elif isinstance(value, int) and not isinstance(value, bool):
        interval = timedelta(milliseconds=value)
    else:
        raise ValidationError(
            f"interval must be a timedelta or an int of milliseconds, got {type(value).__name__}"
        )
    if interval <= timedelta(0):
        raise ValidationError(f"interval must be positive, got {value!r}")
    return interval


def next_interval_run(scheduled_at: datetime, interval: timedelta, now: datetime) -> datetime:
    """The next slot of a recurring series after the run that was due at ``scheduled_at``.

    Slots stay on the grid ``scheduled_at + k * interval`` so the series never drifts
    with run time. When runs fell behind, the next run is the latest slot already
    passed (due at once) and the missed slots in between are skipped, not piled up.
    """
    elapsed = now - scheduled_at
    steps = max(1, math.floor(elapsed / interval))
    return scheduled_at + steps * interval


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
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise ValidationError(f"max_retries must be an int, got {self.max_retries!r}")
        if self.max_retries < 0:
            raise ValidationError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValidationError("backoff and max_backoff must be >= 0 seconds")
        if self.factor < 1:
            raise ValidationError(f"factor must be >= 1, got {self.factor}")

    @property
    def max_attempts(self) -> int:
        return self.max_retries + 1

    def delay_for(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        # Cap before multiplying so a large attempt count cannot overflow a float.
        ceiling = self.max_backoff
        delay = self.backoff
        for _ in range(exponent):
            delay *= self.factor
            if delay >= ceiling:
                break
        delay = min(delay, ceiling)
        if self.jitter and delay > 0:
            return (rng or random).uniform(delay / 2, delay)
        return delay
