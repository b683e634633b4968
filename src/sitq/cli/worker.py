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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import click

from sitq.backends.base import Backend
from sitq.cli.common import BACKEND_ENV, EXIT_USAGE, CliError, backend_option, open_backend
from sitq.cli.output import configure_logging, parse_duration
from sitq.errors import ValidationError
from sitq.worker import Worker

logger = logging.getLogger("sitq.cli")

#: A child of ``--processes`` watches this pid and stops when its supervisor is gone.
SUPERVISOR_ENV = "SITQ_SUPERVISOR_PID"
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
    help="Delete finished jobs older than this (or 'never').",
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
@click.option("--name", envvar="SITQ_WORKER_NAME", help="Worker name (default host:pid:id).")
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
    retention: str,
    imports: Sequence[str],
    name: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run tasks until SIGTERM or SIGINT (a second signal exits at once)."""
    try:
        kept = _retention(retention)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--retention") from None
    configure_logging(log_level, log_format)
    backend = open_backend(backend_url, must_exist=False)
    assert backend_url is not None  # open_backend refused a missing URL
    settings = WorkerSettings(
        backend_url=backend_url,
        queues=tuple(_split(queues)) or None,
        concurrency=concurrency,
        poll_interval=poll_interval,
        visibility_timeout=visibility_timeout,
        grace=grace,
        burst=burst,
        retention=kept,
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


def _import_task_modules(modules: Sequence[str]) -> None:
    # Like `python -m`: task modules next to where the worker was started import.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
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

    for signum in (signal.SIGINT, signal.SIGTERM):
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
        processed = await serving
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
    stuck = [t for t in threading.enumerate() if t.name.startswith("sitq-task") and t.is_alive()]
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

    def spawn(index: int) -> None:
        # Own session: a terminal's Ctrl-C reaches only us, and we forward it once.
        proc = subprocess.Popen(_child_command(settings, index), env=env, start_new_session=True)
        children[proc.pid] = (index, proc, time.monotonic())

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for _, proc, _ in children.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

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
            if code == -received[0]:  # stopped by our signal before its handlers were set
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
