"""``sitq worker``: run workers until a signal, with a graceful shutdown.

Shutdown contract:

* first SIGTERM or SIGINT: stop claiming, let running tasks finish for ``--grace``
  seconds, hand back (release the lease of) whatever is still running after that,
  exit 0;
* second signal: exit at once with 128 + the signal number (130 for SIGINT, 143 for
  SIGTERM). Tasks that were running keep their lease until it expires, then another
  worker runs them again: at-least-once, nothing lost.

With ``--processes N`` this process is a supervisor: it starts N worker processes
(``python -m sitq.cli worker``), forwards signals to them, and restarts one that dies
after it had been running a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import click

from sitq.backends.base import Backend
from sitq.cli.common import (
    BACKEND_ENV,
    EXIT_USAGE,
    CliError,
    backend_option,
    open_backend,
    parsed_by,
)
from sitq.cli.output import configure_logging, parse_duration
from sitq.errors import ValidationError
from sitq.scheduling import seconds_from
from sitq.worker import Worker

logger = logging.getLogger("sitq.cli")

#: A child of ``--processes`` watches this pid and stops when its supervisor is gone.
SUPERVISOR_ENV = "SITQ_SUPERVISOR_PID"
#: How long an exiting worker waits for its idle task threads to end.
IDLE_THREAD_EXIT_SECONDS = 1.0
#: A worker process that dies sooner than this after starting is not restarted.
RESTART_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerSettings:
    backend_url: str
    queues: tuple[str, ...] | None
    concurrency: int
    poll_interval: float
    visibility_timeout: float
    grace: float
    burst: bool
    retention: timedelta | None
    imports: tuple[str, ...]
    name: str | None
    log_level: str
    log_format: str


def _retention(text: str) -> timedelta | None:
    if text.strip().lower() in {"never", "forever", "none"}:
        return None
    return parse_duration(text)


def _split(values: Sequence[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@click.command("worker")
@backend_option
@click.option(
    "--queues",
    "-q",
    multiple=True,
    envvar="SITQ_QUEUES",
    show_envvar=True,
    help="Queues to serve, comma-separated or repeated (default: all).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="SITQ_CONCURRENCY",
    show_envvar=True,
    help="Tasks run at once per process.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    envvar="SITQ_POLL_INTERVAL",
    show_envvar=True,
    help="Longest idle sleep (seconds) before looking for work from other processes.",
)
@click.option(
    "--visibility-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    envvar="SITQ_VISIBILITY_TIMEOUT",
    show_envvar=True,
    help="Lease length in seconds, renewed while a task runs.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    # FloatRange lets nan through (every comparison with it is false).
    callback=parsed_by(lambda value: seconds_from(value, "--grace").total_seconds()),
    default=30.0,
    show_default=True,
    envvar="SITQ_GRACE",
    show_envvar=True,
    help="Seconds running tasks may take to finish after the first signal.",
)
@click.option(
    "--burst",
    is_flag=True,
    envvar="SITQ_BURST",
    show_envvar=True,
    help="Run what is due, then exit (shows progress on stderr).",
)
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="SITQ_PROCESSES",
    show_envvar=True,
    help="Worker processes on this machine.",
)
@click.option(
    "--retention",
    default="7d",
    show_default=True,
    envvar="SITQ_RETENTION",
    show_envvar=True,
    callback=parsed_by(_retention),
    help="Delete finished tasks older than this (or 'never').",
)
@click.option(
    "--import",
    "-i",
    "imports",
    multiple=True,
    envvar="SITQ_IMPORT",
    show_envvar=True,
    help="Module defining task functions to import first (repeatable).",
)
@click.option(
    "--name",
    envvar="SITQ_WORKER_NAME",
    show_envvar=True,
    help="Worker name (default host:pid:id).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    envvar="SITQ_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    envvar="SITQ_LOG_FORMAT",
    show_envvar=True,
    type=click.Choice(["text", "json"]),
    help="'json' writes one JSON object per line for log collectors.",
)
def worker_command(
    backend_url: str | None,
    queues: Sequence[str],
    concurrency: int,
    poll_interval: float,
    visibility_timeout: float,
    grace: float,
    burst: bool,
    processes: int,
    retention: timedelta | None,
    imports: Sequence[str],
    name: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run tasks until SIGTERM or SIGINT (a second signal exits at once)."""
    with _stop_before_start():
        configure_logging(log_level, log_format)
        backend = open_backend(backend_url, must_exist=False)
        assert backend_url is not None  # open_backend refused a missing URL
        served = tuple(_split(queues))
        if queues and not served:
            # `-q ''` (an unset variable in a script, say) served every queue.
            raise click.BadParameter("names no queue", param_hint="--queues")
        settings = WorkerSettings(
            backend_url=backend_url,
            queues=served or None,
            concurrency=concurrency,
            poll_interval=poll_interval,
            visibility_timeout=visibility_timeout,
            grace=grace,
            burst=burst,
            retention=retention,
            imports=tuple(_split(imports)),
            name=name,
            log_level=log_level,
            log_format=log_format,
        )
        _import_task_modules(settings.imports)
        if processes > 1:
            sys.exit(_supervise(processes, settings))
        code = asyncio.run(_serve(backend, settings))
        _exit_abandoning_threads(code)


#: The signals that stop a worker: the first gracefully, a second at once.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StoppedBeforeStart(BaseException):
    """A first SIGINT or SIGTERM that came before the worker's own handlers were set."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


def _raise_stopped_before_start(signum: int, frame: object) -> None:
    raise _StoppedBeforeStart(signum)


@contextlib.contextmanager
def _stop_before_start() -> Iterator[None]:
    """Until the worker sets its own handlers (after imports and connecting), a first
    signal means "stop before starting": exit 0 as documented, not click's "Aborted!"
    (SIGINT) or death by SIGTERM."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stopped_before_start)
    try:
        yield
    except _StoppedBeforeStart as stopped:
        logger.info("%s received before the worker started: exiting", stopped.signal_name)
        _flush()
        sys.exit(0)


def _import_task_modules(modules: Sequence[str]) -> None:
    # The current directory is on sys.path (see sitq.cli.app.cli).
    for module in modules:
        try:
            importlib.import_module(module)
        except (Exception, SystemExit) as exc:
            raise CliError(
                f"cannot import task module {module!r}: {type(exc).__name__}: {exc}",
                EXIT_USAGE,
            ) from None


# -- one worker process --------------------------------------------------------------


async def _serve(backend: Backend, settings: WorkerSettings) -> int:
    try:
        worker = Worker(
            backend,
            max_concurrency=settings.concurrency,
            poll_interval=settings.poll_interval,
            visibility_timeout=settings.visibility_timeout,
            queues=settings.queues,
            retention=settings.retention,
            name=settings.name,
        )
    except ValidationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            logger.info(
                "%s received: claiming stopped, finishing running tasks (grace %gs); "
                "send it again to exit at once",
                name,
                settings.grace,
            )
            stop.set()
            return
        logger.warning(
            "%s received again: exiting now; unfinished tasks run again when their leases expire",
            name,
        )
        _flush()
        os._exit(128 + signum)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)

    await backend.open()
    queues = ",".join(settings.queues) if settings.queues else "*"
    logger.info(
        "worker %s started: queues=%s concurrency=%d burst=%s",
        worker.name,
        queues,
        settings.concurrency,
        settings.burst,
    )
    if settings.burst:
        due = await _due_count(worker, backend, settings)
        logger.info("burst: %d tasks due or running; running them, then exiting", due)
    serving = asyncio.create_task(worker.serve(burst=settings.burst))
    watchers: list[asyncio.Task[object]] = [asyncio.create_task(stop.wait())]
    if settings.burst:
        watchers.append(asyncio.create_task(_report_progress(worker, backend, settings)))
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor:
        watchers.append(asyncio.create_task(_watch_supervisor(int(supervisor), stop)))
    try:
        await asyncio.wait({serving, watchers[0]}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            await worker.stop(timeout=settings.grace)
        # Cancelled by stop() when the storage stayed down past the grace period.
        processed = worker.processed if serving.cancelled() else await serving
    finally:
        for watcher in watchers:
            watcher.cancel()
        for watcher in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await backend.close()
    logger.info("worker %s stopped: %d tasks processed", worker.name, processed)
    # What is left on the loop is a task handed back after --grace that ignored its
    # cancellation: asyncio.run would wait for it for ever before exiting.
    stubborn = asyncio.all_tasks() - {asyncio.current_task()}
    if stubborn:
        logger.warning("exiting with %d task coroutines that ignored cancellation", len(stubborn))
        _flush()
        os._exit(0)
    return 0


async def _due_count(worker: Worker, backend: Backend, settings: WorkerSettings) -> int:
    stats = await backend.queue_stats(worker.clock.now())
    return sum(
        s.pending + s.running
        for s in stats
        if settings.queues is None or s.queue in settings.queues
    )


async def _report_progress(worker: Worker, backend: Backend, settings: WorkerSettings) -> None:
    """Burst mode: how many tasks ran and how many are left, on stderr (a line that
    rewrites itself on a terminal, a log line every few seconds otherwise)."""
    interactive = sys.stderr.isatty()
    every = 0.5 if interactive else 2.0
    try:
        while True:
            await asyncio.sleep(every)
            left = await _due_count(worker, backend, settings)
            line = f"burst: {worker.processed} processed, {left} due or running"
            if interactive:
                sys.stderr.write(f"\r{line}   ")
                sys.stderr.flush()
            else:
                logger.info("%s", line)
    finally:
        if interactive:
            sys.stderr.write("\n")


async def _watch_supervisor(pid: int, stop: asyncio.Event) -> None:
    # No portable event tells a child its parent died; polling getppid() once a second
    # costs nothing.
    while os.getppid() == pid:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    logger.warning("supervisor %d is gone: stopping", pid)
    stop.set()


def _flush() -> None:
    for handler in logging.getLogger("sitq").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def _exit_abandoning_threads(code: int) -> None:
    """Exit; sync tasks abandoned after the grace period must not hold the process."""
    threads = [t for t in threading.enumerate() if t.name.startswith("sitq-task")]
    # Idle threads were told to exit when the worker stopped, but may not have yet:
    # give them a moment, so that only threads still running a task count as stuck.
    deadline = time.monotonic() + IDLE_THREAD_EXIT_SECONDS
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        logger.warning("exiting with %d abandoned task threads still running", len(stuck))
        _flush()
        os._exit(code)
    sys.exit(code)


# -- several processes ---------------------------------------------------------------


def _child_command(settings: WorkerSettings, index: int) -> list[str]:
    args = [sys.executable, "-m", "sitq.cli", "worker", "--processes", "1"]
    args += ["--concurrency", str(settings.concurrency)]
    args += ["--poll-interval", repr(settings.poll_interval)]
    args += ["--visibility-timeout", repr(settings.visibility_timeout)]
    args += ["--grace", repr(settings.grace)]
    retention = settings.retention
    args += ["--retention", "never" if retention is None else repr(retention.total_seconds())]
    args += ["--log-level", settings.log_level, "--log-format", settings.log_format]
    for queue in settings.queues or ():
        args += ["--queues", queue]
    for module in settings.imports:
        args += ["--import", module]
    if settings.name:
        args += ["--name", f"{settings.name}-{index}"]
    if settings.burst:
        args.append("--burst")
    return args


def _supervise(count: int, settings: WorkerSettings) -> int:
    # The URL travels in the environment: it may hold a password, argv is public.
    env = dict(os.environ, **{BACKEND_ENV: settings.backend_url, SUPERVISOR_ENV: str(os.getpid())})
    received: list[int] = []
    children: dict[int, tuple[int, subprocess.Popen[bytes], float]] = {}
    forwarded: dict[int, int] = {}  # pid -> how many of the signals received it was sent

    def deliver(proc: subprocess.Popen[bytes]) -> None:
        # Always SIGTERM: a child still starting Python dies of it quietly (an exit the
        # loop below counts as clean), where SIGINT would fail its start with 1.
        while forwarded.get(proc.pid, 0) < len(received):
            forwarded[proc.pid] = forwarded.get(proc.pid, 0) + 1
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def spawn(index: int) -> None:
        # Own session: a terminal's Ctrl-C reaches only us, and we forward it once.
        proc = subprocess.Popen(_child_command(settings, index), env=env, start_new_session=True)
        # A signal that came during Popen found no child to send to: send it now.
        # Blocked meanwhile, so a signal now waits until the child is known, and is
        # sent once.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            children[proc.pid] = (index, proc, time.monotonic())
            deliver(proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for _, proc, _ in list(children.values()):
            deliver(proc)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(count):
        if not received:  # a signal during start-up stops the ones already started
            spawn(index)
    logger.info("supervisor started %d worker processes", count)
    worst = 0
    while children:
        pid, status = os.waitpid(-1, 0)
        if pid not in children:
            continue
        index, proc, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if received:
            if code == -signal.SIGTERM:  # stopped by our signal before its handlers were set
                code = 0
            worst = max(worst, abs(code) if code < 0 else code)
            continue
        if settings.burst and code == 0:
            continue
        if time.monotonic() - started < RESTART_AFTER_SECONDS:
            logger.error("worker process %d exited with %d at start; stopping", pid, code)
            forward(signal.SIGTERM, None)
            worst = max(worst, code if code > 0 else 1)
            continue
        logger.warning("worker process %d exited with %d; starting a new one", pid, code)
        spawn(index)
    if len(received) > 1:
        return 128 + received[-1]
    return worst
