"""The pure time arithmetic of ``sitq.scheduling``: no I/O, no clock, no waiting."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Literal

import pytest

from sitq import FakeClock, Retry, RetryPolicy, TaskTimeoutError, ValidationError
from sitq.scheduling import (
    MAX_DURATION,
    MAX_RETRIES,
    due_time,
    interval_from,
    next_interval_run,
    require_aware_utc,
    seconds_from,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

# -- due_time ------------------------------------------------------------------------------


def test_due_time_defaults_to_now() -> None:
    assert due_time(NOW) == NOW


def test_due_time_with_delay_in_seconds_or_timedelta() -> None:
    assert due_time(NOW, delay=90) == NOW + timedelta(seconds=90)
    assert due_time(NOW, delay=1.5) == NOW + timedelta(seconds=1.5)
    assert due_time(NOW, delay=timedelta(minutes=2)) == NOW + timedelta(minutes=2)
    assert due_time(NOW, delay=0) == NOW


def test_due_time_with_eta_converts_to_utc() -> None:
    minus_seven = timezone(timedelta(hours=-7))
    eta = datetime(2030, 1, 1, 8, 30, tzinfo=minus_seven)
    due = due_time(NOW, eta=eta)
    assert due == eta
    assert due.tzinfo is UTC
    assert (due.hour, due.minute) == (15, 30)


def test_due_time_allows_a_past_eta() -> None:
    past = NOW - timedelta(days=3)
    assert due_time(NOW, eta=past) == past


def test_due_time_rejects_a_naive_eta_naming_it() -> None:
    with pytest.raises(ValueError, match="eta") as caught:
        due_time(NOW, eta=datetime(2030, 1, 1))
    assert isinstance(caught.value, ValidationError)
    assert "timezone-aware" in str(caught.value)


@pytest.mark.parametrize(
    ("eta", "delay", "words"),
    [
        (NOW, 5, "either eta or delay"),
        ("2030-01-01T00:00:00Z", None, "eta must be a datetime"),
        (None, -1, "delay must not be negative"),
        (None, float("nan"), "delay must be a finite"),
        (None, float("inf"), "delay must be a finite"),
        (None, "5", "delay must be seconds"),
        (None, True, "delay must be seconds"),
        (None, timedelta(seconds=-1), "delay must not be negative"),
    ],
)
def test_due_time_validation_errors(eta: object, delay: object, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        due_time(NOW, eta=eta, delay=delay)


def test_require_aware_utc_rejects_a_tzinfo_without_offset() -> None:
    class NoOffset(tzinfo):
        def utcoffset(self, dt: datetime | None) -> None:
            return None

        def dst(self, dt: datetime | None) -> None:
            return None

        def tzname(self, dt: datetime | None) -> None:
            return None

    with pytest.raises(ValidationError, match="when"):
        require_aware_utc(datetime(2030, 1, 1, tzinfo=NoOffset()), "when")


class _BrokenZone(tzinfo):
    """A tzinfo whose ``utcoffset`` gives ``answers`` in turn, raising an exception given."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[return-value]

    def dst(self, dt: datetime | None) -> None:
        return None


@pytest.mark.parametrize(
    ("answers", "cause", "words"),
    [
        ((RuntimeError("no tz database"),), RuntimeError, "no valid UTC offset"),
        ((timedelta(hours=30),), ValueError, "no valid UTC offset"),
        ((3600,), TypeError, "no valid UTC offset"),
        # Valid once, then not: astimezone asks again.
        ((timedelta(0), KeyError("gone")), KeyError, "could not be converted"),
    ],
)
def test_an_eta_whose_tzinfo_misbehaves_is_rejected_naming_it(
    answers: tuple[object, ...], cause: type[Exception], words: str
) -> None:
    # tzinfo.utcoffset() was called directly, so the offset was not checked, and what
    # it or astimezone raised escaped as it was (RuntimeError, ValueError, TypeError).
    with pytest.raises(ValidationError, match=f"eta .*{words}") as caught:
        due_time(NOW, eta=datetime(2030, 1, 1, tzinfo=_BrokenZone(*answers)))
    assert isinstance(caught.value.__cause__, cause)


def test_seconds_from_names_the_parameter() -> None:
    assert seconds_from(2, "grace") == timedelta(seconds=2)
    with pytest.raises(ValidationError, match="grace"):
        seconds_from(-2, "grace")


def test_seconds_from_accepts_up_to_max_duration() -> None:
    assert seconds_from(MAX_DURATION, "grace") == MAX_DURATION
    assert seconds_from(MAX_DURATION.total_seconds(), "grace") == MAX_DURATION


@pytest.mark.parametrize(
    "value",
    [
        MAX_DURATION + timedelta(microseconds=1),
        timedelta.max,
        MAX_DURATION.total_seconds() + 1,
        1e12,
        1e300,
        2**62,
        10**400,  # too large for a float
    ],
)
def test_seconds_from_rejects_durations_past_the_bound_naming_the_parameter(
    value: object,
) -> None:
    with pytest.raises(ValidationError, match="grace must be at most 36525 days"):
        seconds_from(value, "grace")


@pytest.mark.parametrize("value", [True, "1", None, [1]])
def test_seconds_from_rejects_what_is_not_a_number_or_timedelta(value: object) -> None:
    with pytest.raises(ValidationError, match="grace must be seconds"):
        seconds_from(value, "grace")


def test_an_eta_that_overflows_in_utc_is_rejected_naming_it() -> None:
    west = timezone(timedelta(hours=-1))
    east = timezone(timedelta(hours=1))
    for eta in (datetime.max.replace(tzinfo=west), datetime.min.replace(tzinfo=east)):
        with pytest.raises(ValidationError, match="eta is out of range"):
            due_time(NOW, eta=eta)


# -- interval_from -------------------------------------------------------------------------


def test_interval_from_timedelta_and_int_milliseconds() -> None:
    assert interval_from(None) is None
    assert interval_from(timedelta(seconds=5)) == timedelta(seconds=5)
    assert interval_from(1500) == timedelta(milliseconds=1500)
    assert interval_from(1) == timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "must be positive"),
        (-10, "must be positive"),
        (timedelta(0), "must be positive"),
        (timedelta(seconds=-1), "must be positive"),
        (1.5, "int of milliseconds"),
        (True, "int of milliseconds"),
        ("1000", "int of milliseconds"),
        (MAX_DURATION + timedelta(milliseconds=1), "at most 36525 days"),
        (timedelta(days=3_000_000), "at most 36525 days"),
        (2**62, "at most 36525 days"),
    ],
)
def test_interval_from_validation_errors(value: object, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        interval_from(value)


# -- next_interval_run ---------------------------------------------------------------------

EVERY = timedelta(minutes=10)


def test_next_run_is_one_interval_after_the_scheduled_time_not_after_now() -> None:
    # The run was due at 12:00 and finished at 12:03: the next is at 12:10, not 12:13.
    assert next_interval_run(NOW, EVERY, NOW + timedelta(minutes=3), NOW) == NOW + EVERY


def test_next_run_when_finished_early_or_exactly_on_time() -> None:
    assert next_interval_run(NOW, EVERY, NOW, NOW) == NOW + EVERY
    # A clock slightly behind the scheduled time still moves the series forward.
    behind = NOW - timedelta(seconds=5)
    assert next_interval_run(NOW, EVERY, behind, behind) == NOW + EVERY


def test_a_run_that_overran_slots_is_followed_at_once_by_the_latest() -> None:
    # Started on time, ran 35 minutes: slots 12:10, 12:20 and 12:30 passed meanwhile.
    # The next run is the latest (12:30, due at once); the others are not piled up.
    late = NOW + timedelta(minutes=35)
    nxt = next_interval_run(NOW, EVERY, late, NOW)
    assert nxt == NOW + 3 * EVERY
    assert nxt <= late
    # Its own next run then returns to the future, still on the grid.
    assert next_interval_run(nxt, EVERY, late, late) == NOW + 4 * EVERY


def test_a_run_that_started_late_served_the_slots_before_it() -> None:
    # Due at 12:00, started at 12:32 (no worker was up), done at 12:33: the 12:30
    # slot passed before the run began, so the run covered it; next is 12:40.
    began = NOW + timedelta(minutes=32)
    assert next_interval_run(NOW, EVERY, began + timedelta(minutes=1), began) == NOW + 4 * EVERY
    # A slot passing while that late run is under way still gets its run.
    done = NOW + timedelta(minutes=41)
    assert next_interval_run(NOW, EVERY, done, began) == NOW + 4 * EVERY


def test_next_run_exactly_on_a_later_slot() -> None:
    assert next_interval_run(NOW, EVERY, NOW + 2 * EVERY, NOW) == NOW + 2 * EVERY


def test_next_run_never_drifts_over_many_runs() -> None:
    scheduled = NOW
    for n in range(1, 101):
        # Each run takes a little time; the schedule must not absorb it.
        began = scheduled + timedelta(seconds=2)
        scheduled = next_interval_run(scheduled, EVERY, began + timedelta(seconds=5), began)
        assert scheduled == NOW + n * EVERY


def test_next_run_with_sub_second_interval() -> None:
    every = timedelta(milliseconds=250)
    assert next_interval_run(NOW, every, NOW + timedelta(milliseconds=100), NOW) == NOW + every


# -- RetryPolicy ---------------------------------------------------------------------------


def test_retry_delay_grows_exponentially_without_jitter() -> None:
    policy = RetryPolicy(max_retries=10, backoff=1.0, factor=2.0, max_backoff=1000, jitter=False)
    assert [policy.delay_for(n) for n in range(1, 7)] == [1, 2, 4, 8, 16, 32]
    assert policy.max_attempts == 11


def test_retry_delay_with_another_factor_and_base() -> None:
    policy = RetryPolicy(max_retries=3, backoff=0.5, factor=3.0, jitter=False)
    assert [policy.delay_for(n) for n in (1, 2, 3)] == [0.5, 1.5, 4.5]


def test_retry_delay_is_capped_at_max_backoff() -> None:
    policy = RetryPolicy(max_retries=100, backoff=1.0, factor=2.0, max_backoff=60, jitter=False)
    assert policy.delay_for(6) == 32
    assert policy.delay_for(7) == 60
    assert policy.delay_for(50) == 60
    # A huge attempt count neither overflows nor takes long.
    assert policy.delay_for(10**6) == 60


def test_retry_delay_for_attempt_zero_or_below_is_the_base() -> None:
    policy = RetryPolicy(max_retries=1, backoff=3.0, jitter=False)
    assert policy.delay_for(0) == 3.0
    assert policy.delay_for(1) == 3.0


def test_factor_one_is_a_constant_delay() -> None:
    policy = RetryPolicy(max_retries=5, backoff=2.0, factor=1.0, jitter=False)
    assert {policy.delay_for(n) for n in range(1, 6)} == {2.0}


def test_retry_delay_takes_no_steps_per_attempt() -> None:
    # It used to multiply once per attempt until the cap, which a factor of 1 (or
    # a zero backoff) never reaches: two billion steps for the largest attempt count.
    last = MAX_RETRIES + 1

    def policy(**options: float) -> RetryPolicy:
        return RetryPolicy(max_retries=MAX_RETRIES, jitter=False, **options)

    assert policy(backoff=2.0, factor=1).delay_for(last) == 2.0
    assert policy(backoff=0).delay_for(last) == 0
    nearly_one = 1 + 1e-12
    assert policy(factor=nearly_one, max_backoff=5).delay_for(last) == nearly_one ** (last - 1)
    assert policy(factor=10**300, max_backoff=7).delay_for(3) == 7


def test_retry_jitter_stays_in_the_upper_half_of_the_delay() -> None:
    policy = RetryPolicy(max_retries=10, backoff=1.0, factor=2.0, max_backoff=20, jitter=True)
    rng = random.Random(1234)
    for attempt, full in [(1, 1.0), (3, 4.0), (5, 16.0), (8, 20.0)]:
        samples = [policy.delay_for(attempt, rng) for _ in range(200)]
        assert all(full / 2 <= s <= full for s in samples), (attempt, min(samples), max(samples))
        # Jitter actually spreads the retries out.
        assert max(samples) - min(samples) > full / 4


def test_retry_jitter_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy(max_retries=3, backoff=2.0)
    first = [policy.delay_for(2, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1


def test_zero_backoff_means_retry_at_once_even_with_jitter() -> None:
    policy = RetryPolicy(max_retries=3, backoff=0, jitter=True)
    assert policy.delay_for(1) == 0
    assert policy.delay_for(3) == 0


def test_default_policy_does_not_retry() -> None:
    assert RetryPolicy().max_retries == 0
    assert RetryPolicy().max_attempts == 1


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_retries": -1}, "max_retries must be between 0 and 2147483646"),
        # Its attempt count, one more, must fit PostgreSQL's integer.
        ({"max_retries": 2**31 - 1}, "max_retries must be between 0 and 2147483646"),
        ({"max_retries": 1.5}, "max_retries must be an int"),
        ({"max_retries": True}, "max_retries must be an int"),
        ({"backoff": -0.1}, "backoff must not be negative"),
        ({"backoff": float("nan")}, "backoff must be a finite number"),
        ({"backoff": float("inf")}, "backoff must be a finite number"),
        ({"backoff": 1e12}, "backoff must be at most"),
        ({"backoff": "1"}, "backoff must be seconds"),
        ({"backoff": timedelta(seconds=1)}, "backoff must be seconds"),
        ({"max_backoff": -1}, "max_backoff must not be negative"),
        ({"max_backoff": float("nan")}, "max_backoff must be a finite number"),
        ({"max_backoff": 1e12}, "max_backoff must be at most"),
        ({"factor": 0.5}, "factor must be a finite number >= 1"),
        ({"factor": float("nan")}, "factor must be a finite number >= 1"),
        ({"factor": float("inf")}, "factor must be a finite number >= 1"),
        ({"factor": 10**400}, "factor must be a finite number >= 1"),
        ({"factor": "2"}, "factor must be a number"),
        ({"factor": True}, "factor must be a number"),
        ({"jitter": 1}, "jitter must be a bool"),
        ({"jitter": "no"}, "jitter must be a bool"),
    ],
)
def test_retry_policy_validation_errors(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_policy_accepts_its_largest_values() -> None:
    policy = RetryPolicy(
        max_retries=2**31 - 2, backoff=1e9, factor=1e300, max_backoff=1e9, jitter=False
    )
    assert policy.max_attempts == 2**31 - 1
    assert policy.delay_for(2**31 - 2) == 1e9


@pytest.mark.parametrize("delay", [-1, float("nan"), float("inf"), 1e12, "5", True])
def test_retry_rejects_a_bad_delay_when_raised(delay: object) -> None:
    with pytest.raises(ValidationError, match="Retry delay"):
        Retry(delay=delay)  # type: ignore[arg-type]


def test_retry_delay_is_seconds() -> None:
    assert Retry(delay=5).delay == 5
    assert Retry().delay is None


def test_the_last_slot_before_datetime_max_ends_the_series() -> None:
    latest = datetime.max.replace(tzinfo=UTC)
    last = latest - timedelta(hours=12)
    assert next_interval_run(last - EVERY, EVERY, last - EVERY, last - EVERY) == last
    assert next_interval_run(last, timedelta(days=1), last, last) is None


# -- FakeClock ----------------------------------------------------------------------------


class _CountedEvent(asyncio.Event):
    """An event that counts how often it was waited on."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    async def wait(self) -> Literal[True]:
        self.waits += 1
        return await super().wait()


def test_a_fake_clock_shared_by_two_event_loops_sleeps_on_each() -> None:
    clock = FakeClock(NOW)

    async def sleep_until_woken() -> int:
        wakeup = _CountedEvent()
        sleeper = asyncio.create_task(clock.sleep_until(clock.now() + timedelta(days=1), wakeup))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not sleeper.done()
        waits = wakeup.waits
        wakeup.set()  # not the clock: what the first loop waited on stays as it was
        await asyncio.wait_for(sleeper, 5)
        return waits

    # A sleeper waits once, until woken; on the second loop it used to find the first
    # loop's event, fail at once and wait again, round after round (a busy loop).
    assert asyncio.run(sleep_until_woken()) == 1
    assert asyncio.run(sleep_until_woken()) == 1


def test_a_fake_clock_starts_at_an_aware_time_in_utc() -> None:
    # A naive start was accepted: the memory backend then failed every later call,
    # SQLite raised TypeError and PostgreSQL read the times in the server's zone.
    for start, words in ((datetime(2030, 1, 1), "timezone-aware"), ("2030-01-01", "datetime")):
        with pytest.raises(ValidationError, match=f"start must be .*{words}"):
            FakeClock(start)  # type: ignore[arg-type]
    east = FakeClock(datetime(2030, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))))
    assert east.now() == datetime(2030, 1, 1, tzinfo=UTC)
    assert east.now().tzinfo is UTC


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        # Once: -5 moved the time back, True moved it 1 s, and the others raised
        # TypeError, ValueError or OverflowError.
        (-5, "must not be negative"),
        (timedelta(seconds=-1), "must not be negative"),
        (True, "must be seconds"),
        ("5", "must be seconds"),
        (float("nan"), "must be a finite number"),
        (float("inf"), "must be a finite number"),
        (MAX_DURATION.total_seconds() + 1, "must be at most"),
    ],
)
def test_a_fake_clock_refuses_a_bad_advance_naming_it(seconds: object, words: str) -> None:
    clock = FakeClock(NOW)
    with pytest.raises(ValidationError, match=f"seconds {words}"):
        clock.advance(seconds)  # type: ignore[arg-type]
    assert clock.now() == NOW


def test_a_fake_clock_refuses_to_pass_datetime_max() -> None:
    latest = datetime.max.replace(tzinfo=UTC)
    clock = FakeClock(latest - timedelta(seconds=1))
    with pytest.raises(ValidationError, match=r"seconds=2 .* past datetime\.max"):
        clock.advance(2)
    clock.advance(1)
    assert clock.now() == latest


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.2, "0.2"), (5, "5"), (1234567, "1234567"), (100000.5, "100000.5"), (1e-07, "1e-07")],
)
def test_a_timeout_error_shows_the_timeout_as_given(seconds: float, shown: str) -> None:
    # ":g" printed 1234567 as 1.23457e+06 and 100000.5 as 100000.
    assert str(TaskTimeoutError(seconds)) == f"task timed out after {shown} s"
