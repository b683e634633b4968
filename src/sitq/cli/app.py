"""The ``sitq`` command group and its inspection commands (tasks, queues, messages,
purge, migrate). The worker command lives in :mod:`sitq.cli.worker`."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ClassVar

import click

from sitq.backends.base import QueueStats, TaskQuery
from sitq.backends.sqlite import SQLiteBackend
from sitq.cli import output
from sitq.cli.common import (
    EXIT_BACKEND,
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    CliError,
    backend_option,
    checked_queue_name,
    json_option,
    limit_option,
    open_backend,
    parsed_by,
    with_queue,
)
from sitq.core import FINISHED_STATUSES, Task, TaskStatus
from sitq.errors import SitqError, TaskNotFoundError, ValidationError
from sitq.queue import PURGEABLE, TaskQueue

STATUS_CHOICE = click.Choice([status.value for status in TaskStatus])
FINISHED_CHOICE = click.Choice(sorted(status.value for status in FINISHED_STATUSES))


class AliasedGroup(click.Group):
    """A group that also answers to singular names (``sitq message list``, as in pgqrs)."""

    aliases: ClassVar[dict[str, str]] = {"task": "tasks", "message": "messages"}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))


@click.group(cls=AliasedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sitq", prog_name="sitq")
def cli() -> None:
    """sitq: run a worker and inspect the queues of a sitq backend.

    The backend comes from --backend or SITQ_BACKEND_URL. Exit codes: 0 ok,
    1 not found, 2 usage error, 3 database error, 4 not allowed in the task's state.
    """
    output.quiet_logging()  # `sitq worker` sets up its own logging
    # Like `python -m sitq.cli`: modules in the current directory import, for a
    # worker's task modules and for results of types defined there (`tasks show`).
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        return  # deleted: nothing to import from it, and an absolute URL still works
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


# -- tasks -------------------------------------------------------------------------


@cli.group()
def tasks() -> None:
    """List, show, cancel and retry tasks."""


@tasks.command("list")
@backend_option
@click.option("--status", type=STATUS_CHOICE, help="Only tasks in this status.")
@click.option("--queue", callback=checked_queue_name, help="Only tasks in this queue.")
@limit_option
@json_option
def tasks_list(
    backend_url: str | None, status: str | None, queue: str | None, limit: int, as_json: bool
) -> None:
    """Tasks, newest first."""
    found = with_queue(backend_url, lambda q: q.list_tasks(status, queue, limit))
    if as_json:
        output.emit_json([output.task_dict(task) for task in found])
    elif found:
        click.echo(output.task_table(found))
    else:
        click.echo("no tasks", err=True)


async def _known(queue: TaskQueue, task_id: str) -> Task:
    task = await queue.get_task(task_id)
    if task is None:
        raise CliError(f"no task with id {task_id!r}", EXIT_NOT_FOUND)
    return task


@tasks.command("show")
@backend_option
@click.argument("task_id")
@click.option("--result", "show_result", is_flag=True, help="Unpickle and print the result.")
@json_option
def tasks_show(backend_url: str | None, task_id: str, show_result: bool, as_json: bool) -> None:
    """One task with its error and traceback."""

    async def work(queue: TaskQueue) -> tuple[Task, str | None]:
        task = await _known(queue, task_id)
        value = None
        if show_result and task.result is not None:
            # The task is shown whatever its value does: a custom serializer may raise
            # anything, and repr() too (an int past Python's digit limit).
            try:
                loaded = queue.serializer.loads(task.result)
            except Exception as exc:
                value = f"<cannot decode: {exc}>"
            else:
                try:
                    value = repr(loaded)
                except Exception as exc:
                    value = f"<a {type(loaded).__name__} whose repr() failed: {exc}>"
        return task, value

    task, value = with_queue(backend_url, work)
    if as_json:
        data = output.task_dict(task, full=True)
        if show_result:
            data["result"] = value
        output.emit_json(data)
        return
    click.echo(output.task_details(task))
    if value is not None:
        click.echo(f"result value: {value}")


@tasks.command("cancel")
@backend_option
@click.argument("task_id")
@json_option
def tasks_cancel(backend_url: str | None, task_id: str, as_json: bool) -> None:
    """Cancel a pending, scheduled or running task (a recurring series stops)."""

    async def work(queue: TaskQueue) -> Task:
        task = await _known(queue, task_id)
        if task.status.is_finished or not await queue.cancel(task_id):
            latest = await queue.get_task(task_id) or task
            raise CliError(
                f"task {task_id} is already {latest.status.value}; nothing to cancel",
                EXIT_CONFLICT,
            )
        return await queue.get_task(task_id) or task

    task = with_queue(backend_url, work)
    running = task.status is TaskStatus.RUNNING
    if as_json:
        output.emit_json({"id": task_id, "cancelled": True, "status": task.status.value})
    elif running:
        click.echo(f"cancellation of running task {task_id} requested")
    else:
        click.echo(f"cancelled task {task_id}")


@tasks.command("retry")
@backend_option
@click.argument("task_id")
@json_option
def tasks_retry(backend_url: str | None, task_id: str, as_json: bool) -> None:
    """Re-queue a failed, dead or cancelled task with fresh attempts."""

    async def work(queue: TaskQueue) -> None:
        task = await _known(queue, task_id)
        if not await queue.retry(task_id):
            raise CliError(
                f"task {task_id} is {task.status.value}; only failed, dead or cancelled "
                "tasks can be retried",
                EXIT_CONFLICT,
            )

    with_queue(backend_url, work)
    if as_json:
        output.emit_json({"id": task_id, "requeued": True})
    else:
        click.echo(f"re-queued task {task_id}")


# -- queues and messages -------------------------------------------------------------


@cli.command("queues")
@backend_option
@json_option
def queues_command(backend_url: str | None, as_json: bool) -> None:
    """One row per queue: job counts by status and the age of the oldest pending job."""

    async def work(queue: TaskQueue) -> list[dict[str, Any]]:
        now = queue.clock.now()
        return [output.queue_dict(stats, now) for stats in await queue.queue_stats()]

    rows = with_queue(backend_url, work)
    if as_json:
        output.emit_json(rows)
    elif rows:
        click.echo(output.queue_table(rows))
    else:
        click.echo("no queues (no jobs stored)", err=True)


@cli.group("queue")
def queue_group() -> None:
    """One queue: metrics."""


@queue_group.command("metrics")
@backend_option
@click.argument("name", callback=checked_queue_name)
@json_option
def queue_metrics(backend_url: str | None, name: str, as_json: bool) -> None:
    """Counts, scheduled backlog, oldest pending age and next due time of one queue.

    A queue exists while it holds jobs; one without jobs shows zeros.
    """

    async def work(queue: TaskQueue) -> dict[str, Any]:
        now = queue.clock.now()
        stats = next((s for s in await queue.queue_stats() if s.queue == name), None)
        metrics = output.queue_dict(stats or QueueStats(queue=name), now)
        due = [
            moment
            for kind in ("task", "message")
            if (moment := await queue.backend.next_due(kind, (name,))) is not None
        ]
        newest = await queue.backend.list_jobs(TaskQuery(queue=name, limit=1))
        metrics["next_due_at"] = output.iso(min(due)) if due else None
        metrics["newest_enqueued_at"] = output.iso(newest[0].enqueued_at) if newest else None
        return metrics

    metrics = with_queue(backend_url, work)
    if as_json:
        output.emit_json(metrics)
    else:
        click.echo(output.metrics_text(metrics))


@cli.group()
def messages() -> None:
    """JSON messages (jobs for consumers rather than workers)."""


@messages.command("list")
@backend_option
@click.option("--queue", callback=checked_queue_name, help="Only messages in this queue.")
@click.option("--status", type=STATUS_CHOICE, help="Only messages in this status.")
@limit_option
@json_option
def messages_list(
    backend_url: str | None, queue: str | None, status: str | None, limit: int, as_json: bool
) -> None:
    """Messages newest first, with their payloads and when each becomes visible."""
    query = TaskQuery(
        status=None if status is None else TaskStatus(status),
        queue=queue,
        kind="message",
        limit=limit,
        payloads=True,
    )
    found = with_queue(backend_url, lambda q: q.backend.list_jobs(query))
    if as_json:
        output.emit_json([output.message_dict(message) for message in found])
    elif found:
        click.echo(output.message_table(found))
    else:
        click.echo("no messages", err=True)


# -- maintenance ---------------------------------------------------------------------


@cli.command()
@backend_option
@click.option(
    "--older-than",
    callback=parsed_by(output.parse_duration),
    required=True,
    help="Only jobs that finished longer ago than this: 7d, 12h, 30m, 45s, 1h30m.",
)
@click.option(
    "--status",
    "statuses",
    type=FINISHED_CHOICE,
    multiple=True,
    help="Only jobs in this finished status (repeatable; default: every finished one).",
)
@json_option
def purge(
    backend_url: str | None, older_than: timedelta, statuses: Sequence[str], as_json: bool
) -> None:
    """Delete finished jobs, one status at a time and in batches, reporting each batch
    on stderr."""
    # dict.fromkeys: each status once, in the order given.
    wanted = list(dict.fromkeys(TaskStatus(s) for s in statuses)) if statuses else list(PURGEABLE)

    async def work(queue: TaskQueue) -> dict[str, int]:
        removed: dict[str, int] = {}
        for index, status in enumerate(wanted, start=1):
            step = f"[{index}/{len(wanted)}] {status.value}"

            def report(count: int, step: str = step) -> None:
                click.echo(f"{step}: removed {count}", err=True)

            removed[status.value] = await queue.purge(older_than, [status], progress=report)
        return removed

    removed = with_queue(backend_url, work)
    total = sum(removed.values())
    if as_json:
        output.emit_json({"purged": total, "by_status": removed})
    else:
        click.echo(f"purged {total} jobs finished more than {older_than} ago")


@cli.command()
@backend_option
def migrate(backend_url: str | None) -> None:
    """Create or upgrade the database schema (PostgreSQL; SQLite does it by itself)."""
    backend = open_backend(backend_url, must_exist=False)
    upgrade = getattr(backend, "migrate", None)

    async def go() -> int | None:
        if upgrade is not None:
            # Without open(), which would migrate first and leave nothing to count.
            applied: int = await upgrade()
            return applied
        try:
            await backend.open()  # SQLite creates and upgrades its schema here
        finally:
            await backend.close()
        return None

    applied = asyncio.run(go())
    if applied is not None:
        schema = getattr(backend, "schema", None)
        where = f"schema {schema}" if schema else "schema"
        click.echo(f"applied {applied} migration(s); {where} is up to date")
    elif isinstance(backend, SQLiteBackend):
        click.echo(
            f"SQLite creates and upgrades its schema automatically on open; "
            f"{backend.path} is up to date"
        )
    else:
        click.echo("this backend has no schema to migrate")


# -- entry point ---------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: run ``cli``; turn every error into one line and an exit code.

    ``SITQ_DEBUG=1`` shows the traceback of unexpected errors.
    """
    try:
        cli.main(args=argv, prog_name="sitq")
    except Exception as exc:
        if os.environ.get("SITQ_DEBUG"):
            raise
        if isinstance(exc, ValidationError):
            code, message = EXIT_USAGE, _first_line(exc)
        elif isinstance(exc, TaskNotFoundError):
            code, message = EXIT_NOT_FOUND, _first_line(exc)
        elif isinstance(exc, SitqError):
            code, message = EXIT_BACKEND, _first_line(exc)
        else:
            code = EXIT_BACKEND
            message = (
                f"unexpected {type(exc).__name__}: {_first_line(exc)}"
                " (set SITQ_DEBUG=1 for the traceback)"
            )
        click.echo(f"Error: {message}", err=True)
        sys.exit(code)
