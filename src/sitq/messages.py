"""Messages: JSON payloads for an application (or another language) to process.

A message is a job of kind ``"message"`` whose payload is JSON. It lives in the same
table as tasks and goes through the same claim path, so it gets the same guarantees
on every backend: a dequeue is one atomic claim that hides the message for the
visibility timeout, and a message whose timeout ran out is handed out again by the
next dequeue, with its ``read_count`` counted. No admin step is needed to reclaim it.

* :class:`Producer` stores messages, at once or after a delay.
* :class:`Consumer` dequeues them and then archives, deletes, releases or extends
  each one; it can also iterate over messages as they become visible, or drive a
  handler with :meth:`Consumer.process` (heartbeat while the handler runs, carries on
  after handler errors).
* A message read more than ``max_deliveries`` times (a :class:`Producer` option,
  stored with each message) goes to the ``dead`` state, where
  :meth:`Consumer.dead_letters` lists it and :meth:`Consumer.requeue` revives it.
* :meth:`Producer.metrics` and :meth:`Consumer.metrics` count the queue's jobs
  (messages and tasks alike; see :mod:`sitq.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime, timedelta
from typing import Any

from sitq.backends.base import (
    Backend,
    ClaimRequest,
    Finish,
    NewJob,
    Reschedule,
    TaskQuery,
)
from sitq.clock import Clock, clock_or_system
from sitq.core import DeadLetter, JobKind, Message, ReservedTask, Task, TaskStatus
from sitq.errors import (
    LeaseLostError,
    SerializationError,
    TaskNotFoundError,
    ValidationError,
)
from sitq.json_payload import JSON, encode_payload, payload_or_bytes
from sitq.metrics import QueueMetrics, metrics_of
from sitq.queue import checked_id, new_id, queue_name
from sitq.scheduling import seconds_from
from sitq.validation import INT32_MAX, int_in_range, worker_name

logger = logging.getLogger("sitq.messages")

#: Seconds a dequeued message stays hidden from other consumers unless extended.
DEFAULT_VISIBILITY_TIMEOUT = 30.0

_KIND: JobKind = "message"

#: A handler for :meth:`Consumer.process`: sync (run in a thread) or async.
Handler = Callable[[Message], Any]


# -- shared plumbing -----------------------------------------------------------------


class _Client:
    """What Producer and Consumer share: a validated backend, queue and clock."""

    def __init__(self, backend: Backend, queue: str, clock: Clock | None) -> None:
        if not isinstance(backend, Backend):
            raise ValidationError(f"backend must be a sitq Backend, got {type(backend).__name__}")
        self.backend = backend
        self.queue = queue_name(queue)
        self.clock = clock_or_system(clock)
        self._opened = False

    async def _ready(self) -> None:
        # Opened on first use, which spares callers a setup step; closing is left to
        # them (one backend.close(), however many producers and consumers used it).
        if not self._opened:
            await self.backend.ensure_open()
            self._opened = True

    async def metrics(self) -> QueueMetrics:
        """This queue's metrics (zeros when it holds no jobs)."""
        await self._ready()
        return await metrics_of(self.backend, self.queue, self.clock)


# -- producer ------------------------------------------------------------------------


class Producer(_Client):
    """Stores JSON messages in one queue.

    Args:
        backend: where messages are stored (shared with tasks).
        queue: the queue name.
        max_deliveries: how many times each message may be dequeued before the next
            dequeue moves it to the ``dead`` state instead (``None``: no limit). It is
            stored with each message, so every consumer applies the same limit.
        clock: where "now" comes from (tests pass a ``FakeClock``).
    """

    def __init__(
        self,
        backend: Backend,
        queue: str,
        *,
        max_deliveries: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(backend, queue, clock)
        self.max_deliveries = (
            None
            if max_deliveries is None
            else int_in_range(max_deliveries, "max_deliveries", 1, INT32_MAX)
        )

    async def enqueue(self, payload: Any) -> str:
        """Store a message visible at once; return its id."""
        (message_id,) = await self._store([payload], timedelta(0))
        return message_id

    async def enqueue_delayed(self, payload: Any, delay_seconds: float | timedelta) -> str:
        """Store a message that becomes visible ``delay_seconds`` from now; return its id.

        Until then no consumer sees it; :meth:`Consumer.delete` cancels it.
        """
        delay = seconds_from(delay_seconds, "delay_seconds")
        (message_id,) = await self._store([payload], delay)
        return message_id

    async def enqueue_many(self, payloads: Iterable[Any]) -> list[str]:
        """Store many messages in one transaction (all or none); return their ids."""
        if isinstance(payloads, str | bytes | bytearray | memoryview | Mapping):
            # Iterating these would silently store characters or keys as messages.
            raise ValidationError(
                f"enqueue_many takes an iterable of payloads, got a {type(payloads).__name__}"
            )
        return await self._store(list(payloads), timedelta(0))

    async def _store(self, payloads: Sequence[Any], delay: timedelta) -> list[str]:
        # Encode everything before touching storage, so a bad payload stores nothing.
        encoded = [encode_payload(payload) for payload in payloads]
        if not encoded:
            return []
        now = self.clock.now()
        jobs = [
            NewJob(
                id=new_id(),
                queue=self.queue,
                kind=_KIND,
                payload=data,
                enqueued_at=now,
                available_at=now + delay,
                max_deliveries=self.max_deliveries,
            )
            for data in encoded
        ]
        await self._ready()
        await self.backend.enqueue(jobs)
        return [job.id for job in jobs]


# -- consumer ------------------------------------------------------------------------


class Consumer(_Client):
    """Takes JSON messages from one queue, each hidden from others while it is held.

    A dequeued message stays hidden for ``visibility_timeout`` seconds. Finish it with
    :meth:`archive` (kept as ``success``; :meth:`archive_many` for a batch in one
    commit) or :meth:`delete`, give it back with
    :meth:`release`, or keep it longer with :meth:`extend_visibility`. If none of
    that happens in time, the next dequeue (by any consumer) gets it again with its
    ``read_count`` one higher: delivery is at least once.

    Args:
        backend: where messages are stored.
        queue: the queue name.
        visibility_timeout: seconds a dequeued message stays hidden (at least 0.1).
        name: identifies this consumer as the holder of its messages; unique by
            default. Two consumers of one queue with the same name can settle each
            other's messages.
        poll_interval: the longest :meth:`messages` and :meth:`process` sleep before
            looking for messages written by other processes; known due times and
            writes in this process wake them sooner.
        clock: where "now" comes from (tests pass a ``FakeClock``).
    """

    def __init__(
        self,
        backend: Backend,
        queue: str,
        visibility_timeout: float | timedelta = DEFAULT_VISIBILITY_TIMEOUT,
        *,
        name: str | None = None,
        poll_interval: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(backend, queue, clock)
        lease = seconds_from(visibility_timeout, "visibility_timeout")
        if lease < timedelta(milliseconds=100):
            raise ValidationError("visibility_timeout must be at least 0.1 seconds")
        poll = seconds_from(poll_interval, "poll_interval")
        if poll <= timedelta(0):
            raise ValidationError(f"poll_interval must be positive, got {poll_interval!r}")
        if name is not None:
            worker_name(name)
        self.visibility_timeout = lease
        self.poll_interval = poll
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # The holder recorded on its messages: the name within this queue, so a consumer
        # of another queue (or a worker) with the same name cannot settle them.
        self._holder = f"{self.name}\x1f{_KIND}:{self.queue}"
        # Renew well before the timeout runs out, as the worker does.
        self.heartbeat_interval = max(timedelta(milliseconds=50), lease / 3)
        self._stopping = False
        self._wakes: set[asyncio.Event] = set()

    # -- one message at a time ------------------------------------------------------

    async def dequeue(self, batch_size: int = 1) -> list[Message]:
        """Take up to ``batch_size`` visible messages, oldest first, and hide them.

        Returns an empty list when none is visible. It may also return fewer than
        are visible when some of those it picked had been read ``max_deliveries``
        times and went to the dead letters instead.
        """
        limit = int_in_range(batch_size, "batch_size", 1, INT32_MAX)
        await self._ready()
        return await self._claim(limit)

    async def _claim(self, limit: int) -> list[Message]:
        request = ClaimRequest(
            owner=self._holder,
            kind=_KIND,
            limit=limit,
            lease=self.visibility_timeout,
            now=self.clock.now(),
            queues=(self.queue,),
        )
        claiming = asyncio.ensure_future(self.backend.claim(request))
        try:
            claimed = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # Cancelled (Ctrl-C, a shutdown) while the claim was in flight: the
            # database commits it all the same (PostgreSQL). Give back what it took,
            # unread, rather than leave it hidden until its timeout runs out.
            with contextlib.suppress(Exception):
                taken = await claiming
                await self._give_back([(job.id, job.available_at) for job in taken])
            raise
        messages: list[Message] = []
        for reserved in claimed:
            message = await self._decode(reserved)
            if message is not None:
                messages.append(message)
        return messages

    async def _claim_or_pause(self, limit: int, wake: asyncio.Event) -> list[Message] | None:
        """A loop's claim; ``None`` after a storage error, logged and slept off for the
        poll interval (a restart, lost connections) so the loop goes on."""
        try:
            return await self._claim(limit)
        except Exception:
            logger.exception("could not dequeue from %s; will try again", self.queue)
            await self._idle(wake, look_ahead=False)
            return None

    async def _decode(self, reserved: ReservedTask) -> Message | None:
        try:
            payload = JSON.loads(reserved.payload)
        except SerializationError as exc:
            # Only a foreign writer can store this; redelivering it would fail forever,
            # so it goes straight to the dead letters with the reason.
            logger.error("message %s has an unreadable payload: %s", reserved.id, exc)
            await self.backend.finish(
                Finish(reserved.id, self._holder, TaskStatus.DEAD, self.clock.now(), error=str(exc))
            )
            return None
        return Message(
            id=reserved.id,
            queue=reserved.queue,
            payload=payload,
            enqueued_at=reserved.enqueued_at,
            visible_at=reserved.available_at,
            read_count=reserved.attempts,
        )

    async def archive(self, message_id: str) -> bool:
        """Mark a message this consumer holds as done; it is kept as ``success``.

        ``False`` if this consumer no longer holds it (its visibility timeout ran out
        and another consumer dequeued it, or it was already archived or deleted).
        """
        (done,) = await self.archive_many([message_id])
        return done

    async def archive_many(self, message_ids: Iterable[str]) -> list[bool]:
        """:meth:`archive` several held messages in one transaction, so one commit for
        all of them; a flag per id, in order."""
        if isinstance(message_ids, str):
            raise ValidationError("archive_many takes an iterable of message ids, got a str")
        ids = [checked_id(message_id, "message_id") for message_id in message_ids]
        if len(set(ids)) != len(ids):
            raise ValidationError("archive_many got the same message id more than once")
        if not ids:
            return []
        await self._ready()
        now = self.clock.now()
        finishes = [Finish(message_id, self._holder, TaskStatus.SUCCESS, now) for message_id in ids]
        settled = await self.backend.settle(finishes, None)
        for message_id, done in zip(ids, settled.accepted, strict=True):
            if not done:
                logger.warning(
                    "archive of message %s ignored: not held by %s", message_id, self.name
                )
        return settled.accepted

    async def delete(self, message_id: str) -> bool:
        """Remove a message of this queue whatever its state; ``False`` if there is none.

        This is how a scheduled (delayed) message is cancelled: no consumer needs to
        hold it. Deleting a message another consumer holds makes that consumer's
        later ``archive`` return ``False``.
        """
        message_id = checked_id(message_id, "message_id")
        await self._ready()
        # Queue and kind never change, so checking them first cannot race the delete.
        if await self._find(message_id) is None:
            return False
        return await self.backend.delete(message_id)

    async def extend_visibility(self, message_id: str, seconds: float | timedelta) -> datetime:
        """Keep a held message hidden until ``seconds`` from now; return that time.

        Like SQS's ``ChangeMessageVisibility``, this sets the deadline, it does not add
        to it. It works while no other consumer has taken the message, even if the
        visibility timeout already ran out.

        Raises:
            TaskNotFoundError: no message of this queue has this id.
            LeaseLostError: this consumer does not hold the message (any more).
        """
        message_id = checked_id(message_id, "message_id")
        lease = seconds_from(seconds, "seconds")
        if lease <= timedelta(0):
            raise ValidationError(f"seconds must be positive, got {seconds!r}")
        await self._ready()
        now = self.clock.now()
        report = await self.backend.extend_leases(self._holder, [message_id], lease, now)
        if message_id in report.lost:
            # A task, or another queue's message, is not found here: as for delete.
            found = await self._find(message_id)
            if found is None:
                raise TaskNotFoundError(
                    f"queue {self.queue!r} has no message with id {message_id!r}"
                )
            raise LeaseLostError(
                f"consumer {self.name} does not hold message {message_id} "
                f"(its status is {found.status.value}); it may have been dequeued by "
                "another consumer after its visibility timeout ran out"
            )
        return now + lease

    async def release(self, message_id: str, delay: float | timedelta = 0) -> bool:
        """Give a held message back, visible again after ``delay`` seconds.

        The read still counts: ``read_count`` keeps it and ``max_deliveries`` applies,
        so a message that is released on every failure ends in the dead letters
        instead of cycling forever. ``False`` if this consumer no longer holds it.
        """
        message_id = checked_id(message_id, "message_id")
        wait = seconds_from(delay, "delay")
        await self._ready()
        return await self.backend.reschedule(
            Reschedule(message_id, self._holder, self.clock.now() + wait)
        )

    # -- dead letters ---------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Messages of this queue in the ``dead`` state, most recently enqueued first,
        with their payloads, read counts and why they died."""
        int_in_range(limit, "limit", 1, INT32_MAX)
        await self._ready()
        found = await self.backend.list_jobs(
            TaskQuery(
                status=TaskStatus.DEAD, queue=self.queue, kind=_KIND, limit=limit, payloads=True
            )
        )
        return [
            DeadLetter(
                id=task.id,
                queue=task.queue,
                payload=payload_or_bytes(task.payload),
                enqueued_at=task.enqueued_at,
                read_count=task.attempts,
                error=task.error,
                died_at=task.finished_at,
            )
            for task in found
        ]

    async def requeue(self, message_id: str) -> bool:
        """Make a dead (or cancelled) message of this queue visible again, with its read
        count reset. ``False`` if there is no such message or it is not dead."""
        message_id = checked_id(message_id, "message_id")
        await self._ready()
        if await self._find(message_id) is None:
            return False
        return await self.backend.requeue(message_id, self.clock.now())

    async def _find(self, message_id: str) -> Task | None:
        found = await self.backend.get(message_id)
        if found is None or found.kind != _KIND or found.queue != self.queue:
            return None
        return found

    # -- loops ----------------------------------------------------------------------

    def stop(self) -> None:
        """End :meth:`messages` iterations and :meth:`process` loops of this consumer.

        A message being handled is finished first; messages dequeued but not yet
        handed to the caller are given back without counting as a read. Stopping is
        final: make a new ``Consumer`` to start again.
        """
        self._stopping = True
        for wake in list(self._wakes):
            wake.set()

    def __aiter__(self) -> AsyncIterator[Message]:
        """``async for message in consumer`` is ``consumer.messages()``."""
        return self.messages()

    async def messages(self, batch_size: int = 1) -> AsyncGenerator[Message, None]:
        """Yield messages as they become visible, until :meth:`stop`.

        Each yielded message is held like a dequeued one: archive, delete, release
        or extend it before its visibility timeout runs out. ``batch_size`` > 1
        dequeues several at a time; those not yet yielded keep counting down their
        timeout. Close the iterator (``contextlib.aclosing``) to give them back at once.
        """
        limit = int_in_range(batch_size, "batch_size", 1, INT32_MAX)
        await self._ready()
        wake = await self._subscribe()
        batch: list[Message] = []
        try:
            while not self._stopping:
                wake.clear()
                claimed = await self._claim_or_pause(limit, wake)
                if claimed is None:
                    continue
                batch = claimed
                if not batch:
                    await self._idle(wake)
                    continue
                while batch and not self._stopping:
                    yield batch.pop(0)
        finally:
            self._unsubscribe(wake)
            await self._hand_back(batch)

    async def process(
        self,
        handler: Handler,
        *,
        batch_size: int = 1,
        retry_delay: float | timedelta = 0,
        burst: bool = False,
    ) -> int:
        """Call ``handler(message)`` for each message until :meth:`stop`; return how many.

        A handler that returns archives the message; one that raises has the error
        logged and the message released for another read after ``retry_delay``
        seconds (so ``max_deliveries`` still applies), and the loop goes on. While a
        handler runs, a heartbeat keeps its message hidden, however long it takes.
        Sync handlers run in a thread so the heartbeat keeps beating. With ``burst``
        the loop returns once no message is visible.
        """
        if not callable(handler):
            raise ValidationError(f"handler must be callable, got {type(handler).__name__}")
        limit = int_in_range(batch_size, "batch_size", 1, INT32_MAX)
        retry_wait = seconds_from(retry_delay, "retry_delay")
        await self._ready()
        wake = await self._subscribe()
        held: dict[str, Message] = {}
        settling: set[str] = set()  # held ids whose archive or release has begun
        beat_stop = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(held, settling, beat_stop))
        processed = 0
        current: str | None = None
        try:
            while not self._stopping:
                wake.clear()
                batch = await self._claim_or_pause(limit, wake)
                if batch is None:
                    continue
                if not batch:
                    if burst:
                        try:
                            due_now = await self._due_now()
                        except Exception:
                            logger.exception("could not look at %s; will try again", self.queue)
                            await self._idle(wake, look_ahead=False)
                            continue
                        if not due_now:
                            break
                    await self._idle(wake)
                    continue
                held.update((message.id, message) for message in batch)
                for message in batch:
                    if self._stopping:
                        break
                    current = message.id
                    await self._handle(handler, message, retry_wait, settling)
                    current = None
                    del held[message.id]
                    settling.discard(message.id)
                    processed += 1
        finally:
            beat_stop.set()
            await heartbeat
            self._unsubscribe(wake)
            if current is not None:
                # Cancelled while its handler ran: that read happened, so it counts.
                await self._hand_back([held.pop(current)], undo_read=False)
            await self._hand_back(list(held.values()))
        return processed

    async def _handle(
        self, handler: Handler, message: Message, retry_wait: timedelta, settling: set[str]
    ) -> None:
        try:
            if inspect.iscoroutinefunction(handler):
                await handler(message)
            else:
                # In a thread, so a slow sync handler cannot starve the heartbeat.
                result = await asyncio.to_thread(handler, message)
                if inspect.isawaitable(result):
                    await result
        except Exception:
            logger.exception(
                "handler failed on message %s (read %d)", message.id, message.read_count
            )
            outcome: Awaitable[bool] = self.release(message.id, retry_wait)
        else:
            outcome = self.archive(message.id)
        settling.add(message.id)
        try:
            await outcome
        except Exception:
            # The message stays held until its timeout runs out, then is read again.
            logger.exception("could not settle message %s; it will be redelivered", message.id)

    async def _heartbeat(
        self, held: dict[str, Message], settling: set[str], stop: asyncio.Event
    ) -> None:
        """Extend the timeouts of the held messages every ``heartbeat_interval``."""
        while True:
            await self.clock.sleep_until(self.clock.now() + self.heartbeat_interval, stop)
            if stop.is_set():
                return
            if not held:
                continue
            try:
                report = await self.backend.extend_leases(
                    self._holder, list(held), self.visibility_timeout, self.clock.now()
                )
            except Exception:
                logger.exception("could not extend message visibility; will try again")
                continue
            for message_id in report.lost:
                # One archived or released while the extension was on its way is not
                # lost: it is simply no longer running.
                if message_id in held and message_id not in settling:
                    logger.warning("lost message %s to another consumer", message_id)

    async def _hand_back(self, messages: Sequence[Message], *, undo_read: bool = True) -> None:
        """Make held messages visible again at once.

        By default the read is undone: these were dequeued but never handed to the
        caller, so they are put back as they were, their read count and their place
        in the queue (``visible_at``, which orders them and ages the queue's oldest
        pending) both unchanged. A message whose read counts is visible from now.
        """
        held = [(message.id, message.visible_at) for message in messages]
        await self._give_back(held, undo_read=undo_read)

    async def _give_back(
        self, held: Sequence[tuple[str, datetime]], *, undo_read: bool = True
    ) -> None:
        """Make held jobs, given as (id, the visible_at they had), pending again: as
        they were, or, when the read counts, visible from now."""
        now = self.clock.now()
        for message_id, visible_at in held:
            visible = visible_at if undo_read else now
            try:
                await self.backend.reschedule(
                    Reschedule(message_id, self._holder, visible, undo_attempt=undo_read, now=now)
                )
            except Exception:
                # Not fatal: the message becomes visible when its timeout runs out.
                logger.exception("could not give back message %s", message_id)

    async def _due_now(self) -> bool:
        due = await self.backend.next_due(_KIND, (self.queue,))
        return due is not None and due <= self.clock.now()

    async def _idle(self, wake: asyncio.Event, *, look_ahead: bool = True) -> None:
        """Sleep until the poll interval, the next known due time or a wake-up."""
        now = self.clock.now()
        deadline = now + self.poll_interval
        if look_ahead:
            try:
                # Listening again if the backend was closed and reopened under us.
                await self.backend.watch_work()
                due = await self.backend.next_due(_KIND, (self.queue,))
            except Exception:
                # The storage failed: sleep the poll interval; the next claim retries.
                logger.exception("could not read when %s next has work", self.queue)
                due = None
            if due is not None and due < deadline:
                if due <= now:
                    # Visible yet not claimed: the claim's picks went to the dead letters
                    # or another consumer raced us. Look again at once.
                    await asyncio.sleep(0)
                    return
                deadline = due
        await self.clock.sleep_until(deadline, wake)

    async def _subscribe(self) -> asyncio.Event:
        await self.backend.watch_work()
        wake = self.backend.wakeup.subscribe()
        self._wakes.add(wake)
        if self._stopping:
            wake.set()
        return wake

    def _unsubscribe(self, wake: asyncio.Event) -> None:
        self._wakes.discard(wake)
        self.backend.wakeup.unsubscribe(wake)
