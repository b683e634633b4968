"""The backend contract (``sitq.backends.base``), checked the same way on every backend.

These tests talk to the backend directly and hand it explicit ``now`` values, so
leases expire and jobs come due without any real waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import remove_sqlite_files
from sitq import (
    BackendError,
    Consumer,
    FakeClock,
    Producer,
    RetryPolicy,
    SQLiteBackend,
    StorageUnavailableError,
    TaskQueue,
    TaskStatus,
    ValidationError,
    Worker,
)
from sitq.backends.base import (
    Backend,
    ClaimRequest,
    Finish,
    NewJob,
    Reschedule,
    TaskQuery,
)
from sitq.backends.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from sitq.core import JobKind, Task
from sitq.metrics import metrics_from

T0 = datetime(2030, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=10)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job(
    job_id: str | None = None,
    *,
    queue: str = "default",
    kind: JobKind = "task",
    priority: int = 0,
    due: float = 0,
    enqueued: float | None = None,
    interval: timedelta | None = None,
    max_attempts: int = 1,
) -> NewJob:
    job_id = job_id or uuid.uuid4().hex
    return NewJob(
        id=job_id,
        queue=queue,
        kind=kind,
        payload=b"payload-" + job_id.encode(),
        enqueued_at=at(due if enqueued is None else enqueued),
        available_at=at(due),
        priority=priority,
        max_attempts=max_attempts,
        interval=interval,
        series_id=job_id if interval is not None else None,
    )


def claim_req(
    owner: str = "w1",
    *,
    now: float = 0,
    limit: int = 10,
    queues: tuple[str, ...] | None = None,
    kind: JobKind = "task",
) -> ClaimRequest:
    return ClaimRequest(owner, kind, limit, LEASE, at(now), queues)


def assert_aware_utc(moment: datetime | None) -> None:
    assert moment is not None
    assert moment.tzinfo is not None
    assert moment.utcoffset() == timedelta(0)


async def get(backend: Backend, job_id: str) -> Task:
    task = await backend.get(job_id)
    assert task is not None, f"job {job_id} is missing"
    return task


# -- enqueue and get ---------------------------------------------------------------------


async def test_enqueue_stores_the_job_with_aware_utc_times(backend: Backend) -> None:
    new = job("a", queue="mail", priority=3, due=5, enqueued=1, max_attempts=4)
    await backend.enqueue([new])
    task = await get(backend, "a")
    assert (task.id, task.queue, task.kind, task.status) == ("a", "mail", "task", "pending")
    assert (task.priority, task.attempts, task.max_attempts) == (3, 0, 4)
    assert task.enqueued_at == at(1)
    assert task.available_at == at(5)
    for moment in (task.enqueued_at, task.available_at):
        assert_aware_utc(moment)
    assert task.started_at is None and task.finished_at is None
    assert task.result is None and task.error is None and task.traceback is None


async def test_get_unknown_id_is_none(backend: Backend) -> None:
    assert await backend.get("no-such-job") is None


async def test_enqueue_is_all_or_nothing(backend: Backend) -> None:
    await backend.enqueue([job("dup")])
    with pytest.raises(BackendError):
        await backend.enqueue([job("fresh-1"), job("dup"), job("fresh-2")])
    assert await backend.get("fresh-1") is None
    assert await backend.get("fresh-2") is None
    assert [t.id for t in await backend.list_jobs(TaskQuery())] == ["dup"]


# -- claim --------------------------------------------------------------------------------


async def test_claim_never_exceeds_limit(backend: Backend) -> None:
    await backend.enqueue([job(f"j{n}") for n in range(5)])
    first = await backend.claim(claim_req(limit=2))
    assert len(first) == 2
    second = await backend.claim(claim_req(limit=10))
    assert len(second) == 3
    assert await backend.claim(claim_req(limit=10)) == []
    assert {r.id for r in first} | {r.id for r in second} == {f"j{n}" for n in range(5)}


async def test_claim_returns_each_of_the_jobs_times(backend: Backend) -> None:
    await backend.enqueue([job("early", enqueued=1, due=3), job("now", enqueued=2, due=2)])
    reserved = {r.id: r for r in await backend.claim(claim_req(now=4))}
    times = {
        name: (r.enqueued_at, r.available_at, r.scheduled_at, r.lease_expires_at)
        for name, r in reserved.items()
    }
    assert times == {
        "early": (at(1), at(3), at(3), at(4) + LEASE),
        "now": (at(2), at(2), at(2), at(4) + LEASE),
    }


async def test_claim_sets_a_lease_and_counts_the_attempt(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    (reserved,) = await backend.claim(claim_req(now=2))
    assert reserved.id == "a"
    assert reserved.attempts == 1
    assert reserved.payload == b"payload-a"
    assert reserved.lease_expires_at == at(2) + LEASE
    assert_aware_utc(reserved.lease_expires_at)
    assert_aware_utc(reserved.available_at)
    task = await get(backend, "a")
    assert task.status is TaskStatus.RUNNING
    assert task.attempts == 1
    assert task.started_at == at(2)
    assert_aware_utc(task.started_at)


async def test_claim_takes_only_due_jobs_of_the_kind_and_queues_asked(backend: Backend) -> None:
    await backend.enqueue(
        [
            job("later", due=60),
            job("other-queue", queue="other"),
            job("message", kind="message"),
            job("now"),
        ]
    )
    claimed = await backend.claim(claim_req(queues=("default",)))
    assert [r.id for r in claimed] == ["now"]
    assert await backend.claim(claim_req(now=9, queues=("default",))) == []
    assert await backend.finish(Finish("now", "w1", TaskStatus.SUCCESS, at(9)))
    assert await backend.claim(claim_req(now=59, queues=("default",))) == []
    # Without a queue filter every queue is served, in due order.
    assert [r.id for r in await backend.claim(claim_req(now=60))] == ["other-queue", "later"]
    assert (await get(backend, "message")).status is TaskStatus.PENDING
    assert [r.id for r in await backend.claim(claim_req(now=60, kind="message"))] == ["message"]


async def test_claim_order_is_priority_then_due_time(backend: Backend) -> None:
    await backend.enqueue(
        [
            job("low-early", priority=0, due=0),
            job("high-late", priority=5, due=3),
            job("low-late", priority=0, due=2),
            job("high-early", priority=5, due=1),
            job("mid", priority=1, due=4),
        ]
    )
    expected = ["high-early", "high-late", "mid", "low-early", "low-late"]
    one_by_one = [(await backend.claim(claim_req(now=10, limit=1)))[0].id for _ in range(5)]
    assert one_by_one == expected


async def test_claim_is_first_in_first_out_among_equals(backend: Backend) -> None:
    # enqueue_many gives a batch one due time: their insertion order must decide.
    names = [f"n{n:02d}-{uuid.uuid4().hex[:6]}" for n in range(30)]
    await backend.enqueue([job(name) for name in reversed(names[:15])])
    await backend.enqueue([job(name) for name in reversed(names[15:])])
    expected = list(reversed(names[:15])) + list(reversed(names[15:]))
    batch = [r.id for r in await backend.claim(claim_req(limit=10))]
    one_by_one = [(await backend.claim(claim_req(limit=1)))[0].id for _ in range(20)]
    assert batch + one_by_one == expected


async def test_claim_batch_is_returned_in_priority_then_due_order(backend: Backend) -> None:
    await backend.enqueue(
        [
            job("c", priority=0, due=1),
            job("a", priority=2, due=2),
            job("b", priority=0, due=0),
            job("skipped", priority=-1, due=0),
        ]
    )
    assert [r.id for r in await backend.claim(claim_req(now=5, limit=3))] == ["a", "b", "c"]


async def test_claim_and_next_due_pass_over_priorities_with_nothing_due(
    backend: Backend,
) -> None:
    """Priorities are searched level by level; a level whose jobs are all scheduled
    later, or in other queues, must neither block nor leak into the result."""
    await backend.enqueue(
        [
            job("future-high", priority=9, due=100),
            job("due-low", priority=0, due=0),
            job("due-mid", priority=3, due=1),
            job("other-queue", priority=5, due=2, queue="q2"),
        ]
    )
    claimed = await backend.claim(claim_req(now=10, limit=5, queues=("default",)))
    assert [r.id for r in claimed] == ["due-mid", "due-low"]
    assert await backend.next_due("task", None) == at(2)
    # The two claimed jobs' leases end at 20, before future-high falls due.
    assert await backend.next_due("task", ("default",)) == at(20)
    assert await backend.claim(claim_req(now=10, limit=5, queues=("default",))) == []


async def test_jobs_turning_dead_do_not_shorten_a_claim(backend: Backend) -> None:
    """A job read more than max_deliveries times turns 'dead' when a claim finds it;
    the claim still fills its slots with live jobs, through settle as through claim."""
    once = [replace(job(name, due=0), max_deliveries=1) for name in ("a", "b", "c", "d")]
    await backend.enqueue(once)
    await backend.claim(claim_req("w1", now=0))  # each is read once; w1 then "dies"
    later = LEASE.total_seconds() + 1
    await backend.enqueue([job(f"fresh{n}", due=later) for n in range(4)])

    settled = await backend.settle([], claim_req("w2", now=later, limit=2))
    claimed = await backend.claim(claim_req("w2", now=later, limit=2))
    assert [r.id for r in settled.claimed + claimed] == [f"fresh{n}" for n in range(4)]
    dead = await backend.list_jobs(TaskQuery(status=TaskStatus.DEAD))
    assert sorted(t.id for t in dead) == ["a", "b", "c", "d"]


async def test_a_job_turning_dead_keeps_the_start_of_its_last_delivery(backend: Backend) -> None:
    # `sitq messages list` shows it: SQLite gave a dead message the time of the claim
    # that found it dead as its start, as if it had been delivered once more.
    await backend.enqueue(
        [replace(job(name, kind="message"), max_deliveries=1) for name in ("held", "released")]
    )
    await backend.claim(claim_req("c1", now=1, kind="message"))
    assert await backend.reschedule(Reschedule("released", "c1", at(2)))
    assert await backend.claim(claim_req("c2", now=60, kind="message")) == []
    for name in ("held", "released"):
        task = await get(backend, name)
        assert (task.status, task.started_at, task.finished_at) == (
            TaskStatus.DEAD,
            at(1),
            at(60),
        )


async def test_concurrent_claims_hand_each_job_to_one_owner(
    backend: Backend, backend_kind: str, make_backend: Callable[[str], Backend]
) -> None:
    # A second backend object on the same storage plays a second process.
    other = make_backend(backend_kind)
    await other.open()
    try:
        total = 40
        await backend.enqueue([job(f"j{n}") for n in range(total)])
        rounds = [
            (backend if n % 2 == 0 else other).claim(claim_req(f"w{n}", limit=3)) for n in range(20)
        ]
        results = await asyncio.gather(*rounds)
    finally:
        if other is not backend:
            await other.close()
    assert all(len(batch) <= 3 for batch in results)
    ids = [r.id for batch in results for r in batch]
    assert len(ids) == len(set(ids)), "a job was claimed twice"
    assert sorted(ids) == sorted(f"j{n}" for n in range(total))


async def test_expired_lease_is_claimable_again_with_attempts_counted(backend: Backend) -> None:
    await backend.enqueue([job("a", max_attempts=3)])
    await backend.claim(claim_req("dead-worker", now=0))
    # Not before the lease runs out...
    assert await backend.claim(claim_req("rescuer", now=9)) == []
    # ...but after it, with the attempt of the dead worker counted.
    (again,) = await backend.claim(claim_req("rescuer", now=11))
    assert again.id == "a"
    assert again.attempts == 2
    assert again.lease_expires_at == at(11) + LEASE
    task = await get(backend, "a")
    assert (task.status, task.attempts) == (TaskStatus.RUNNING, 2)


async def test_the_first_claim_after_a_lease_runs_out_takes_the_job(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    short = timedelta(milliseconds=100)
    await backend.claim(ClaimRequest("dead-worker", "task", 1, short, at(0)))
    assert await backend.claim(claim_req("rescuer", now=0.05)) == []
    (again,) = await backend.claim(claim_req("rescuer", now=0.1))
    assert (again.id, again.attempts) == ("a", 2)


async def test_a_claim_for_no_queues_takes_nothing(backend: Backend) -> None:
    # SQLite's pick for several queues lists them in a VALUES clause: for none it
    # was "VALUES " with no rows, and the claim failed with a syntax error.
    await backend.enqueue([job("a")])
    short = timedelta(milliseconds=100)
    await backend.claim(ClaimRequest("dead-worker", "task", 1, short, at(0)))
    await backend.enqueue([job("b")])
    assert await backend.claim(claim_req(now=1, queues=())) == []
    assert await backend.next_due("task", ()) is None
    assert sorted(reserved.id for reserved in await backend.claim(claim_req(now=1))) == ["a", "b"]


async def test_a_run_out_lease_stays_with_its_holder_until_a_claim_takes_the_job(
    backend: Backend,
) -> None:
    await backend.enqueue([job("a", queue="emails"), job("b", queue="sms")])
    await backend.claim(claim_req("slow", queues=("emails",)))
    await backend.enqueue([job("urgent", queue="emails", priority=5, due=11)])
    # Claims after the lease ran out, none of which takes "a": another queue's, and
    # one whose only slot goes to a job of higher priority.
    (sms,) = await backend.claim(claim_req("other", now=11, queues=("sms",)))
    (taken,) = await backend.claim(claim_req("other", now=11, limit=1, queues=("emails",)))
    assert (sms.id, taken.id) == ("b", "urgent")
    task = await get(backend, "a")
    assert (task.status, task.attempts) == (TaskStatus.RUNNING, 1)
    # So the late holder still has it: it can renew the lease and record the outcome.
    assert (await backend.extend_leases("slow", ["a"], LEASE, at(12))).lost == frozenset()
    assert await backend.finish(Finish("a", "slow", TaskStatus.SUCCESS, at(13), result=b"ok"))
    assert (await get(backend, "a")).status is TaskStatus.SUCCESS


async def test_late_writes_from_a_taken_over_owner_are_rejected(backend: Backend) -> None:
    await backend.enqueue([job("a", max_attempts=3)])
    await backend.claim(claim_req("slow", now=0))
    (taken,) = await backend.claim(claim_req("fast", now=11))
    assert taken.id == "a"

    late_finish = Finish("a", "slow", TaskStatus.SUCCESS, at(12), result=b"stale")
    assert await backend.finish(late_finish) is False
    assert await backend.reschedule(Reschedule("a", "slow", at(12), error="x")) is False
    report = await backend.extend_leases("slow", ["a"], LEASE, at(12))
    assert report.lost == frozenset({"a"})
    task = await get(backend, "a")
    assert task.status is TaskStatus.RUNNING and task.result is None

    assert await backend.finish(Finish("a", "fast", TaskStatus.SUCCESS, at(13), result=b"ok"))
    task = await get(backend, "a")
    assert (task.status, task.result, task.finished_at) == (TaskStatus.SUCCESS, b"ok", at(13))
    assert_aware_utc(task.finished_at)
    # Finishing twice is a write from an owner that no longer holds the job.
    assert await backend.finish(Finish("a", "fast", TaskStatus.FAILED, at(14))) is False
    assert (await get(backend, "a")).status is TaskStatus.SUCCESS


async def test_unknown_and_foreign_jobs_are_not_writable(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    await backend.claim(claim_req("owner"))
    assert await backend.finish(Finish("a", "stranger", TaskStatus.SUCCESS, at(1))) is False
    assert await backend.finish(Finish("nope", "owner", TaskStatus.SUCCESS, at(1))) is False
    assert await backend.reschedule(Reschedule("nope", "owner", at(1))) is False


# -- leases ----------------------------------------------------------------------------


async def test_extend_leases_keeps_a_running_job_from_being_taken(backend: Backend) -> None:
    await backend.enqueue([job("a"), job("b")])
    await backend.claim(claim_req("w1", now=0))
    report = await backend.extend_leases("w1", ["a", "b"], LEASE, at(8))
    assert report.lost == frozenset() and report.cancel_requested == frozenset()
    # The original leases (until t=10) are gone; the new ones last until t=18.
    assert await backend.claim(claim_req("w2", now=15)) == []
    assert {r.id for r in await backend.claim(claim_req("w2", now=19))} == {"a", "b"}


async def test_extend_leases_reports_lost_and_cancel_requested(backend: Backend) -> None:
    await backend.enqueue([job("kept"), job("cancelled"), job("taken")])
    await backend.claim(claim_req("w1", now=0))
    assert await backend.cancel("cancelled", at(1))
    # "taken" expires and goes to w2; the others are renewed in time below.
    await backend.extend_leases("w1", ["kept", "cancelled"], LEASE, at(5))
    assert [r.id for r in await backend.claim(claim_req("w2", now=11))] == ["taken"]
    report = await backend.extend_leases(
        "w1", ["kept", "cancelled", "taken", "unknown"], LEASE, at(12)
    )
    assert report.lost == frozenset({"taken", "unknown"})
    assert report.cancel_requested == frozenset({"cancelled"})


async def test_extend_leases_with_no_ids_reports_nothing(backend: Backend) -> None:
    report = await backend.extend_leases("w1", [], LEASE, at(0))
    assert report.lost == frozenset() and report.cancel_requested == frozenset()


# -- finish and recurring runs ---------------------------------------------------------


async def test_finish_stores_the_failure_text_and_traceback(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    await backend.claim(claim_req())
    failure = Finish(
        "a", "w1", TaskStatus.FAILED, at(3), error="ValueError: boom", traceback="Trace\n  l1"
    )
    assert await backend.finish(failure)
    task = await get(backend, "a")
    assert (task.status, task.error, task.traceback) == (
        TaskStatus.FAILED,
        "ValueError: boom",
        "Trace\n  l1",
    )
    assert task.finished_at == at(3)


async def test_finish_with_next_run_inserts_the_next_run(backend: Backend) -> None:
    every = timedelta(seconds=60)
    await backend.enqueue([job("run1", interval=every)])
    await backend.claim(claim_req())
    following = NewJob(
        id="run2",
        queue="default",
        kind="task",
        payload=b"payload-run1",
        enqueued_at=at(1),
        available_at=at(60),
        interval=every,
        series_id="run1",
    )
    assert await backend.finish(Finish("run1", "w1", TaskStatus.SUCCESS, at(1), next_run=following))
    nxt = await get(backend, "run2")
    assert (nxt.status, nxt.available_at, nxt.series_id, nxt.interval) == (
        TaskStatus.PENDING,
        at(60),
        "run1",
        every,
    )
    assert (await get(backend, "run1")).status is TaskStatus.SUCCESS


async def test_rejected_finish_does_not_insert_the_next_run(backend: Backend) -> None:
    every = timedelta(seconds=60)
    await backend.enqueue([job("run1", interval=every)])
    await backend.claim(claim_req("slow", now=0))
    await backend.claim(claim_req("fast", now=11))
    following = job("run2", due=60, interval=every)
    assert not await backend.finish(
        Finish("run1", "slow", TaskStatus.SUCCESS, at(12), next_run=following)
    )
    assert await backend.get("run2") is None


async def test_finish_of_a_cancelled_series_inserts_no_next_run(backend: Backend) -> None:
    every = timedelta(seconds=60)
    await backend.enqueue([job("run1", interval=every)])
    await backend.claim(claim_req())
    assert await backend.cancel("run1", at(1))
    following = job("run2", due=60, interval=every)
    assert await backend.finish(Finish("run1", "w1", TaskStatus.SUCCESS, at(2), next_run=following))
    assert await backend.get("run2") is None
    assert await backend.next_due("task", None) is None


# -- reschedule ------------------------------------------------------------------------


async def test_reschedule_returns_the_job_to_pending_with_its_error(backend: Backend) -> None:
    await backend.enqueue([job("a", max_attempts=3)])
    await backend.claim(claim_req("w1", now=0))
    retry = Reschedule("a", "w1", at(30), error="OSError: flaky", traceback="tb")
    assert await backend.reschedule(retry)
    task = await get(backend, "a")
    assert (task.status, task.available_at, task.attempts) == (TaskStatus.PENDING, at(30), 1)
    assert (task.error, task.traceback) == ("OSError: flaky", "tb")
    assert await backend.claim(claim_req("w2", now=29)) == []
    (again,) = await backend.claim(claim_req("w2", now=30))
    assert again.attempts == 2


async def test_reschedule_with_undo_attempt_gives_the_attempt_back(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    await backend.claim(claim_req("w1", now=0))
    assert await backend.reschedule(Reschedule("a", "w1", at(1), undo_attempt=True))
    assert (await get(backend, "a")).attempts == 0


async def test_reschedule_of_a_job_asked_to_cancel_cancels_it_where_it_was_due(
    backend: Backend,
) -> None:
    # A retry of a task cancelled while it ran cancels it: it is not due again, so its
    # eta stays the time it ran at (SQLite and PostgreSQL showed the retry's time).
    await backend.enqueue([job("a", due=2, max_attempts=3)])
    await backend.claim(claim_req("w1", now=3))
    assert await backend.cancel("a", at(4))
    assert await backend.reschedule(Reschedule("a", "w1", at(30), error="E: x", now=at(5)))
    task = await get(backend, "a")
    assert (task.status, task.available_at, task.finished_at, task.error) == (
        TaskStatus.CANCELLED,
        at(2),
        at(5),
        "E: x",
    )


async def test_settle_records_outcomes_then_claims(backend: Backend) -> None:
    await backend.enqueue([job("a"), job("b"), job("c", due=5)])
    await backend.claim(claim_req("w1", now=0, limit=1))
    settled = await backend.settle(
        [
            Finish("a", "w1", TaskStatus.SUCCESS, at(5)),
            Finish("ghost", "w1", TaskStatus.SUCCESS, at(5)),
        ],
        claim_req("w1", now=5, limit=5),
    )
    assert settled.accepted == [True, False]
    assert sorted(r.id for r in settled.claimed) == ["b", "c"]
    assert (await get(backend, "a")).status is TaskStatus.SUCCESS


async def test_settle_of_one_finish_records_it_then_claims(backend: Backend) -> None:
    # One finish and a claim: a worker's every settle at concurrency 1 (PostgreSQL
    # sends it as one statement).
    await backend.enqueue([job("a"), job("b", queue="mail"), job("c")])
    await backend.claim(claim_req("w1", now=0, limit=1))
    settled = await backend.settle(
        [Finish("a", "w1", TaskStatus.SUCCESS, at(1), result=b"done")],
        claim_req("w1", now=1, limit=1, queues=("mail",)),
    )
    assert settled.accepted == [True]
    assert [r.id for r in settled.claimed] == ["b"]
    task = await get(backend, "a")
    assert (task.status, task.result) == (TaskStatus.SUCCESS, b"done")

    ghost = await backend.settle(
        [Finish("ghost", "w1", TaskStatus.SUCCESS, at(2))], claim_req("w1", now=2)
    )
    assert ghost.accepted == [False]
    assert [r.id for r in ghost.claimed] == ["c"]
    stale = await backend.settle(
        [Finish("b", "other", TaskStatus.SUCCESS, at(3))], claim_req("w1", now=3)
    )
    assert stale.accepted == [False]


async def test_settle_finishing_a_job_whose_lease_ran_out_does_not_claim_it(
    backend: Backend,
) -> None:
    await backend.enqueue([job("a")])
    await backend.claim(claim_req("w1", now=0, limit=1))
    late = LEASE.total_seconds() + 1
    settled = await backend.settle(
        [Finish("a", "w1", TaskStatus.SUCCESS, at(late))], claim_req("w1", now=late)
    )
    assert (settled.accepted, settled.claimed) == ([True], [])
    assert (await get(backend, "a")).status is TaskStatus.SUCCESS


async def test_settle_of_many_finishes_records_each_exactly(backend: Backend) -> None:
    # Several finishes at once: a worker's settle at concurrency > 1, a consumer's
    # archive_many (PostgreSQL sends them as one statement, their values as JSON).
    await backend.enqueue([job(name) for name in "abcdef"])
    assert [r.id for r in await backend.claim(claim_req("w1", limit=4))] == list("abcd")
    assert [r.id for r in await backend.claim(claim_req("w2", limit=1))] == ["e"]
    late = LEASE.total_seconds() + 1
    error = 'ValueError: "quoted", \\ and ünïcode ☃\nover two lines'
    settled = await backend.settle(
        [
            Finish("d", "w1", TaskStatus.SUCCESS, at(late), result=bytes(range(256))),
            Finish("a", "w1", TaskStatus.FAILED, at(1.5), error=error, traceback="Trace\n"),
            Finish("e", "w1", TaskStatus.SUCCESS, at(1)),  # w2 holds it
            Finish("b", "w1", TaskStatus.CANCELLED, at(1), error="cancelled"),
            Finish("ghost", "w1", TaskStatus.SUCCESS, at(1)),
        ],
        None,
    )
    assert settled.accepted == [True, True, False, True, False]
    d, a, b = [await get(backend, name) for name in "dab"]
    assert (d.status, d.result, d.finished_at) == (
        TaskStatus.SUCCESS,
        bytes(range(256)),
        at(late),
    )
    assert (a.status, a.error, a.traceback, a.finished_at, a.result) == (
        TaskStatus.FAILED,
        error,
        "Trace\n",
        at(1.5),
        None,
    )
    assert (b.status, b.error) == (TaskStatus.CANCELLED, "cancelled")
    assert (await get(backend, "e")).status is TaskStatus.RUNNING

    # With a claim: the jobs being finished are not claimed, though their leases ran out.
    await backend.enqueue([job("g", due=late)])
    settled = await backend.settle(
        [
            Finish("c", "w1", TaskStatus.SUCCESS, at(late)),
            Finish("e", "w2", TaskStatus.SUCCESS, at(late)),
        ],
        claim_req("w2", now=late),
    )
    assert settled.accepted == [True, True]
    assert [r.id for r in settled.claimed] == ["f", "g"]
    for name in "ce":
        assert (await get(backend, name)).status is TaskStatus.SUCCESS


# -- cancel, requeue, delete -----------------------------------------------------------


async def test_cancel_pending_job_stops_it_from_running(backend: Backend) -> None:
    await backend.enqueue([job("a", due=30)])
    assert await backend.cancel("a", at(1))
    task = await get(backend, "a")
    assert (task.status, task.finished_at) == (TaskStatus.CANCELLED, at(1))
    assert await backend.claim(claim_req(now=60)) == []


async def test_cancel_running_job_flags_it_and_keeps_the_lease(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    await backend.claim(claim_req("w1"))
    assert await backend.cancel("a", at(1))
    assert (await get(backend, "a")).status is TaskStatus.RUNNING
    report = await backend.extend_leases("w1", ["a"], LEASE, at(2))
    assert report.cancel_requested == frozenset({"a"}) and report.lost == frozenset()
    assert await backend.finish(Finish("a", "w1", TaskStatus.CANCELLED, at(3)))
    assert (await get(backend, "a")).status is TaskStatus.CANCELLED


async def test_cancel_finished_or_unknown_job_is_false(backend: Backend) -> None:
    await backend.enqueue([job("a")])
    await backend.claim(claim_req("w1"))
    await backend.finish(Finish("a", "w1", TaskStatus.SUCCESS, at(1), result=b"r"))
    assert await backend.cancel("a", at(2)) is False
    assert await backend.cancel("unknown", at(2)) is False
    task = await get(backend, "a")
    assert (task.status, task.result) == (TaskStatus.SUCCESS, b"r")


async def test_requeue_makes_failed_and_cancelled_jobs_pending_with_fresh_attempts(
    backend: Backend,
) -> None:
    await backend.enqueue([job("failed", max_attempts=2), job("cancelled", due=100)])
    await backend.claim(claim_req("w1"))
    await backend.finish(Finish("failed", "w1", TaskStatus.FAILED, at(1), error="E: x"))
    await backend.cancel("cancelled", at(1))

    assert await backend.requeue("failed", at(5))
    task = await get(backend, "failed")
    assert (task.status, task.attempts, task.available_at) == (TaskStatus.PENDING, 0, at(5))
    # Nothing of the old run shows: it is a job that has not started.
    assert (task.started_at, task.finished_at, task.error) == (None, None, None)
    assert await backend.requeue("cancelled", at(5))
    assert {r.id for r in await backend.claim(claim_req("w2", now=5))} == {"failed", "cancelled"}


async def test_requeue_of_a_run_whose_series_lives_on_runs_it_once(backend: Backend) -> None:
    """A failed run's series continued when it failed: requeueing the run must not start
    a second series beside it. A cancelled series has stopped: requeueing its run
    starts it again, on a grid from the requeue."""
    hourly = timedelta(hours=1)
    await backend.enqueue([job("run1", interval=hourly), job("stopped", interval=hourly)])
    await backend.claim(claim_req("w1"))
    next_run = replace(job("run2", due=3600, interval=hourly), series_id="run1")
    failed = Finish("run1", "w1", TaskStatus.FAILED, at(1), error="E: x", next_run=next_run)
    assert await backend.finish(failed)
    assert await backend.finish(Finish("stopped", "w1", TaskStatus.CANCELLED, at(1)))

    assert await backend.requeue("run1", at(5))
    assert (await get(backend, "run1")).interval is None
    assert (await get(backend, "run2")).interval == hourly
    assert await backend.requeue("stopped", at(5))
    assert (await get(backend, "stopped")).interval == hourly
    reserved = {r.id: r for r in await backend.claim(claim_req("w2", now=5))}
    assert reserved.keys() == {"run1", "stopped"}
    assert reserved["run1"].interval is None
    assert (reserved["stopped"].interval, reserved["stopped"].scheduled_at) == (hourly, at(5))


async def test_requeue_refuses_pending_running_successful_and_unknown(backend: Backend) -> None:
    await backend.enqueue([job("pending", due=100), job("running"), job("done")])
    await backend.claim(claim_req("w1", now=0))
    await backend.finish(Finish("done", "w1", TaskStatus.SUCCESS, at(1)))
    for job_id in ("pending", "running", "done", "unknown"):
        assert await backend.requeue(job_id, at(2)) is False, job_id
    assert (await get(backend, "done")).status is TaskStatus.SUCCESS


async def test_delete_removes_a_job_in_any_state(backend: Backend) -> None:
    await backend.enqueue([job("pending"), job("running")])
    await backend.claim(claim_req("w1", limit=1))
    for job_id in ("pending", "running"):
        assert await backend.delete(job_id)
        assert await backend.get(job_id) is None
        assert await backend.delete(job_id) is False
    assert await backend.delete("unknown") is False


# -- inspection ------------------------------------------------------------------------


async def test_list_jobs_is_newest_first_and_filters(backend: Backend) -> None:
    await backend.enqueue([job("old", enqueued=1), job("mail", queue="mail", enqueued=2)])
    await backend.enqueue([job("msg", kind="message", enqueued=3), job("new", enqueued=4)])
    await backend.claim(claim_req("w1", limit=10))  # old, mail and new run
    await backend.finish(Finish("old", "w1", TaskStatus.SUCCESS, at(5)))

    assert [t.id for t in await backend.list_jobs(TaskQuery())] == ["new", "msg", "mail", "old"]
    assert [t.id for t in await backend.list_jobs(TaskQuery(limit=2))] == ["new", "msg"]
    assert [t.id for t in await backend.list_jobs(TaskQuery(kind="task"))] == [
        "new",
        "mail",
        "old",
    ]
    assert [t.id for t in await backend.list_jobs(TaskQuery(queue="mail"))] == ["mail"]
    success = await backend.list_jobs(TaskQuery(status=TaskStatus.SUCCESS))
    assert [t.id for t in success] == ["old"]
    running = await backend.list_jobs(TaskQuery(status=TaskStatus.RUNNING, kind="task"))
    assert [t.id for t in running] == ["new", "mail"]
    for task in await backend.list_jobs(TaskQuery()):
        assert_aware_utc(task.enqueued_at)
        assert_aware_utc(task.available_at)
        assert task.payload is None  # only when asked for


async def test_list_jobs_takes_a_set_of_ids(backend: Backend) -> None:
    await backend.enqueue([job("a"), job("b"), job("c", kind="message")])
    found = await backend.list_jobs(TaskQuery(ids=("a", "c", "unknown")))
    assert {task.id for task in found} == {"a", "c"}
    only_tasks = await backend.list_jobs(TaskQuery(ids=("a", "c"), kind="task"))
    assert [task.id for task in only_tasks] == ["a"]
    assert await backend.list_jobs(TaskQuery(ids=())) == []
    await backend.claim(claim_req("w1"))
    await backend.finish(Finish("a", "w1", TaskStatus.SUCCESS, at(1)))
    finished = TaskQuery(ids=("a", "b"), statuses=(TaskStatus.SUCCESS, TaskStatus.FAILED))
    assert [task.id for task in await backend.list_jobs(finished)] == ["a"]


async def test_list_jobs_returns_payloads_when_asked(backend: Backend) -> None:
    await backend.enqueue([job("a", kind="message"), job("b")])
    listed = await backend.list_jobs(TaskQuery(payloads=True))
    assert {t.id: t.payload for t in listed} == {"a": b"payload-a", "b": b"payload-b"}
    assert (await get(backend, "a")).payload is None


async def test_queue_stats_counts_scheduled_and_oldest_pending(backend: Backend) -> None:
    await backend.enqueue(
        [
            job("due-1", queue="b", due=3),
            job("due-2", queue="b", due=1),
            job("future", queue="b", due=100),
            job("runs", queue="a", due=0),
            job("done", queue="a", due=0),
        ]
    )
    await backend.claim(claim_req("w1", now=0, queues=("a",)))
    await backend.finish(Finish("done", "w1", TaskStatus.SUCCESS, at(1)))

    stats = await backend.queue_stats(at(9))  # before the lease of "runs" ends
    assert [s.queue for s in stats] == ["a", "b"]
    a, b = stats
    assert a.counts.get(TaskStatus.RUNNING) == 1 and a.counts.get(TaskStatus.SUCCESS) == 1
    assert a.counts.get(TaskStatus.PENDING, 0) == 0
    assert (a.scheduled, a.pending, a.oldest_pending_at) == (0, 0, None)
    assert b.counts.get(TaskStatus.PENDING) == 3
    assert (b.scheduled, b.pending) == (1, 2)
    assert b.oldest_pending_at == at(1)
    assert_aware_utc(b.oldest_pending_at)
    # Later on, the scheduled job has come due too.
    later = {s.queue: s for s in await backend.queue_stats(at(200))}
    assert (later["b"].scheduled, later["b"].pending) == (0, 3)


async def test_queue_stats_count_an_expired_lease_as_claimable_again(backend: Backend) -> None:
    # A job whose worker or consumer let its lease run out is what the next claim
    # takes: metrics must call it pending, waiting since its lease ended.
    await backend.enqueue([job("lapsed", due=0), job("held", due=0), job("waits", due=50)])
    assert [t.id for t in await backend.claim(claim_req("w1", now=0, limit=1))] == ["lapsed"]
    assert [t.id for t in await backend.claim(claim_req("w2", now=8, limit=1))] == ["held"]
    moment = at(15)  # lapsed's lease ended at 10; held's runs to 18

    (stats,) = await backend.queue_stats(moment)
    assert stats.counts.get(TaskStatus.RUNNING) == 2
    assert (stats.expired, stats.running, stats.pending, stats.scheduled) == (1, 1, 1, 1)
    assert stats.oldest_pending_at == at(0) + LEASE
    metrics = metrics_from(stats, moment)
    assert (metrics.pending, metrics.running) == (1, 1)
    assert metrics.oldest_pending_age == timedelta(seconds=5)
    # The claim that metrics announce is there to take.
    assert [t.id for t in await backend.claim(claim_req("w3", now=15))] == ["lapsed"]


async def test_queue_stats_of_an_empty_store_is_empty(backend: Backend) -> None:
    assert await backend.queue_stats(at(0)) == []


async def test_next_due_is_the_earliest_pending_time_or_lease_end(backend: Backend) -> None:
    assert await backend.next_due("task", None) is None
    await backend.enqueue(
        [
            job("running", due=0),
            job("later", due=50),
            job("sooner", due=20, queue="q2"),
            job("message", due=5, kind="message"),
        ]
    )
    await backend.claim(claim_req("w1", now=0, limit=1))  # "running" is no longer pending
    # ... but claimable again when its lease ends, at 10, should its worker die.
    due = await backend.next_due("task", None)
    assert due == at(10)
    assert_aware_utc(due)
    assert await backend.next_due("task", ("q2",)) == at(20)
    assert await backend.next_due("task", ("nothing-here",)) is None
    assert await backend.next_due("message", None) == at(5)
    finish = Finish("running", "w1", TaskStatus.SUCCESS, at(1))
    assert (await backend.settle([finish], None)).accepted == [True]
    assert await backend.next_due("task", ("default",)) == at(50)


async def test_purge_removes_only_old_finished_jobs_in_the_given_statuses(
    backend: Backend,
) -> None:
    await backend.enqueue(
        [job("old-ok"), job("old-failed"), job("new-ok"), job("running"), job("pending", due=99)]
    )
    await backend.claim(claim_req("w1", now=0))
    await backend.finish(Finish("old-ok", "w1", TaskStatus.SUCCESS, at(1)))
    await backend.finish(Finish("old-failed", "w1", TaskStatus.FAILED, at(1)))
    await backend.finish(Finish("new-ok", "w1", TaskStatus.SUCCESS, at(50)))

    assert await backend.purge(at(10), [TaskStatus.SUCCESS]) == 1
    assert await backend.get("old-ok") is None
    assert await backend.get("old-failed") is not None
    assert await backend.purge(at(10), [TaskStatus.SUCCESS, TaskStatus.FAILED]) == 1
    assert await backend.purge(at(10), []) == 0
    remaining = {t.id for t in await backend.list_jobs(TaskQuery())}
    assert remaining == {"new-ok", "running", "pending"}


async def test_purge_with_a_limit_deletes_at_most_that_many(backend: Backend) -> None:
    await backend.enqueue([job(f"done{n}") for n in range(5)])
    await backend.claim(claim_req("w1", now=0))
    for n in range(5):
        await backend.finish(Finish(f"done{n}", "w1", TaskStatus.SUCCESS, at(1)))
    success = [TaskStatus.SUCCESS]
    assert [await backend.purge(at(10), success, 2) for _ in range(4)] == [2, 2, 1, 0]
    assert await backend.list_jobs(TaskQuery()) == []


# -- through the public API -------------------------------------------------------------
# The same calls on every backend give the same observable outcome (found by running
# random sequences of calls on the three backends side by side).


async def _fails_at_once() -> None:
    raise ValueError("no luck")


async def test_a_burst_drains_a_retry_that_a_task_finishing_during_a_claim_made_due(
    backend: Backend,
) -> None:
    # A task that finished while the worker's claim was in flight (on PostgreSQL the
    # event loop runs tasks during the round trip) left the burst with nothing
    # running: it ended there, its retry, due at once, left pending.
    clock = FakeClock()
    queue = TaskQueue(backend, clock=clock)
    policy = RetryPolicy(max_retries=2, backoff=0, jitter=False)
    task_id = await queue.enqueue(_fails_at_once, retry=policy)
    worker = Worker(backend, max_concurrency=2, clock=clock)
    assert await asyncio.wait_for(worker.serve(burst=True), 10) == 3
    task = await queue.get_task(task_id)
    assert task is not None
    assert (task.status, task.attempts) == (TaskStatus.FAILED, 3)


async def test_messages_whose_timeouts_ran_out_are_dequeued_again_oldest_first(
    backend: Backend,
) -> None:
    # Three messages enqueued together are equally old: the first enqueued goes first.
    # SQLite chose among timed-out ones by when their timeouts ran out instead.
    clock = FakeClock()
    await Producer(backend, "jobs", clock=clock).enqueue_many([0, 1, 2])
    slow = Consumer(backend, "jobs", visibility_timeout=30, clock=clock)
    fast = Consumer(backend, "jobs", visibility_timeout=5, clock=clock)
    held = [*await slow.dequeue(), *await fast.dequeue(), *await fast.dequeue()]
    assert [message.payload for message in held] == [0, 1, 2]
    clock.advance(31)
    again = Consumer(backend, "jobs", clock=clock)
    assert [[m.payload for m in await again.dequeue()] for _ in range(3)] == [[0], [1], [2]]


async def test_a_message_going_dead_leaves_its_slot_to_the_oldest_visible_one(
    backend: Backend,
) -> None:
    # SQLite let only as many timed-out messages compete as the batch had slots: the
    # one that went dead took its slot from the older timed-out message, and a newer
    # message was handed out first.
    clock = FakeClock()
    await Producer(backend, "jobs", max_deliveries=1, clock=clock).enqueue("dies")
    clock.advance(1)
    producer = Producer(backend, "jobs", clock=clock)
    await producer.enqueue("older")
    held = await Consumer(backend, "jobs", visibility_timeout=5, clock=clock).dequeue(2)
    assert [message.payload for message in held] == ["dies", "older"]
    await producer.enqueue("newer")
    clock.advance(10)
    again = Consumer(backend, "jobs", clock=clock)
    assert [message.payload for message in await again.dequeue()] == ["older"]
    assert [dead.payload for dead in await again.dead_letters()] == ["dies"]


def test_sqlite_backend_takes_only_a_file_path(tmp_path: Path) -> None:
    # str(None) would open a file named "None": an unset setting must not do that.
    for path in (None, 5, b"sitq.db"):
        with pytest.raises(ValidationError, match="path must be a str"):
            SQLiteBackend(path)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="needs a file"):
        SQLiteBackend(":memory:")
    # A directory was accepted and failed at open; "sub/" made a file named sub; NUL
    # raised a bare ValueError at open.
    for path in ("", ".", str(tmp_path), f"{tmp_path}/sub/", "a\x00b.db"):
        with pytest.raises(ValidationError, match="path must name a file"):
            SQLiteBackend(path)
    assert not (tmp_path / "sub").exists()
    assert SQLiteBackend(tmp_path / "a.db").path == SQLiteBackend(str(tmp_path / "a.db")).path


def test_an_sqlite_path_that_cannot_be_resolved_is_a_backend_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative path once the current directory was deleted raised a bare
    # FileNotFoundError; a symlink loop or an unknown ~user, a bare RuntimeError.
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(BackendError, match=r"'tasks\.db': the current directory no longer exists"):
        SQLiteBackend("tasks.db")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(BackendError, match=r"cannot open SQLite database '.*/a/tasks\.db'"):
        SQLiteBackend(tmp_path / "a" / "tasks.db")
    with pytest.raises(BackendError, match=r"'~no-such-user-here/tasks\.db'"):
        SQLiteBackend("~no-such-user-here/tasks.db")


def _vm_steps_from_now(backend: SQLiteBackend) -> Callable[[], int]:
    """The SQLite VM steps, in hundreds, run on this thread's connection from now on:
    how much a statement read, counted rather than timed."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    backend._connection().set_progress_handler(count, 100)
    return lambda: steps


async def test_an_sqlite_claim_for_one_queue_reads_no_other_queue_s_due_jobs(
    tmp_path: Path,
) -> None:
    # A claim (and next_due) for some queues filtered sitq_jobs_due by queue, so it
    # read every due job of other queues ahead of its own, under the write lock: with
    # 200,000 due in one queue, each claim of a consumer or worker of another queue
    # took 70 ms, and their claims on every commit cut the busy queue's workers from
    # 5,800 to 41 tasks/s. Counted in SQLite VM steps: no timing to be flaky.
    backend = SQLiteBackend(tmp_path / "queues.db")
    await backend.open()
    try:
        await backend.enqueue([job(queue="bulk") for _ in range(5_000)])
        await backend.enqueue([job("mine", queue="emails", due=1)])
        steps = _vm_steps_from_now(backend)
        claimed = await backend.claim(claim_req(now=10, limit=1, queues=("emails",)))
        assert [reserved.id for reserved in claimed] == ["mine"]
        assert await backend.claim(claim_req(now=10, limit=1, queues=("emails",))) == []
        assert await backend.next_due("task", ("emails",)) == at(10) + LEASE
        assert steps() < 20, f"{steps() * 100} VM steps: other queues' jobs were read"
    finally:
        await backend.close()


async def test_an_sqlite_claim_for_several_queues_reads_no_other_queue_s_due_jobs(
    tmp_path: Path,
) -> None:
    # With one index range per queue a claim for one queue was cheap; for several,
    # queue IN (...) kept SQLite on sitq_jobs_due, reading every due job of other
    # queues ahead of theirs under the write lock (4 idle workers of "emails,sms"
    # held a busy queue's workers to 70 tasks/s, with 200,000 due in it).
    backend = SQLiteBackend(tmp_path / "queues.db")
    await backend.open()
    try:
        await backend.enqueue([job(queue="bulk") for _ in range(5_000)])
        await backend.enqueue(
            [
                job("email-2", queue="emails", due=2),
                job("sms-1", queue="sms", due=1),
                job("email-3a", queue="emails", due=3),
                job("sms-3b", queue="sms", due=3),
                job("email-3c", queue="emails", due=3),
            ]
        )
        steps = _vm_steps_from_now(backend)
        served = ("emails", "sms", "none-here", "emails")  # named twice: taken once
        claimed = await backend.claim(claim_req(now=10, limit=4, queues=served))
        # Due order across the queues, then enqueue order.
        assert [reserved.id for reserved in claimed] == ["sms-1", "email-2", "email-3a", "sms-3b"]
        claimed = await backend.claim(claim_req(now=10, limit=4, queues=served))
        assert [reserved.id for reserved in claimed] == ["email-3c"]
        assert steps() < 20, f"{steps() * 100} VM steps: other queues' jobs were read"
    finally:
        await backend.close()


async def test_an_sqlite_backend_opened_again_after_its_file_was_deleted_creates_it(
    tmp_path: Path,
) -> None:
    # The schema was checked once per backend object: a file deleted between a close
    # and the next open (a reset) came back without tables, "no such table" until a
    # restart.
    path = tmp_path / "sitq.db"
    backend = SQLiteBackend(path)
    await backend.open()
    await backend.enqueue([job("before")])
    await backend.close()
    remove_sqlite_files(path)
    await backend.open()
    try:
        await backend.enqueue([job("after")])
        assert [task.id for task in await backend.list_jobs(TaskQuery())] == ["after"]
    finally:
        await backend.close()


async def test_an_sqlite_wal_file_is_cut_back_after_a_large_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The -wal file kept the size of the largest write for as long as the database
    # was open anywhere: 60-130 MB after an enqueue_many of 100,000 calls.
    import sitq.backends.sqlite

    monkeypatch.setattr(sitq.backends.sqlite, "WAL_SIZE_LIMIT_BYTES", 256 * 1024)
    path = tmp_path / "sitq.db"
    wal = tmp_path / "sitq.db-wal"
    backend = SQLiteBackend(path)
    await backend.open()
    try:
        big = [replace(job(), payload=bytes(4096)) for _ in range(1000)]
        await backend.enqueue(big)
        assert wal.stat().st_size > 4 * 1024 * 1024
        # SQLite starts the -wal over at a write after a checkpoint that copied it all
        # (its automatic one, at the commit of a write past 1,000 pages).
        for _ in range(3):
            await backend.enqueue([job()])
        assert wal.stat().st_size <= 256 * 1024
    finally:
        await backend.close()


async def test_an_sqlite_file_newer_than_this_sitq_opens_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "newer.db"
    first = SQLiteBackend(path)
    await first.open()
    await first.close()
    newer = len(SQLITE_MIGRATIONS) + 1
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {newer}")
    backend = SQLiteBackend(path)
    with caplog.at_level("WARNING", logger="sitq.sqlite"):
        await backend.open()
        # Another thread's connection (a sync client's, say) warned again, and each
        # one after it: once per backend object is enough.
        await asyncio.to_thread(backend._connection)
    assert caplog.text.count(f"schema version {newer}, newer than this sitq knows") == 1
    await backend.close()


async def test_an_sqlite_write_that_fails_says_why_not_that_it_could_not_roll_back(
    tmp_path: Path,
) -> None:
    # SQLite rolls back by itself when the disk is full; the ROLLBACK after it failed
    # "no transaction is active", and that was the error reported. A full disk is
    # the storage's state, not the call's fault: the same call succeeds once there is
    # room, so the error says the storage is unavailable.
    backend = SQLiteBackend(tmp_path / "full.db")
    await backend.open()
    try:
        conn = backend._connection()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL, as a full disk
        big = [replace(job(), payload=b"x" * 100_000) for _ in range(2)]
        with pytest.raises(StorageUnavailableError, match="database or disk is full"):
            await backend.enqueue(big)
        conn.execute("PRAGMA max_page_count = 1073741823")
        await backend.enqueue(big)
        assert len(await backend.list_jobs(TaskQuery())) == 2
    finally:
        await backend.close()


class _RollbackFails(sqlite3.Connection):
    """A connection whose ROLLBACK fails, once the test says so."""

    fail = False

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        if self.fail and sql == "ROLLBACK":
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, parameters)


async def test_an_sqlite_rollback_that_fails_hides_nothing_and_leaves_no_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect = sqlite3.connect
    monkeypatch.setattr(
        sqlite3, "connect", lambda *args, **kwargs: connect(*args, **kwargs, factory=_RollbackFails)
    )
    backend = SQLiteBackend(tmp_path / "sitq.db")
    await backend.open()
    try:
        await backend.enqueue([job("taken")])
        _RollbackFails.fail = True
        with pytest.raises(BackendError, match="UNIQUE constraint failed"):
            await backend.enqueue([job("new"), job("taken")])
        _RollbackFails.fail = False
        # The connection left in its transaction made every later write fail "cannot
        # start a transaction within a transaction".
        await backend.enqueue([job("next"), job("after")])
        assert {task.id for task in await backend.list_jobs(TaskQuery())} == {
            "taken",
            "next",
            "after",
        }
    finally:
        _RollbackFails.fail = False
        await backend.close()
