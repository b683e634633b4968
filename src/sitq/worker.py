"""Worker: claims due tasks, runs them, records outcomes, keeps its leases alive.

Async functions run on the worker's event loop; sync functions run in a thread pool
of ``max_concurrency`` threads. The worker never holds more claimed tasks than it has
free slots, so a crash can only ever re-run the tasks that were actually running.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import signal
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sitq.backends.base import Backend, ClaimRequest, Finish, NewJob, Outcome, Reschedule
from sitq.clock import Clock, clock_or_system
from sitq.core import FINISHED_STATUSES, ReservedTask, TaskStatus
from sitq.errors import (
    Retry,
    StorageUnavailableError,
    TaskTimeoutError,
    ValidationError,
    WorkerError,
)
from sitq.queue import PURGE_BATCH, new_id, queue_name
from sitq.scheduling import next_interval_run, seconds_from
from sitq.serialization import DEFAULT_SERIALIZER, Serializer, checked, stored_bytes
from sitq.task_call import TaskCall
from sitq.thread_runner import ThreadRunner
from sitq.validation import INT32_MAX, int_in_range, worker_name

logger = logging.getLogger("sitq.worker")

#: The attribute of a task event's log record that holds its fields as a dict (event,
#: task_id, queue, attempt, and duration_seconds for outcomes), for formatters that
#: want them as data rather than parsed back out of the message (the CLI's JSON logs).
TASK_FIELDS = "sitq_task"

#: How often a worker prunes finished tasks older than its ``retention``, a batch of
#: ``PURGE_BATCH`` per turn of its loop (a full batch prunes again at the next turn).
PRUNE_EVERY = timedelta(minutes=1)

#: The most characters of a failure's error text, and of its traceback, that are kept
#: (the start and the end of a longer one).
MAX_ERROR_CHARS = 2**20

#: After stop(timeout)'s timeout, how long handing back running tasks and recording
#: the last outcomes may take before they are given up (the storage is down): their
#: tasks run again when their leases run out.
STOP_STORAGE_SECONDS = 5.0

#: How many runs of a task may be lost with their worker (killed, or stalled past its
#: lease) beyond its retries before it fails instead of starting again. A lost run
#: counts as an attempt, so a task that takes its worker down every time (a segfault,
#: the OOM killer) would otherwise take down every worker in turn, for ever.
MAX_LOST_RUNS = 3


@dataclass(eq=False)
class _Running:
    reserved: ReservedTask
    # When the claim that started this run was made (a series' next slot depends on it).
    began: datetime
    # The task's coroutine, or for a sync task run straight on a thread, its result.
    future: asyncio.Future[Any] | None = None
    is_async: bool = False
    cancel_requested: bool = False
    # Given back to the queue at shutdown: whatever it still does is not recorded.
    handed_back: bool = False
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Runs tasks from a backend.

    Args:
        backend: the storage to take tasks from.
        serializer: must match the one the tasks were enqueued with.
        max_concurrency: how many tasks run at once (and how many may be claimed).
        poll_interval: the longest an idle worker sleeps before looking again for work
            written by other processes. Due times it knows of and work enqueued in this
            process wake it sooner.
        visibility_timeout: seconds a claim lasts; renewed while the task runs. A
            crashed worker's tasks run again once their lease expires.
        queues: names of the queues to serve (all queues when omitted).
        retention: how long finished tasks and their results are kept (``None``
            keeps them forever).
        clock: where "now" comes from (tests pass a ``FakeClock``).
    """

    def __init__(
        self,
        backend: Backend,
        serializer: Serializer | None = None,
        max_concurrency: int = 1,
        poll_interval: float = 1.0,
        visibility_timeout: float = 30.0,
        *,
        queues: Iterable[str] | None = None,
        retention: float | timedelta | None = timedelta(days=7),
        clock: Clock | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(backend, Backend):
            raise ValidationError(f"backend must be a sitq Backend, got {type(backend).__name__}")
        # The claim's LIMIT: every backend's integer must hold it.
        int_in_range(max_concurrency, "max_concurrency", 1, INT32_MAX)
        poll = seconds_from(poll_interval, "poll_interval")
        if poll <= timedelta(0):
            raise ValidationError(f"poll_interval must be positive, got {poll_interval!r}")
        lease = seconds_from(visibility_timeout, "visibility_timeout")
        if lease < timedelta(milliseconds=100):
            raise ValidationError("visibility_timeout must be at least 0.1 seconds")
        served = None
        if queues is not None:
            if isinstance(queues, str | bytes) or not isinstance(queues, Iterable):
                raise ValidationError(
                    f"queues must be a non-empty list of queue names, got {queues!r}"
                )
            # Materialized before the check: an empty iterator or generator is truthy.
            served = tuple(queue_name(queue) for queue in queues)
            if not served:
                raise ValidationError("queues must be a non-empty list of queue names")
        if name is not None:
            worker_name(name)
        self.backend = backend
        self.serializer = DEFAULT_SERIALIZER if serializer is None else checked(serializer)
        self.max_concurrency = max_concurrency
        self.poll_interval = poll.total_seconds()
        self.lease = lease
        self.queues = served
        self.retention = None if retention is None else seconds_from(retention, "retention")
        self.clock = clock_or_system(clock)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Renew leases well before they run out, and often enough to see cancellations.
        self.heartbeat_interval = max(0.05, min(lease.total_seconds() / 3, self.poll_interval))
        self._running: dict[str, _Running] = {}
        self._outcomes: list[tuple[Outcome, _Running]] = []
        self._threads: ThreadRunner | None = None
        # Pools replaced after a sync task timed out, while threads of theirs run on.
        self._retired_threads: list[ThreadRunner] = []
        self._stopping = False
        self._giving_up = False  # past stop(timeout): unrecordable outcomes are dropped
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task[int] | None = None
        self._last_prune: datetime | None = None  # on the worker's clock; None: due
        self._last_claim: ClaimRequest | None = None
        # Outcomes the storage could not take (see _settle): they hold their tasks'
        # leases, and slots, until recorded; retried after the poll interval.
        self._waiting: list[tuple[Outcome, _Running]] = []
        self._retry_waiting_at = 0.0  # monotonic
        # Outcomes a settle under way is recording: in neither list meanwhile.
        self._settling: list[tuple[Outcome, _Running]] = []
        self._handing_back = 0  # stop(timeout) hand-backs under way
        self._serving = False  # past opening the backend
        self.processed = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start working in the background of the running loop and return once the
        backend is open (raising what opening it raised)."""
        opened = asyncio.get_running_loop().create_future()
        main = self._begin(burst=False, opened=opened)
        # Opened here, in the caller's task, the worker's task waiting for the word:
        # so nothing is claimed before start() has returned.
        try:
            await self._open()
        except BaseException:
            main.cancel()  # ended before this returns: a start() may follow at once
            with contextlib.suppress(asyncio.CancelledError):
                await main
            if self._main is main:  # cancelled before it ran, it could not say so
                self._main = None
            raise
        if main.done() or opened.done():  # stop() gave up on it while the backend opened
            self._unprepare()
            await self._close_backend()
            return
        # Open: a stop(timeout) giving up from now on lets the worker's task end as a
        # stop does, closing the backend. Cancelled instead, it could end before it
        # ran (or while it waited for this word), and nothing closed the backend.
        self._serving = True
        opened.set_result(None)

    def _begin(self, burst: bool, opened: asyncio.Future[None] | None = None) -> asyncio.Task[int]:
        """The worker's own task, made at once: registered before any await, so a second
        start() or serve() is refused and a stop() made while the backend opens is not
        lost. With ``opened``, start() opens the backend and says when; without, the
        task opens it itself."""
        if self._main is not None and not self._main.done():
            raise WorkerError("worker is already running")
        self._stopping = self._giving_up = False
        self._main = asyncio.create_task(self._session(burst, opened), name=f"sitq-{self.name}")
        return self._main

    async def _session(self, burst: bool, opened: asyncio.Future[None] | None) -> int:
        try:
            if opened is None:
                await self._open()
            else:
                await opened
            self._serving = True
            return await self._serve(burst)
        finally:
            self._serving = False
            try:
                current = asyncio.current_task()
            except RuntimeError:  # closed unstarted by the garbage collector: no loop
                current = None
            if current is not None and self._main is current:
                self._main = None

    async def _open(self) -> None:
        await self.backend.open()
        try:
            await self._prepare()
        except BaseException:
            self._unprepare()
            await self._close_backend()
            raise

    async def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running tasks finish, and return.

        With ``timeout``, tasks still running after that many seconds are cancelled
        (async ones) or abandoned (sync ones) and handed back to the queue so another
        worker runs them: their leases are released, not left to expire. It returns
        at most ``STOP_STORAGE_SECONDS`` after that even when the storage is down:
        what it could not hand back or record is left to its lease. It may be called
        from another event loop (the worker serving in another thread): the stop is
        then done on the worker's loop, and awaited here.
        """
        if timeout is not None:  # checked before the worker is told to stop
            timeout = seconds_from(timeout, "timeout").total_seconds()
        main = self._main
        if main is None or main.done():
            return
        home = main.get_loop()
        if home is not asyncio.get_running_loop():
            # Its events and tasks belong to that loop: touched from here, they raised
            # "attached to a different loop" (and set the wake-up unsafely).
            stop_there = self.stop(timeout)
            try:
                stopping = asyncio.run_coroutine_threadsafe(stop_there, home)
            except RuntimeError:  # that loop closed: nothing runs there any more
                stop_there.close()
                return
            try:
                await _until_done(asyncio.wrap_future(stopping), main)
            except asyncio.CancelledError:
                # Over there, serve() returning ends its asyncio.run, which cancels
                # this stop still winding up: the worker is stopped all the same.
                current = asyncio.current_task()
                if not main.done() or (current is not None and current.cancelling()):
                    raise
            return
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        # Waited for, never awaited: cancelling this stop() (a wait_for around it) must
        # not cancel the worker.
        if timeout is not None:
            done, _ = await asyncio.wait({main}, timeout=timeout)
            if not done:
                await self._give_up(main)
        await asyncio.wait({main})

    async def _give_up(self, main: asyncio.Task[int]) -> None:
        """Past stop()'s timeout: hand back what still runs, and give the last outcomes
        STOP_STORAGE_SECONDS (both steps together) before ending the worker's task."""
        self._giving_up = True
        if not self._serving:  # still opening the backend: nothing ran, nothing to record
            main.cancel()
            return
        if self._wake is not None:
            self._wake.set()
        give_up_at = time.monotonic() + STOP_STORAGE_SECONDS
        try:
            await asyncio.wait_for(self._hand_back_running(), STOP_STORAGE_SECONDS)
        except TimeoutError:
            logger.error(
                "could not hand back the running tasks in time: they run again "
                "when their leases run out"
            )
        left = max(0.0, give_up_at - time.monotonic())
        done, _ = await asyncio.wait({main}, timeout=left)
        if not done:
            if self._outcomes or self._waiting or self._settling:
                logger.error(
                    "could not record the last outcomes in time: their tasks run "
                    "again when their leases run out"
                )
            main.cancel()

    async def serve(self, burst: bool = False) -> int:
        """Work until :meth:`stop` (or, with ``burst``, until no due task is left).
        Returns how many tasks this call processed. Cancelling the task that awaits
        it stops the worker at once: running async tasks are cancelled, and what was
        running keeps its lease until it runs out, then runs again elsewhere."""
        processed_before = self.processed
        main = self._begin(burst)
        try:
            # Shielded: stop() waits for (and at worst cancels) the worker's own task,
            # never the caller's, which may go on to other work.
            return await asyncio.shield(main)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or not current.cancelling():
                # Not the caller: stop(timeout) gave up on the worker's task.
                return self.processed - processed_before
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
            raise

    def run(self, burst: bool = False) -> int:
        """Block, working until SIGINT or SIGTERM (or, with ``burst``, until no due task
        is left). The first signal stops claiming and lets running tasks finish; a
        second stops at once, raising ``KeyboardInterrupt`` (SIGINT) or
        ``SystemExit(143)`` (SIGTERM): what was running keeps its lease until it runs
        out, then runs again elsewhere."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # none: run() starts its own
        else:
            raise WorkerError("run() blocks; inside a running event loop, await serve() instead")
        # Not inside the except clause: run from there, the worker ran with that
        # RuntimeError as the exception being handled, so every exception raised on
        # its loop (an async task's failure, its stored traceback) was chained to a
        # "no running event loop" that had nothing to do with it.
        return asyncio.run(self._run_with_signals(burst))

    async def _run_with_signals(self, burst: bool) -> int:
        loop = asyncio.get_running_loop()
        serving = asyncio.ensure_future(self.serve(burst))
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            name = signal.Signals(signum).name
            if len(received) == 1:
                logger.info("%s received: finishing running tasks; send it again to stop now", name)
                self._stopping = True
                if self._wake is not None:
                    self._wake.set()
            else:
                logger.warning("%s received again: stopping now", name)
                serving.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await serving
        except asyncio.CancelledError:
            if len(received) < 2:
                raise
            if received[-1] == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise SystemExit(128 + received[-1]) from None
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)

    async def _prepare(self) -> None:
        await self.backend.watch_work()
        self._wake = self.backend.wakeup.subscribe()
        if self._threads is None:
            self._threads = ThreadRunner(self.max_concurrency, asyncio.get_running_loop())

    def _unprepare(self) -> None:
        """Undo _prepare (what of it was done)."""
        if self._wake is not None:
            self.backend.wakeup.unsubscribe(self._wake)
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None

    async def _serve(self, burst: bool) -> int:
        wake = self._wake
        assert wake is not None
        heartbeat = asyncio.create_task(self._heartbeat())
        processed_before = self.processed
        try:
            while not self._stopping:
                if self._outcomes and len(self._outcomes) < len(self._running):
                    # Group commit without waiting: give tasks finishing right now one
                    # loop turn (results handed back from threads, coroutines about to
                    # return) to join this settle, and free their slots for its claim.
                    # Measured on SQLite with 8 slots of short sync tasks: 3.9 -> 4.7
                    # tasks per transaction, 10% more tasks/s. It costs one loop turn,
                    # and nothing when a lone task ran.
                    await asyncio.sleep(0)
                # New outcomes are settled in the claim's own transaction: not counted.
                free = self.max_concurrency - self._slots_taken()
                retry = bool(self._waiting) and time.monotonic() >= self._retry_waiting_at
                if free <= 0 and not self._outcomes and not retry:
                    wake.clear()
                    if self._waiting:
                        await self._idle(wake, self.clock.now())
                    else:
                        # Woken by a task finishing, or by the heartbeat when a prune is
                        # due: a worker whose tasks all run for hours must prune too
                        # (the retention is "busy or idle"). Not a timed wait here: on
                        # the hot path, wait_for costs 3x a plain wait.
                        await wake.wait()
                    await self._prune_if_due(self.clock.now())
                    continue
                wake.clear()
                claim = None
                if free > 0:
                    claim = ClaimRequest(
                        self.name, "task", free, self.lease, self.clock.now(), self.queues
                    )
                    self._last_claim = claim
                settled_any = bool(self._outcomes) or retry
                claimed = await self._settle(claim, retry_waiting=retry)
                if claimed is None:
                    # The storage failed; _settle logged it. Not _idle: the next due
                    # time, readable while claims fail (a full disk, a read-only
                    # server), is the task just missed, and woke it every millisecond.
                    poll = timedelta(seconds=self.poll_interval)
                    await self.clock.sleep_until(self.clock.now() + poll, wake)
                    continue
                if claimed and (self._waiting or self._outcomes):
                    claimed = self._without_held_outcomes(claimed)
                if self._giving_up and claimed:
                    # Claimed while stop(timeout) gave up (the claim was under way as it
                    # handed back what ran): not started, handed back too.
                    await self._hand_back(claimed)
                    claimed = []
                for reserved in claimed:
                    self._launch(reserved)
                # The prune and the idle deadline go by the time of this turn's claim,
                # not a later reading: if the clock moved during the claim or the prune
                # (a fake clock advanced while a round trip was in flight), the deadline
                # has passed, and the worker claims and prunes again at the new time
                # instead of sleeping through what the move made due.
                now = claim.now if claim is not None else self.clock.now()
                # On busy turns too (a worker that always has work must still prune),
                # and before a burst ends. A backlog larger than a batch is pruned a
                # batch per turn, claims in between, without sleeping between batches.
                more_to_prune = await self._prune_if_due(now)
                if claimed or settled_any or more_to_prune:
                    continue
                # A task may have finished during this turn's round trip (a sync task's
                # thread, while PostgreSQL answered): its outcome, perhaps a retry due
                # at once, is settled by the next turn, which claims what it made due.
                if burst and not self._running and not self._outcomes:
                    break
                await self._idle(wake, now)
            while self._running or self._outcomes or self._waiting or self._handing_back:
                if self._outcomes or self._waiting:
                    # Dropped only when a try made after stop(timeout) gave up failed:
                    # the give-up wakes a wait after a failed try, and the storage may
                    # be back by then.
                    giving_up = self._giving_up
                    if await self._settle(None) is not None:
                        continue
                    if giving_up:
                        logger.error(
                            "could not record %d outcomes by the stop timeout: their tasks "
                            "run again when their leases run out",
                            len(self._outcomes) + len(self._waiting),
                        )
                        self._outcomes.clear()
                        self._waiting.clear()
                    elif self._waiting and not self._outcomes and not self._giving_up:
                        # Retried after the poll interval, or sooner when woken: a task
                        # finishing, stop()'s timeout passing (to give up). Here, not
                        # in _settle: the serve loop's own retries, their slots all
                        # held, waited there too, and came every two poll intervals.
                        wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), self.poll_interval)
                    continue
                wake.clear()
                await wake.wait()
        finally:
            # Cancelled with tasks running (serve()'s caller cancelled, a second
            # signal, stop() giving up, the loop's end): nothing may run on unwatched,
            # its lease unrenewed, to run again elsewhere meanwhile. Async tasks are
            # cancelled; no outcome is recorded, and the leases run out.
            self._abandon_running()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._unprepare()
            await self._close_backend()
        return self.processed - processed_before

    async def _close_backend(self) -> None:
        # Matches the open() of start() or serve(): a client sharing the backend
        # keeps it open for itself, and the last to close it closes it.
        try:
            await self.backend.close()
        except Exception:
            logger.exception("could not close the backend")

    async def _settle(
        self, claim: ClaimRequest | None, *, retry_waiting: bool = True
    ) -> list[ReservedTask] | None:
        """Record finished tasks' outcomes (with those waiting, if ``retry_waiting``)
        and claim more, in one backend round trip."""
        outcomes, self._outcomes = self._outcomes, []
        if retry_waiting:
            outcomes += self._waiting
            self._waiting = []
        self._settling = outcomes
        try:
            return await self._record_and_claim(outcomes, claim)
        finally:
            self._settling = []

    async def _record_and_claim(
        self, outcomes: list[tuple[Outcome, _Running]], claim: ClaimRequest | None
    ) -> list[ReservedTask] | None:
        try:
            settled = await self.backend.settle([outcome for outcome, _ in outcomes], claim)
        except Exception:
            logger.exception("could not record outcomes or claim tasks; will try again")
            storage_down = False
            if outcomes:
                outcomes, storage_down = await self._settle_one_by_one(outcomes)
            # What the storage could not take waits, tried again after the poll interval
            # (not at every turn: a busy worker would retry, and log, once per task),
            # its leases renewed and its slots held. New outcomes are not held up
            # behind it, and while the storage is up claims go on for the free slots:
            # one outcome it has no room for yet (a big result on a nearly full disk)
            # must not stop the worker.
            self._waiting += outcomes
            if outcomes:
                self._retry_waiting_at = time.monotonic() + self.poll_interval
            # Tasks that finished meanwhile hold leases too: their new outcomes do not
            # go with this claim.
            free = self.max_concurrency - self._slots_taken() - len(self._outcomes)
            # Not once stop() has come: that would be a new claim after it.
            stopping = self._stopping
            if claim is not None and outcomes and not storage_down and free > 0 and not stopping:
                # At this time, not the turn's: the failed round trips may have taken
                # as long as a lease (a pool's wait for a connection), and leases
                # counted from before them ran out as they were granted, for another
                # worker to claim the tasks this one was starting.
                claim = self._last_claim = replace(claim, limit=free, now=self.clock.now())
                try:
                    return (await self.backend.settle([], claim)).claimed
                except Exception:
                    logger.exception("could not claim tasks; will try again")
            return None
        for (outcome, running), accepted in zip(outcomes, settled.accepted, strict=True):
            self._log_outcome(running, outcome, accepted)
        return settled.claimed

    async def _settle_one_by_one(
        self, outcomes: list[tuple[Outcome, _Running]]
    ) -> tuple[list[tuple[Outcome, _Running]], bool]:
        """After a failed settle, record each outcome on its own, so that one the
        storage refuses every time (a value it cannot take, a row past its size limit)
        does not hold up the rest for ever: that one is recorded as a failure saying
        why, without its result, error text or traceback. Returns what is still
        unrecorded: the outcomes the storage could not take for now, and all the rest
        once two in a row could not be stored or one's plain failure could not either
        (the storage itself is failing; retried later), and whether that happened.
        """
        waiting: list[tuple[Outcome, _Running]] = []
        unavailable_in_a_row = 0
        for index, (outcome, running) in enumerate(outcomes):
            try:
                (accepted,) = (await self.backend.settle([outcome], None)).accepted
            except StorageUnavailableError:
                # Not this outcome's fault: had the storage come back a moment later,
                # its plain failure would have been recorded for a task that succeeded.
                # It waits; the next is tried, for the storage may have no room for
                # this one alone (a big result on a nearly full disk).
                waiting.append((outcome, running))
                unavailable_in_a_row += 1
                if unavailable_in_a_row == 2:
                    return waiting + outcomes[index + 1 :], True
                continue
            except Exception as exc:
                refused = _refused(outcome, exc)
                try:
                    (accepted,) = (await self.backend.settle([refused], None)).accepted
                except Exception:
                    return waiting + outcomes[index:], True
                logger.error(
                    "task id=%s: the storage refused its outcome (%s); recorded it failed",
                    running.reserved.id,
                    _describe(exc),
                )
                outcome = refused
            unavailable_in_a_row = 0
            self._log_outcome(running, outcome, accepted)
        return waiting, False

    async def _idle(self, wake: asyncio.Event, now: datetime) -> None:
        """Sleep until the poll interval after ``now``, the next known due time or a
        wake-up."""
        deadline = now + timedelta(seconds=self.poll_interval)
        # Any free slot must wake for the next due time, also while other tasks run:
        # gating this on "nothing running" let an eta task start up to poll_interval
        # late whenever a long task occupied another slot.
        if self._slots_taken() < self.max_concurrency:
            try:
                # Listening again if the backend was closed and reopened under us.
                await self.backend.watch_work()
                next_due = await self.backend.next_due("task", self.queues)
            except Exception:
                # Storage is down: sleep the poll interval, then the claim retries.
                logger.exception("could not read the next due time; will try again")
                next_due = None
            if next_due is not None and next_due < deadline:
                # A due job we could not claim (another worker took it) must not spin us;
                # one that only became due after our last claim is claimed at once (on a
                # fake clock, "1 ms later" would never come).
                tried = now if self._last_claim is None else self._last_claim.now
                if next_due <= tried:
                    deadline = max(next_due, now + timedelta(milliseconds=1))
                else:
                    deadline = next_due
        await self.clock.sleep_until(deadline, wake)

    def _next_prune(self, now: datetime) -> datetime:
        """When the next prune is due, on the worker's clock (so tests can drive
        retention with a FakeClock): ``now`` if none was made yet, or if the clock went
        back past the last one (a wall clock stepped back)."""
        last = self._last_prune
        if last is None or now < last:
            return now
        return last + PRUNE_EVERY

    async def _prune_if_due(self, now: datetime) -> bool:
        """Delete a batch of finished tasks past retention, if a prune is due; ``True``
        when the batch was full, so more may be left."""
        if self.retention is None or now < self._next_prune(now):
            return False
        self._last_prune = now
        try:
            # Its own: finished tasks of the queues it serves. Another queue's worker
            # may keep them longer, and messages' archive and dead letters are kept
            # until purged on purpose.
            removed = await self.backend.purge(
                now - self.retention,
                [status for status in TaskStatus if status in FINISHED_STATUSES],
                PURGE_BATCH,
                kind="task",
                queues=self.queues,
            )
        except Exception:
            logger.exception("could not prune finished tasks; will try again")
            return False
        if removed:
            logger.info("pruned %d finished tasks older than %s", removed, self.retention)
        if removed >= PURGE_BATCH:
            # More are due: prune again at the next turn, after a claim, rather than
            # hold the write lock for the whole backlog at once.
            self._last_prune = None
            return True
        return False

    # -- running one task --------------------------------------------------------------

    def _launch(self, reserved: ReservedTask) -> None:
        """Start a claimed task: a sync function without a timeout goes straight to a
        thread, and its outcome is recorded by a callback when the thread hands the
        result back; everything else runs as a coroutine (``_execute``).

        A sync task needs no coroutine of its own. Measured in-process on SQLite with 8
        slots of no-op sync tasks, skipping the asyncio task per call took 7% off the
        worker's CPU per task and drained 8-10% more tasks/s.
        """
        held = self._running.get(reserved.id)
        if held is not None:
            # Its lease ran out while it ran here (the event loop was blocked for longer
            # than the lease, so no heartbeat renewed it) and this claim took it back.
            # The run under way goes on under the new lease; starting it again would run
            # it twice at once, and let the first run's outcome pass for the second's.
            logger.warning(
                "task id=%s: its lease ran out while it ran here (was the event loop "
                "blocked?); this worker took it back and its run goes on",
                reserved.id,
            )
            held.reserved = reserved
            return
        running = _Running(reserved, began=reserved.lease_expires_at - self.lease)
        self._running[reserved.id] = running
        if reserved.cancel_requested:
            # Cancelled while a run held it, and that run's worker was lost: no run
            # is wanted any more (nor, for a series, a next one).
            error = "cancelled while running; its worker was lost, and it is not run again"
            self._end_unrun(running, TaskStatus.CANCELLED, error)
            return
        if reserved.attempts >= reserved.max_attempts + MAX_LOST_RUNS:
            # Its attempts count this claim, so attempts - 1 runs came before. A task
            # runs past its retries only when a run was lost, so at least
            # MAX_LOST_RUNS of those were.
            runs = reserved.attempts - 1
            error = (
                f"WorkerLost: {runs} runs ended with no outcome, at least {MAX_LOST_RUNS} "
                "of them because the worker running it was lost (killed, or stalled past "
                "its lease); not started again"
            )
            self._end_unrun(running, TaskStatus.FAILED, error)
            return
        try:
            call = TaskCall.loads(reserved.payload, self.serializer)
        except BaseException as exc:
            # Whatever loading raises (a custom serializer's own errors, SystemExit
            # from an argument's unpickling) is this task's failure; escaping here
            # would stop the worker, and the next one to claim the task. Recorded as
            # any outcome is: describing the error may raise too (its __notes__).
            with self._recording(running):
                self._fail(running, None, exc, final=True)
            self._release(running)
            return
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "task started id=%s queue=%s attempt=%d",
                reserved.id,
                reserved.queue,
                reserved.attempts,
                extra=_task_fields("started", reserved),
            )
        if call.timeout is not None or inspect.iscoroutinefunction(call.func):
            running.future = asyncio.create_task(self._execute(running, call))
            return
        try:
            future = self._run_in_thread(call)
        except RuntimeError as exc:  # no thread could be started
            self._record_error(running, call, exc)
            self._release(running)
            return
        running.future = future
        future.add_done_callback(functools.partial(self._thread_done, running, call))

    def _slots_taken(self) -> int:
        """Slots held by running tasks and by outcomes waiting for the storage (each
        keeps its task's lease)."""
        return len(self._running) + len(self._waiting)

    def _without_held_outcomes(self, claimed: list[ReservedTask]) -> list[ReservedTask]:
        """``claimed`` less the tasks whose outcome this worker holds: their lease ran
        out while the outcome waited (the renewals failed too) and this claim took them
        back. The outcome stands, to be recorded under this lease; a second run would
        record another. Checked per claim only while outcomes are held."""
        held = {running.reserved.id for _, running in [*self._waiting, *self._outcomes]}
        for reserved in claimed:
            if reserved.id in held:
                logger.warning("task id=%s: claimed back while its outcome waits", reserved.id)
        return [reserved for reserved in claimed if reserved.id not in held]

    def _end_unrun(self, running: _Running, status: TaskStatus, error: str) -> None:
        """Record a claimed task's final outcome without running it."""
        logger.error("task id=%s: %s %s", running.reserved.id, status.value, error)
        self._finish(running, status, error=error)
        self._release(running)

    def _run_in_thread(self, call: TaskCall) -> asyncio.Future[Any]:
        assert self._threads is not None
        # In a copy of the context, so context variables the task sets stay its own.
        context = contextvars.copy_context()
        return self._threads.submit(
            functools.partial(context.run, call.func, *call.args, **call.kwargs)
        )

    def _thread_done(self, running: _Running, call: TaskCall, future: asyncio.Future[Any]) -> None:
        """Record the outcome of a sync task run by ``_launch``."""
        if future.cancelled() or running.handed_back:
            # Handed back at shutdown, or abandoned: its lease is released or left to
            # run out. Abandoned after the thread handed its result back (the future
            # done, so not cancelled) but before this callback ran, a coroutine the
            # task returned was started here, unwatched, after the worker let go.
            if not future.cancelled() and future.exception() is None:
                value = future.result()
                if inspect.iscoroutine(value):
                    value.close()  # never to run: not left to warn "never awaited"
            self._release(running)
            return
        error = future.exception()
        if error is not None:
            self._record_error(running, call, error)
        else:
            value = future.result()
            if _awaitable(value):
                # A sync function that returned a coroutine: it runs on the loop, and
                # can be cancelled like an async task.
                running.is_async = True
                running.future = asyncio.ensure_future(self._execute(running, call, value))
                return
            self._record_value(running, call, value)
        self._release(running)

    async def _execute(
        self, running: _Running, call: TaskCall, returned: Awaitable[Any] | None = None
    ) -> None:
        """Run an async task, a sync task with a timeout, or (``returned``) the
        awaitable a sync task returned, and record the outcome."""
        try:
            try:
                value = await (self._invoke(running, call) if returned is None else returned)
            except asyncio.CancelledError as exc:
                if running.cancel_requested:
                    self._finish(running, TaskStatus.CANCELLED, error="cancelled while running")
                elif running.handed_back or self._torn_down():
                    raise  # the worker's cancel, at shutdown or at the end of the loop
                else:  # the task's own code raised it, say awaiting a cancelled helper
                    self._record_error(running, call, exc)
            except BaseException as exc:  # SystemExit too: see _record_error
                self._record_error(running, call, exc)
            else:
                self._record_value(running, call, value)
        finally:
            self._release(running)

    def _torn_down(self) -> bool:
        """Whether the worker's own task is ending or being cancelled: the end of
        ``asyncio.run`` cancels every task at once, and a task's CancelledError is then
        the loop's. Otherwise, with no cancel requested or hand-back, it is the task's
        own (its code cancelled itself, or awaited a cancelled helper): a failure, not
        a shutdown. Taken for a shutdown, the run went unrecorded and ran again at
        each lease expiry, then failed as "WorkerLost"."""
        main = self._main
        return main is None or main.done() or main.cancelling() > 0

    def _record_value(self, running: _Running, call: TaskCall, value: Any) -> None:
        with self._recording(running):
            try:
                result = stored_bytes(self.serializer.dumps(value), "the result")
            except BaseException as exc:  # a serializer or a __reduce__ may raise anything
                self._fail(running, call, exc, final=True)
            else:
                self._finish(running, TaskStatus.SUCCESS, result=result)

    def _record_error(self, running: _Running, call: TaskCall, exc: BaseException) -> None:
        """Record what the task raised: a failure, retried if it has attempts left.

        Whatever the task raised, SystemExit and KeyboardInterrupt included, is its
        outcome and not the worker's: a task that stopped its worker would stay
        'running' until its lease ran out and then stop the next worker too. (A
        signal never reaches a task's thread, and ``run()`` handles SIGINT and
        SIGTERM as a stop, so a real Ctrl-C is not taken for a task's.)
        """
        with self._recording(running):
            if isinstance(exc, Retry):
                self._fail(running, call, exc, delay=exc.delay)
            else:
                self._fail(running, call, exc)

    @contextlib.contextmanager
    def _recording(self, running: _Running) -> Iterator[None]:
        """Recording an outcome must not fail, or the task's slot is never freed and
        it stays 'running' for good: if it does, record a plain failure instead.
        BaseException too: a value's __reduce__ or an exception's __str__ may raise
        SystemExit, which would stop the worker's loop."""
        try:
            yield
        except BaseException as broken:
            logger.exception("could not record the outcome of task id=%s", running.reserved.id)
            error = _storable(f"sitq could not record this task's outcome: {_describe(broken)}")
            try:
                # Through _finish, so a recurring series still gets its next run...
                self._finish(running, TaskStatus.FAILED, error=error)
            except Exception:  # ...unless building that run is what failed
                now = self.clock.now()
                finish = Finish(running.reserved.id, self.name, TaskStatus.FAILED, now, error=error)
                self._outcomes.append((finish, running))

    def _release(self, running: _Running) -> None:
        """The task is over: free its slot and wake the loop to settle and claim."""
        if running.handed_back:
            return  # its slot was freed when it was handed back
        self._running.pop(running.reserved.id, None)
        self.processed += 1
        if self._wake is not None:
            self._wake.set()

    async def _invoke(self, running: _Running, call: TaskCall) -> Any:
        if call.timeout is None:
            return await self._call(running, call)
        try:
            async with asyncio.timeout(call.timeout) as scope:
                return await self._call(running, call)
        except TimeoutError:
            if not scope.expired():
                raise
            if not running.is_async:
                self._replace_threads(running)
            raise TaskTimeoutError(call.timeout) from None

    async def _call(self, running: _Running, call: TaskCall) -> Any:
        """The task's value: an async function awaited on the loop, a sync one run in a
        thread, and whatever awaitable the sync one returned awaited after it, all of
        it within the task's timeout."""
        func = call.func
        if inspect.iscoroutinefunction(func):
            running.is_async = True
            awaitable: Awaitable[Any] = func(*call.args, **call.kwargs)
        else:
            awaitable = self._run_in_thread(call)
        value = await awaitable
        if inspect.isawaitable(value):  # a sync function that returned a coroutine
            running.is_async = True
            value = await value
        return value

    def _replace_threads(self, running: _Running) -> None:
        """A timed-out sync task keeps its thread; give later tasks fresh threads, and
        say how many threads are left running so (a call that never returns keeps one
        for the life of the process, and only the log can tell)."""
        old = self._threads
        self._threads = ThreadRunner(self.max_concurrency, asyncio.get_running_loop())
        if old is not None:
            old.shutdown()
            self._retired_threads.append(old)
        alive = 0
        for pool in list(self._retired_threads):
            count = pool.busy_threads()
            if count:
                alive += count
            else:
                self._retired_threads.remove(pool)
        logger.warning(
            "task %s timed out; its thread cannot be stopped and runs on (%d threads of "
            "pools replaced after timeouts still running in this worker)",
            running.reserved.id,
            alive,
        )

    def _fail(
        self,
        running: _Running,
        call: TaskCall | None,
        exc: BaseException,
        *,
        final: bool = False,
        delay: float | None = None,
    ) -> None:
        """Retry the task if it has attempts left, else record the failure."""
        if running.handed_back:
            return
        reserved = running.reserved
        error = _storable(_describe(exc))
        trace = _storable(_format_traceback(exc))
        if final or call is None or reserved.attempts >= reserved.max_attempts:
            self._finish(running, TaskStatus.FAILED, error=error, trace=trace)
            return
        wait = call.retry.delay_for(reserved.attempts) if delay is None else delay
        now = self.clock.now()
        retry = Reschedule(
            reserved.id, self.name, now + timedelta(seconds=wait), error, trace, now=now
        )
        self._outcomes.append((retry, running))

    def _finish(
        self,
        running: _Running,
        status: TaskStatus,
        *,
        result: bytes | None = None,
        error: str | None = None,
        trace: str | None = None,
    ) -> None:
        """Queue the final outcome (and a recurring task's next run) for recording."""
        if running.handed_back:
            return
        reserved = running.reserved
        now = self.clock.now()
        next_run = None
        interval = reserved.interval
        if interval is not None and status is not TaskStatus.CANCELLED:
            next_at = next_interval_run(reserved.scheduled_at, interval, now, running.began)
            if next_at is not None:  # None: no slot left before datetime.max
                next_run = NewJob(
                    id=new_id(),
                    queue=reserved.queue,
                    kind=reserved.kind,
                    payload=reserved.payload,
                    enqueued_at=now,
                    available_at=next_at,
                    priority=reserved.priority,
                    max_attempts=reserved.max_attempts,
                    interval=interval,
                    series_id=reserved.series_id,
                )
        finish = Finish(
            reserved.id,
            self.name,
            status,
            now,
            result=result,
            error=error,
            traceback=trace,
            next_run=next_run,
        )
        self._outcomes.append((finish, running))

    def _log_outcome(self, running: _Running, outcome: Outcome, accepted: bool) -> None:
        reserved = running.reserved
        if isinstance(outcome, Finish):
            event, detail = outcome.status.value, outcome.error
        else:
            event, detail = "retry", f"at {outcome.available_at.isoformat()}: {outcome.error}"
        if not accepted:
            logger.warning(
                "task %s id=%s but its lease was lost (taken over by another worker, or "
                "the task is no longer stored); this outcome was discarded",
                event,
                reserved.id,
                extra=_task_fields(event, reserved),
            )
            return
        if logger.isEnabledFor(logging.INFO):
            duration = time.monotonic() - running.started
            logger.info(
                "task %s id=%s queue=%s attempt=%d duration=%.3fs%s",
                event,
                reserved.id,
                reserved.queue,
                reserved.attempts,
                duration,
                "" if detail is None else f" {detail}",
                extra=_task_fields(event, reserved, duration),
            )

    # -- leases --------------------------------------------------------------------------

    def _wake_for_a_due_prune(self) -> None:
        """Wake the serve loop if it waits with every slot busy and a prune is due (an
        idle loop prunes at its own wake-ups)."""
        if self.retention is None or self._wake is None:
            return
        if self._slots_taken() >= self.max_concurrency:
            now = self.clock.now()
            if now >= self._next_prune(now):
                self._wake.set()

    async def _heartbeat(self) -> None:
        this = asyncio.current_task()
        assert this is not None
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if this.cancelling():
                # Cancelled by the serve loop's end, but a call under way took the
                # CancelledError and returned (seen with PostgreSQL renewals at a
                # stop): going on would keep serve() waiting for this task for ever.
                return
            self._wake_for_a_due_prune()
            # Tasks whose outcome waits for the storage keep their leases too: were
            # they to run out while the storage is up (no room yet for a big result
            # on a full disk), the task would be run again while its outcome waits.
            # So do those of a settle under way: its round trips may take long (a
            # pool's wait for a connection, a one-by-one pass after a failure).
            outcomes = [*self._outcomes, *self._waiting, *self._settling]
            held = [*self._running, *(running.reserved.id for _, running in outcomes)]
            if not held:
                continue
            try:
                report = await self.backend.extend_leases(
                    self.name, held, self.lease, self.clock.now()
                )
            except Exception:
                logger.exception("could not renew leases; will try again")
                continue
            # A task that finished while the renewal was in flight is not lost.
            for job_id in report.lost & self._running.keys():
                logger.warning(
                    "lost the lease of task %s (taken over by another worker, or the task "
                    "is no longer stored)",
                    job_id,
                )
            for job_id in report.cancel_requested:
                running = self._running.get(job_id)
                if running is not None and running.is_async and not running.cancel_requested:
                    running.cancel_requested = True
                    assert running.future is not None
                    running.future.cancel()

    async def _hand_back_running(self) -> None:
        """Cancel what still runs after the stop grace period and release its leases."""
        # All cancelled and their slots freed before any round trip: with the storage
        # down, a release can wait long, and stop() may give up on it (then the leases
        # run out instead), but nothing may keep running here after stop() returns.
        ended = self._abandon_running()
        try:
            await self._hand_back([running.reserved for running in ended])
        finally:
            if self._wake is not None:
                self._wake.set()

    async def _hand_back(self, tasks: list[ReservedTask]) -> None:
        """Release the leases of tasks this worker will not finish. The worker's task
        must not end meanwhile (each commit wakes it): run() returning would end its
        asyncio.run, which cancelled the releases still under way, or close the pool
        under them. A count: a second stop(timeout) may overlap the first."""
        self._handing_back += 1
        try:
            await asyncio.gather(*(self._release_lease(reserved) for reserved in tasks))
        finally:
            self._handing_back -= 1

    def _abandon_running(self) -> list[_Running]:
        """Cancel what runs (async tasks; a thread cannot be) and free its slots; what
        it does from now on is not recorded, even by a coroutine that ignores the
        cancellation."""
        ended = list(self._running.values())
        self._running.clear()
        for running in ended:
            running.handed_back = True
            if running.future is not None:
                running.future.cancel()
        return ended

    async def _release_lease(self, reserved: ReservedTask) -> None:
        try:
            await self.backend.reschedule(
                Reschedule(reserved.id, self.name, self.clock.now(), undo_attempt=True)
            )
        except Exception:
            logger.exception(
                "could not hand back task %s; it runs again when its lease runs out",
                reserved.id,
            )
            return
        logger.warning("handed back task %s unfinished at shutdown", reserved.id)


async def _until_done(stopping: asyncio.Future[None], main: asyncio.Task[int]) -> None:
    """Wait for a stop() sent to the worker's loop; or, should that loop stop without
    running it, for the worker's task to be done."""
    while not main.done():
        done, _ = await asyncio.wait({stopping}, timeout=0.1)
        if done:
            return stopping.result()


def _awaitable(value: Any) -> bool:
    """``inspect.isawaitable``, but ``False`` for a value whose attribute lookups raise
    (an unbound lazy proxy, say): it is recorded as a value then, or fails as one
    that cannot be pickled. Raising here, in a thread's done-callback, left its task
    running for good."""
    try:
        return inspect.isawaitable(value)
    except BaseException:  # SystemExit from a __getattr__ too
        return False


def _format_traceback(exc: BaseException) -> str:
    """The exception's traceback, as ``traceback.format_exception`` gives it; for one it
    cannot format (``__notes__`` that raise, say), its own frames and message. Raising
    here cost the task its error text, its traceback and its remaining retries."""
    try:
        return "".join(traceback.format_exception(exc))
    except BaseException:  # SystemExit from a property too
        try:
            frames = "".join(traceback.format_tb(exc.__traceback__))
        except BaseException:
            frames = ""
        return f"Traceback (most recent call last):\n{frames}{_describe(exc)}\n"


def _describe(exc: BaseException) -> str:
    """``Type: message``, even for an exception whose ``__str__`` raises."""
    try:
        message = str(exc)
    except BaseException:  # SystemExit from a __str__ too
        message = "<str() of the exception failed>"
    return f"{type(exc).__name__}: {message}"


def _refused(outcome: Outcome, exc: BaseException) -> Outcome:
    """``outcome`` as a plain failure (or, for a retry, without its texts) that says why
    the storage refused it."""
    error = _storable(f"sitq could not store this task's outcome: {_describe(exc)}")
    if isinstance(outcome, Finish):
        return replace(outcome, status=TaskStatus.FAILED, result=None, error=error, traceback=None)
    return replace(outcome, error=error, traceback=None)


def _storable(text: str) -> str:
    """``text`` with what no backend can store spelled out as escapes: NUL, which
    PostgreSQL's text refuses, and lone surrogates, which UTF-8 cannot encode. An
    error message holding either once made every settle of its worker fail. Past
    ``MAX_ERROR_CHARS`` its middle is cut: a 500 MB exception message, stored as the
    error and again in the traceback, made a row SQLite refused."""
    if len(text) > MAX_ERROR_CHARS:
        half = MAX_ERROR_CHARS // 2
        cut = len(text) - 2 * half
        text = f"{text[:half]}\n[... {cut:,} characters cut ...]\n{text[-half:]}"
    if text.isascii():
        return text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _task_fields(
    event: str, reserved: ReservedTask, duration: float | None = None
) -> dict[str, object]:
    fields: dict[str, object] = {
        "event": event,
        "task_id": reserved.id,
        "queue": reserved.queue,
        "attempt": reserved.attempts,
    }
    if duration is not None:
        fields["duration_seconds"] = round(duration, 3)
    return {TASK_FIELDS: fields}
