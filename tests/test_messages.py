"""Messages (spec 002): producers, consumers, visibility, dead letters, metrics.

Every test runs on every backend through the ``backend`` fixture. Time is a
``FakeClock`` wherever a timeout or delay matters, so nothing waits for real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from helpers import wait_until
from sitq import (
    BackendError,
    Consumer,
    FakeClock,
    LeaseLostError,
    Message,
    Producer,
    SerializationError,
    TaskNotFoundError,
    TaskQueue,
    TaskStatus,
    ValidationError,
)
from sitq.backends.base import Backend, NewJob, TaskQuery
from sitq.json_payload import MAX_PAYLOAD_DEPTH

VT = 30  # the visibility timeout most tests use, in seconds


def make(
    backend: Backend, clock: FakeClock, *, max_deliveries: int | None = None
) -> tuple[Producer, Consumer]:
    producer = Producer(backend, "jobs", max_deliveries=max_deliveries, clock=clock)
    return producer, Consumer(backend, "jobs", VT, name="c1", clock=clock)


async def stored_messages(backend: Backend) -> list[str]:
    return [job.id for job in await backend.list_jobs(TaskQuery(kind="message"))]


async def status_of(backend: Backend, job_id: str) -> TaskStatus | None:
    job = await backend.get(job_id)
    return None if job is None else job.status


# -- producing -------------------------------------------------------------------------


async def test_json_payload_round_trips_with_message_fields(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    payload = {"type": "reminder", "ids": [1, 2.5, None, True], "text": "héllo ✓", "n": {}}

    message_id = await producer.enqueue(payload)
    (message,) = await consumer.dequeue()

    assert message == Message(
        id=message_id,
        queue="jobs",
        payload=payload,
        enqueued_at=clock.now(),
        visible_at=clock.now(),
        read_count=1,
    )
    assert message.visible_at.utcoffset() == timedelta(0)


async def test_enqueue_many_stores_all_in_order(backend: Backend) -> None:
    producer, consumer = make(backend, FakeClock())
    ids = await producer.enqueue_many([{"n": n} for n in range(5)])

    assert len(set(ids)) == 5
    assert await producer.enqueue_many([]) == []
    got = await consumer.dequeue(batch_size=10)
    assert sorted(m.payload["n"] for m in got) == list(range(5))
    assert {m.id for m in got} == set(ids)


@pytest.mark.parametrize(
    "payload",
    [
        math.nan,
        {"x": math.inf},
        {1: "int key"},
        (1, 2),
        {"when": object()},
        [b"bytes"],
        {"s": {1, 2}},
    ],
    ids=["nan", "inf", "int-key", "tuple", "object", "bytes", "set"],
)
async def test_non_json_payload_is_rejected_and_nothing_stored(
    backend: Backend, payload: Any
) -> None:
    producer, _ = make(backend, FakeClock())

    with pytest.raises(SerializationError):
        await producer.enqueue(payload)
    with pytest.raises(SerializationError):
        await producer.enqueue_delayed(payload, 5)
    with pytest.raises(SerializationError):
        await producer.enqueue_many([{"fine": 1}, payload])

    assert await stored_messages(backend) == []


async def test_circular_payload_is_rejected(backend: Backend) -> None:
    producer, _ = make(backend, FakeClock())
    loop: list[Any] = []
    loop.append(loop)

    with pytest.raises(SerializationError, match="circular"):
        await producer.enqueue(loop)
    assert await stored_messages(backend) == []


def nested(depth: int) -> list[Any]:
    payload: list[Any] = []
    for _ in range(depth - 1):
        payload = [payload]
    return payload


async def test_payload_depth_is_a_fixed_limit_whatever_the_callers_stack(
    backend: Backend,
) -> None:
    producer, consumer = make(backend, FakeClock())

    async def from_deep_in_the_stack(frames: int, payload: Any) -> str:
        if frames:
            return await from_deep_in_the_stack(frames - 1, payload)
        return await producer.enqueue(payload)

    deepest = nested(MAX_PAYLOAD_DEPTH)
    message_id = await from_deep_in_the_stack(300, deepest)
    with pytest.raises(SerializationError, match=f"more than {MAX_PAYLOAD_DEPTH} deep"):
        await producer.enqueue(nested(MAX_PAYLOAD_DEPTH + 1))
    assert await stored_messages(backend) == [message_id]
    (message,) = await consumer.dequeue()
    assert message.payload == deepest


async def test_a_stored_payload_too_deep_to_read_goes_to_the_dead_letters(
    backend: Backend,
) -> None:
    # Written by something other than sitq: deeper than Python's parser can recurse.
    clock = FakeClock()
    _, consumer = make(backend, clock)
    now = clock.now()
    deep = b"[" * 100_000 + b"]" * 100_000
    await backend.enqueue(
        [
            NewJob(name, "jobs", "message", body, enqueued_at=now, available_at=now)
            for name, body in (("deep", deep), ("fine", b"{}"))
        ]
    )

    # The rest of the batch is delivered; the unreadable one is dead, not stuck.
    assert [m.id for m in await consumer.dequeue(batch_size=2)] == ["fine"]
    (dead,) = await consumer.dead_letters()
    assert dead.id == "deep" and dead.error == "stored JSON is nested too deeply to read"
    assert dead.payload == deep


async def test_a_consumer_of_another_queue_with_the_same_name_cannot_settle_its_messages(
    backend: Backend,
) -> None:
    clock = FakeClock()
    message_id = await Producer(backend, "emails", clock=clock).enqueue({"to": "ada"})
    emails = Consumer(backend, "emails", VT, name="worker-1", clock=clock)
    sms = Consumer(backend, "sms", VT, name="worker-1", clock=clock)
    (held,) = await emails.dequeue()

    assert await sms.archive(held.id) is False
    with pytest.raises(TaskNotFoundError):
        await sms.extend_visibility(held.id, 60)
    assert await sms.release(held.id) is False
    assert await status_of(backend, message_id) is TaskStatus.RUNNING
    assert await emails.archive(held.id) is True


async def test_the_task_api_does_not_act_on_messages(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    message_id = await producer.enqueue({"n": 1})
    tasks = TaskQueue(backend, clock=clock)

    assert await tasks.get_task(message_id) is None
    assert await tasks.get_result(message_id, timeout=5) is None
    assert await tasks.cancel(message_id) is False
    # Still there for its consumer, and once archived, not the task API's to re-queue.
    (held,) = await consumer.dequeue()
    assert held.id == message_id and await consumer.archive(message_id)
    assert await tasks.retry(message_id) is False
    assert await status_of(backend, message_id) is TaskStatus.SUCCESS


async def test_bad_arguments_raise_validation_errors_and_store_nothing(backend: Backend) -> None:
    producer, consumer = make(backend, FakeClock())

    for delay in (-1, math.nan, "5", True):
        with pytest.raises(ValidationError):
            await producer.enqueue_delayed({"a": 1}, delay)  # type: ignore[arg-type]
    for size in (0, -3, True, 1.5, 2**31):
        with pytest.raises(ValidationError):
            await consumer.dequeue(batch_size=size)  # type: ignore[arg-type]
    for queue in ("", None, 7):
        with pytest.raises(ValidationError):
            Producer(backend, queue)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            Consumer(backend, queue)  # type: ignore[arg-type]
    for timeout in (0, -1, 0.01):
        with pytest.raises(ValidationError):
            Consumer(backend, "jobs", timeout)
    with pytest.raises(ValidationError):
        Producer(backend, "jobs", max_deliveries=0)
    with pytest.raises(ValidationError):
        Producer("not a backend", "jobs")  # type: ignore[arg-type]
    for not_a_list in ({"a": 1}, "abc", b"abc", bytearray(b"ab"), memoryview(b"ab")):
        with pytest.raises(ValidationError):
            await producer.enqueue_many(not_a_list)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await consumer.release("x", delay=-1)
    with pytest.raises(ValidationError):
        await consumer.extend_visibility("x", 0)

    assert await stored_messages(backend) == []


async def test_out_of_range_arguments_are_rejected_alike_on_every_backend(
    backend: Backend,
) -> None:
    producer, consumer = make(backend, FakeClock())
    # Past about 100 years a duration would overflow datetime arithmetic.
    with pytest.raises(ValidationError, match="delay_seconds must be at most"):
        await producer.enqueue_delayed({}, 1e12)
    with pytest.raises(ValidationError, match="delay must be at most"):
        await consumer.release("x", delay=1e12)
    with pytest.raises(ValidationError, match="seconds must be at most"):
        await consumer.extend_visibility("x", 1e12)
    with pytest.raises(ValidationError, match="visibility_timeout must be at most"):
        Consumer(backend, "jobs", 1e12)
    # Delivery counts are PostgreSQL integers.
    for limit in (2**31, 0):
        with pytest.raises(ValidationError, match="max_deliveries must be between 1 and"):
            Producer(backend, "jobs", max_deliveries=limit)
    # NUL: PostgreSQL's text refuses it; a lone surrogate: UTF-8 cannot encode it.
    for text in ("a\x00b", "a\ud800"):
        with pytest.raises(ValidationError, match="queue"):
            Producer(backend, text)
        with pytest.raises(ValidationError, match="queue"):
            Consumer(backend, text)
        with pytest.raises(ValidationError, match="name"):
            Consumer(backend, "jobs", name=text)
    # Holders join name, kind and queue with \x1f: one in a name let the consumer
    # "a\x1fmessage:y" of queue x settle what the consumer "a" of queue y held.
    with pytest.raises(ValidationError, match="name must not contain control characters"):
        Consumer(backend, "x", name="a\x1fmessage:y")
    for clock in (FakeClock, "utc"):  # a class was accepted and failed at first use
        with pytest.raises(ValidationError, match="clock must be an object with now"):
            Producer(backend, "jobs", clock=clock)  # type: ignore[arg-type]
    for message_id in (123, None, "a\x00", "\ud800"):
        for call in (
            consumer.archive,
            consumer.delete,
            consumer.requeue,
            consumer.release,
            lambda message_id: consumer.archive_many([message_id]),
            lambda message_id: consumer.extend_visibility(message_id, 5),
        ):
            with pytest.raises(ValidationError, match="message_id"):
                await call(message_id)
    assert await stored_messages(backend) == []
    limit_id = await Producer(backend, "jobs", max_deliveries=2**31 - 1).enqueue({})
    assert await status_of(backend, limit_id) is TaskStatus.PENDING


# -- visibility --------------------------------------------------------------------------


async def test_delayed_message_is_hidden_until_its_delay_passes(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    message_id = await producer.enqueue_delayed({"later": True}, delay_seconds=60)

    assert await consumer.dequeue() == []
    clock.advance(59)
    assert await consumer.dequeue() == []
    clock.advance(1)
    (message,) = await consumer.dequeue()

    assert message.id == message_id
    assert message.visible_at == message.enqueued_at + timedelta(seconds=60)


async def test_expired_visibility_hands_the_message_out_again(backend: Backend) -> None:
    clock = FakeClock()
    producer, first = make(backend, clock)
    second = Consumer(backend, "jobs", VT, name="c2", clock=clock)
    message_id = await producer.enqueue({"k": 1})

    (taken,) = await first.dequeue()
    assert taken.read_count == 1
    clock.advance(VT - 1)
    assert await second.dequeue() == []

    clock.advance(2)  # the first consumer's timeout ran out: no admin step needed
    (again,) = await second.dequeue()

    assert (again.id, again.read_count, again.payload) == (message_id, 2, {"k": 1})
    assert await first.archive(message_id) is False  # it lost the message
    assert await second.archive(message_id) is True
    assert await status_of(backend, message_id) is TaskStatus.SUCCESS


async def test_extend_visibility_keeps_the_message_hidden(backend: Backend) -> None:
    clock = FakeClock()
    producer, first = make(backend, clock)
    second = Consumer(backend, "jobs", VT, name="c2", clock=clock)
    message_id = await producer.enqueue({"slow": True})
    await first.dequeue()

    clock.advance(20)
    hidden_until = await first.extend_visibility(message_id, 30)
    assert hidden_until == clock.now() + timedelta(seconds=30)

    clock.advance(25)  # past the original timeout, inside the extended one
    assert await second.dequeue() == []
    clock.advance(6)
    (again,) = await second.dequeue()
    assert again.read_count == 2

    with pytest.raises(LeaseLostError):
        await first.extend_visibility(message_id, 30)
    with pytest.raises(TaskNotFoundError):
        await first.extend_visibility("no-such-id", 30)
    # A message of another queue is not found here either, as for delete and requeue.
    elsewhere = await Producer(backend, "other", clock=clock).enqueue({})
    with pytest.raises(TaskNotFoundError):
        await first.extend_visibility(elsewhere, 30)


async def test_release_with_delay_counts_the_read(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    other = Consumer(backend, "jobs", VT, name="c2", clock=clock)
    message_id = await producer.enqueue({"retry": "me"})
    await consumer.dequeue()

    assert await other.release(message_id) is False  # not its message
    assert await consumer.release(message_id, delay=10) is True
    assert await consumer.release(message_id) is False  # no longer held
    assert await status_of(backend, message_id) is TaskStatus.PENDING

    clock.advance(9)
    assert await consumer.dequeue() == []
    clock.advance(1)
    (again,) = await consumer.dequeue()
    assert (again.id, again.read_count) == (message_id, 2)
    assert again.visible_at == clock.now()


async def test_archive_keeps_the_message_as_success(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    message_id = await producer.enqueue({"done": "soon"})
    await consumer.dequeue()

    assert await consumer.archive(message_id) is True
    assert await consumer.archive(message_id) is False
    assert await consumer.dequeue() == []
    stored = await backend.get(message_id)
    assert stored is not None
    assert (stored.status, stored.kind, stored.finished_at) == (
        TaskStatus.SUCCESS,
        "message",
        clock.now(),
    )
    assert (await consumer.metrics()).archived == 1


async def test_archive_many_archives_what_it_holds_in_one_call(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    ids = await producer.enqueue_many([{"n": n} for n in range(4)])
    held = [message.id for message in await consumer.dequeue(batch_size=3)]
    assert held == ids[:3]

    assert await consumer.archive_many([held[2], "no-such-id", ids[3], held[0]]) == [
        True,
        False,
        False,  # enqueued but never dequeued: not held
        True,
    ]
    assert [await status_of(backend, i) for i in ids] == [
        TaskStatus.SUCCESS,
        TaskStatus.RUNNING,
        TaskStatus.SUCCESS,
        TaskStatus.PENDING,
    ]
    assert await consumer.archive_many([]) == []
    assert (await consumer.metrics()).archived == 2


async def test_archive_many_rejects_a_str_and_repeated_ids(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    message_id = await producer.enqueue({"n": 1})
    await consumer.dequeue()
    with pytest.raises(ValidationError, match="iterable of message ids"):
        await consumer.archive_many(message_id)
    with pytest.raises(ValidationError, match="more than once"):
        await consumer.archive_many([message_id, message_id])
    assert await status_of(backend, message_id) is TaskStatus.RUNNING


async def test_delete_cancels_a_scheduled_message_no_one_holds(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    message_id = await producer.enqueue_delayed({"cancel": "me"}, delay_seconds=3600)

    assert await consumer.delete(message_id) is True
    assert await backend.get(message_id) is None
    clock.advance(3600)
    assert await consumer.dequeue() == []
    assert await consumer.delete(message_id) is False
    assert await consumer.delete("no-such-id") is False


async def test_delete_works_on_held_messages_but_not_on_other_queues(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    elsewhere = await Producer(backend, "other", clock=clock).enqueue({"q": "other"})
    task_id = await TaskQueue(backend, clock=clock, default_queue="jobs").enqueue(print)
    held = await producer.enqueue({"held": True})
    holder = Consumer(backend, "jobs", VT, name="c2", clock=clock)
    await holder.dequeue()

    assert await consumer.delete(held) is True  # whoever holds it
    assert await holder.archive(held) is False
    assert await consumer.delete(elsewhere) is False
    assert await consumer.delete(task_id) is False
    assert await backend.get(elsewhere) is not None
    assert await backend.get(task_id) is not None


# -- dead letters ------------------------------------------------------------------------


async def test_message_read_too_often_is_dead_then_requeued(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock, max_deliveries=2)
    message_id = await producer.enqueue({"poison": True})

    for read in (1, 2):
        (message,) = await consumer.dequeue()
        assert message.read_count == read
        clock.advance(VT + 1)  # the consumer "crashed": its timeout runs out

    assert await consumer.dequeue() == []  # a third read is not allowed
    assert await status_of(backend, message_id) is TaskStatus.DEAD
    (dead,) = await consumer.dead_letters()
    assert (dead.id, dead.queue, dead.read_count) == (message_id, "jobs", 2)
    assert dead.payload == {"poison": True}
    assert dead.error is not None and "2 times" in dead.error
    assert dead.died_at == clock.now()
    assert (await consumer.metrics()).dead == 1
    assert await Consumer(backend, "other", clock=clock).dead_letters() == []

    assert await Consumer(backend, "other", clock=clock).requeue(message_id) is False
    assert await consumer.requeue(message_id) is True
    assert await consumer.requeue(message_id) is False  # no longer dead
    assert await consumer.dead_letters() == []
    (revived,) = await consumer.dequeue()
    assert (revived.id, revived.read_count, revived.payload) == (message_id, 1, {"poison": True})


async def test_messages_turning_dead_do_not_shorten_a_dequeue(backend: Backend) -> None:
    """Messages whose last allowed read ran out are moved to the dead letters by the
    dequeue that finds them; the batch is still filled from the visible ones."""
    clock = FakeClock()
    producer, consumer = make(backend, clock, max_deliveries=1)
    await producer.enqueue_many([{"poison": 1}, {"poison": 2}])
    assert len(await consumer.dequeue(batch_size=2)) == 2
    clock.advance(VT + 1)  # the consumer "crashed" with both
    fresh = await producer.enqueue_many([{"fresh": n} for n in range(3)])

    batch = await consumer.dequeue(batch_size=3)
    assert [m.id for m in batch] == fresh
    assert len(await consumer.dead_letters()) == 2


async def test_released_message_also_dies_after_max_deliveries(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock, max_deliveries=3)
    message_id = await producer.enqueue({"fails": "always"})

    for _ in range(3):
        (message,) = await consumer.dequeue()
        assert await consumer.release(message.id) is True

    assert await consumer.dequeue() == []
    assert await status_of(backend, message_id) is TaskStatus.DEAD


async def test_unreadable_payload_goes_to_the_dead_letters(backend: Backend) -> None:
    clock = FakeClock()
    _, consumer = make(backend, clock)
    now = clock.now()
    await backend.enqueue(
        [NewJob("bad", "jobs", "message", b"\xff not json", enqueued_at=now, available_at=now)]
    )

    assert await consumer.dequeue() == []
    (dead,) = await consumer.dead_letters()
    assert (dead.id, dead.payload) == ("bad", b"\xff not json")
    assert dead.error is not None and "JSON" in dead.error


# -- metrics -----------------------------------------------------------------------------


async def test_metrics_count_states_and_the_oldest_pending_age(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    await producer.enqueue_many([{"n": 1}, {"n": 2}])  # t = 0
    clock.advance(5)
    await producer.enqueue({"n": 3})  # t = 5
    await producer.enqueue_delayed({"n": 4}, 100)
    await TaskQueue(backend, clock=clock, default_queue="jobs").enqueue(print)  # a task too
    (held,) = await consumer.dequeue()
    await Producer(backend, "other", clock=clock).enqueue({"n": 5})

    metrics = await consumer.metrics()
    assert (metrics.queue, metrics.pending, metrics.scheduled, metrics.running) == (
        "jobs",
        3,
        1,
        1,
    )
    assert (metrics.archived, metrics.dead, metrics.failed, metrics.cancelled) == (0, 0, 0, 0)
    assert metrics.oldest_pending_age == timedelta(seconds=5)

    await consumer.archive(held.id)
    clock.advance(10)
    later = await producer.metrics()
    assert (later.pending, later.running, later.archived) == (3, 0, 1)
    assert later.oldest_pending_age == timedelta(seconds=15)
    empty = await Consumer(backend, "nothing-here", clock=clock).metrics()
    assert (empty.pending, empty.oldest_pending_age) == (0, None)


# -- concurrency -------------------------------------------------------------------------


async def test_two_consumers_never_get_the_same_message(
    backend: Backend, backend_kind: str, make_backend: Callable[[str], Backend]
) -> None:
    # A second backend object on the same storage, as another process would have.
    other_backend = make_backend(backend_kind)
    if other_backend is not backend:
        await other_backend.open()
    try:
        ids = set(await Producer(backend, "jobs").enqueue_many([{"n": n} for n in range(60)]))
        consumers = [Consumer(backend, "jobs", name="a"), Consumer(other_backend, "jobs", name="b")]
        taken: dict[str, list[str]] = {"a": [], "b": []}

        async def drain(consumer: Consumer) -> None:
            while batch := await consumer.dequeue(batch_size=4):
                taken[consumer.name].extend(m.id for m in batch)
                await asyncio.sleep(0)  # let the other consumer claim in between

        await asyncio.gather(*(drain(c) for c in consumers))
    finally:
        if other_backend is not backend:
            await other_backend.close()

    assert not set(taken["a"]) & set(taken["b"])
    assert sorted(taken["a"] + taken["b"]) == sorted(ids)


# -- the iterator ------------------------------------------------------------------------


async def test_iterator_yields_a_message_enqueued_after_it_started(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long poll interval: only the enqueue's wake-up can deliver in time.
    consumer = Consumer(backend, "jobs", poll_interval=60)
    idle = asyncio.Event()
    next_due = backend.next_due

    async def spy(*args: Any) -> Any:
        idle.set()  # the iterator found nothing and is about to sleep
        return await next_due(*args)

    monkeypatch.setattr(backend, "next_due", spy)

    async def first_message() -> Message:
        async with contextlib.aclosing(consumer.messages()) as stream:
            async for message in stream:
                return message
        raise AssertionError("the iterator ended")

    receiving = asyncio.create_task(first_message())
    await asyncio.wait_for(idle.wait(), 10)
    message_id = await Producer(backend, "jobs").enqueue({"late": True})

    message = await asyncio.wait_for(receiving, 10)
    assert (message.id, message.payload) == (message_id, {"late": True})


async def test_closing_the_iterator_gives_back_unyielded_messages(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    early = await producer.enqueue_many([{"n": n} for n in range(3)])
    clock.advance(10)
    later = await producer.enqueue({"n": "later"})
    clock.advance(50)

    async with contextlib.aclosing(consumer.messages(batch_size=3)) as stream:
        async for message in stream:
            first = message
            break

    assert first.id == early[0]
    assert await status_of(backend, first.id) is TaskStatus.RUNNING
    # Given back as they were: their place before the later message, and the queue's
    # oldest pending still 60 s old, not reset by the read that was undone.
    assert (await consumer.metrics()).oldest_pending_age == timedelta(seconds=60)
    rest = await Consumer(backend, "jobs", name="c2", clock=clock).dequeue(batch_size=5)
    assert [m.id for m in rest] == [*early[1:], later]
    assert [m.read_count for m in rest] == [1, 1, 1]  # the hand-back was not a read


async def test_stop_ends_async_for_over_the_consumer(backend: Backend) -> None:
    producer, consumer = make(backend, FakeClock())
    await producer.enqueue_many([{"n": 1}, {"n": 2}])
    seen = []

    async for message in consumer:
        seen.append(message.payload)
        await consumer.archive(message.id)
        if len(seen) == 2:
            consumer.stop()

    assert sorted(p["n"] for p in seen) == [1, 2]
    assert [m async for m in consumer] == []  # stopping is final


# -- the handler loop --------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_process_archives_and_carries_on_after_handler_errors(
    backend: Backend, flavour: str
) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock, max_deliveries=2)
    ok1 = await producer.enqueue({"name": "ok1"})
    bad = await producer.enqueue({"name": "bad"})
    ok2 = await producer.enqueue({"name": "ok2"})
    calls: list[str] = []

    def handle(message: Message) -> None:
        calls.append(message.payload["name"])
        if message.payload["name"] == "bad":
            raise RuntimeError("cannot handle this one")

    async def handle_async(message: Message) -> None:
        handle(message)

    handler = handle_async if flavour == "async" else handle
    processed = await consumer.process(handler, burst=True)

    assert processed == 4  # ok1, ok2 and two reads of bad
    assert sorted(calls) == ["bad", "bad", "ok1", "ok2"]
    assert await status_of(backend, ok1) is TaskStatus.SUCCESS
    assert await status_of(backend, ok2) is TaskStatus.SUCCESS
    assert await status_of(backend, bad) is TaskStatus.DEAD


async def test_process_heartbeat_keeps_a_slow_message_hidden(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    rival = Consumer(backend, "jobs", VT, name="rival", clock=clock)
    message_id = await producer.enqueue({"slow": True})
    started, finish = asyncio.Event(), asyncio.Event()
    beats: list[frozenset[str]] = []
    extend = backend.extend_leases

    async def spy(*args: Any) -> Any:
        report = await extend(*args)
        beats.append(report.lost)
        return report

    monkeypatch.setattr(backend, "extend_leases", spy)

    async def slow(message: Message) -> None:
        started.set()
        await finish.wait()

    running = asyncio.create_task(consumer.process(slow))
    await asyncio.wait_for(started.wait(), 10)
    clock.advance(VT * 2 / 3)
    await wait_until(lambda: beats)
    clock.advance(VT * 2 / 3)  # past the first timeout: only the heartbeat hides it

    assert await rival.dequeue() == []
    assert beats[0] == frozenset()
    finish.set()
    await wait_until(_is(backend, message_id, TaskStatus.SUCCESS))
    consumer.stop()
    assert await asyncio.wait_for(running, 10) == 1


async def test_process_heartbeat_racing_an_archive_reports_no_loss(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A heartbeat whose extension reached the storage just after the handler's
    # archive found the message no longer running and logged it "lost to another
    # consumer", though nobody else had it.
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    message_id = await producer.enqueue({"n": 1})
    handling, finish = asyncio.Event(), asyncio.Event()
    extending, archived = asyncio.Event(), asyncio.Event()
    reports: list[frozenset[str]] = []
    extend, settle = backend.extend_leases, backend.settle

    async def late_extend(*args: Any) -> Any:
        extending.set()
        await archived.wait()
        report = await extend(*args)
        reports.append(report.lost)
        return report

    async def settle_then_signal(*args: Any) -> Any:
        settled = await settle(*args)
        archived.set()
        return settled

    monkeypatch.setattr(backend, "extend_leases", late_extend)
    monkeypatch.setattr(backend, "settle", settle_then_signal)

    async def handler(message: Message) -> None:
        handling.set()
        await finish.wait()

    running = asyncio.create_task(consumer.process(handler))
    await asyncio.wait_for(handling.wait(), 10)
    clock.advance(consumer.heartbeat_interval)
    await asyncio.wait_for(extending.wait(), 10)
    finish.set()
    await wait_until(lambda: reports)

    assert reports == [frozenset({message_id})]  # the race happened
    assert "lost message" not in caplog.text
    consumer.stop()
    assert await asyncio.wait_for(running, 10) == 1


def _is(backend: Backend, job_id: str, status: TaskStatus) -> Callable[[], Any]:
    async def check() -> bool:
        return await status_of(backend, job_id) is status

    return check


async def test_process_survives_a_storage_error(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = Producer(backend, "jobs")
    consumer = Consumer(backend, "jobs", poll_interval=0.01)
    message_id = await producer.enqueue({"n": 1})
    claim = backend.claim
    failures = [BackendError("database is restarting")]

    async def flaky(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return await claim(*args)

    monkeypatch.setattr(backend, "claim", flaky)
    seen: list[str] = []

    assert await consumer.process(lambda m: seen.append(m.id), burst=True) == 1
    assert seen == [message_id]
    assert await status_of(backend, message_id) is TaskStatus.SUCCESS


@pytest.mark.parametrize("failing", ["claim", "next_due"])
async def test_iterating_rides_out_storage_errors(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    # The iterator had no error handling at all, and process() none around the idle
    # look-ahead: a short outage (a second connection lost in a row) ended either.
    producer = Producer(backend, "jobs")
    consumer = Consumer(backend, "jobs", poll_interval=0.01)
    original = getattr(backend, failing)
    failures = [BackendError("database is restarting")] * 3

    async def flaky(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return await original(*args)

    monkeypatch.setattr(backend, failing, flaky)
    if failing == "claim":
        await producer.enqueue({"n": 1})
    else:
        await producer.enqueue_delayed({"n": 1}, 0.05)  # found through next_due
    async with contextlib.aclosing(consumer.messages()) as stream:
        message = await asyncio.wait_for(anext(stream), 10)
    # At least the first look failed (all three, unless a slow machine let the
    # message come due first): the stream rode it out.
    assert message.payload == {"n": 1} and len(failures) < 3
    await producer.enqueue_delayed({"n": 2}, 0.05)
    failures[:] = [BackendError("database is restarting")] * 3
    seen: list[Any] = []

    async def handle(message: Message) -> None:
        seen.append(message.payload)
        consumer.stop()

    assert await asyncio.wait_for(consumer.process(handle), 10) == 1
    assert seen == [{"n": 2}] and len(failures) < 3


async def test_a_dequeue_cancelled_in_flight_gives_back_what_it_took(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL a claim commits though the task awaiting it was cancelled (a
    # Ctrl-C mid-query): its messages stayed hidden, a read counted, until timeout.
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    ids = await producer.enqueue_many([{"n": 1}, {"n": 2}])
    claim = backend.claim
    in_flight, may_finish = asyncio.Event(), asyncio.Event()

    async def slow_claim(*args: Any) -> Any:
        taken = await claim(*args)  # committed; the answer is still on its way
        in_flight.set()
        await may_finish.wait()
        return taken

    monkeypatch.setattr(backend, "claim", slow_claim)
    iterating = asyncio.create_task(anext(consumer.messages(batch_size=2)))
    await asyncio.wait_for(in_flight.wait(), 10)
    iterating.cancel()
    await asyncio.sleep(0)
    may_finish.set()
    with pytest.raises(asyncio.CancelledError):
        await iterating
    monkeypatch.setattr(backend, "claim", claim)
    again = await Consumer(backend, "jobs", name="c2", clock=clock).dequeue(batch_size=2)
    assert sorted(m.id for m in again) == sorted(ids)
    assert [m.read_count for m in again] == [1, 1]


async def test_cancelled_process_gives_back_its_messages(backend: Backend) -> None:
    clock = FakeClock()
    producer, consumer = make(backend, clock)
    ids = await producer.enqueue_many([{"n": 1}, {"n": 2}])
    started = asyncio.Event()

    async def hang(message: Message) -> None:
        started.set()
        await asyncio.Event().wait()

    running = asyncio.create_task(consumer.process(hang, batch_size=2))
    await asyncio.wait_for(started.wait(), 10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running

    # Both are visible again at once; only the one the handler saw counts a read.
    again = await Consumer(backend, "jobs", name="c2", clock=clock).dequeue(batch_size=2)
    assert sorted(m.id for m in again) == sorted(ids)
    assert sorted(m.read_count for m in again) == [1, 2]
