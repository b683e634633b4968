"""What every ``sitq`` subcommand shares: exit codes, the backend option, opening it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from sitq.backends.base import Backend
from sitq.backends.sqlite import SQLiteBackend
from sitq.backends.url import backend_from_url
from sitq.errors import BackendError, ValidationError
from sitq.queue import TaskQueue, queue_name
from sitq.validation import INT32_MAX

T = TypeVar("T")

#: Exit codes; stable, documented in docs/cli.md.
EXIT_OK = 0
EXIT_NOT_FOUND = 1  # unknown task id, database file or directory that does not exist
EXIT_USAGE = 2  # bad option, unparsable URL or duration, module that cannot be imported
EXIT_BACKEND = 3  # the database failed or cannot be reached
EXIT_CONFLICT = 4  # the task is in a state that does not allow the operation

BACKEND_ENV = "SITQ_BACKEND_URL"


class CliError(click.ClickException):
    """A one-line error for the user, with the exit code it maps to."""

    def __init__(self, message: str, exit_code: int = EXIT_NOT_FOUND) -> None:
        super().__init__(message)
        # click declares exit_code per class; one class with a code per instance is simpler.
        self.exit_code = exit_code  # type: ignore[misc]


backend_option = click.option(
    "--backend",
    "-b",
    "backend_url",
    envvar=BACKEND_ENV,
    show_envvar=True,
    metavar="URL",
    help="Where jobs are stored: sqlite:///rel.db, sqlite:////abs.db, postgresql://...",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")

limit_option = click.option(
    "--limit", type=click.IntRange(min=1, max=INT32_MAX), default=50, show_default=True
)


def parsed_by(
    parse: Callable[[Any], T],
) -> Callable[[click.Context, click.Parameter, Any], T | None]:
    """A click callback that turns an option's value into ``parse(value)``: what
    ``parse`` refuses with a ValueError (ValidationError is one) is a usage error
    naming the option, not an unexpected error (exit 3) from deeper down."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> T | None:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None

    return callback


#: A queue name the API accepts (one no backend can store exited 3).
checked_queue_name = parsed_by(queue_name)


def open_backend(url: str | None, *, must_exist: bool) -> Backend:
    """The backend ``url`` names, checked enough to fail with one clear line.

    ``must_exist``: an SQLite file or a PostgreSQL schema that does not exist is an
    error rather than being created (inspection must not leave empty databases or
    schemas behind after a typo).
    """
    if not url:
        raise CliError(f"no backend: pass --backend URL or set {BACKEND_ENV}", EXIT_USAGE)
    try:
        backend = backend_from_url(url)
    except ValidationError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except BackendError as exc:
        # An SQLite path that leads nowhere: the current directory was deleted, a
        # symlink loop, ~user naming no one.
        raise CliError(str(exc), EXIT_NOT_FOUND) from None
    # The CLI is the one place that knows a URL names a file on this machine.
    if isinstance(backend, SQLiteBackend):
        if not backend.path.parent.is_dir():
            raise CliError(
                f"cannot open {url}: directory {backend.path.parent} does not exist",
                EXIT_NOT_FOUND,
            )
        if must_exist and not backend.path.is_file():
            raise CliError(
                f"database {backend.path} does not exist (a worker or `sitq migrate` creates it)",
                EXIT_NOT_FOUND,
            )
        if must_exist and not _holds_sitq_tables(backend.path):
            raise CliError(
                f"{backend.path} is an SQLite database without sitq's tables "
                "(a worker or `sitq migrate` creates them)",
                EXIT_NOT_FOUND,
            )
    if urlsplit(url).scheme.lower() in {"postgres", "postgresql"}:
        schema: str = getattr(backend, "schema", "sitq")
        if not _check_postgres(getattr(backend, "dsn", url), schema) and must_exist:
            raise CliError(
                f'no sitq schema "{schema}" in this database '
                "(a worker or `sitq migrate` creates it)",
                EXIT_NOT_FOUND,
            )
    return backend


def _holds_sitq_tables(path: Path) -> bool:
    """Whether the SQLite file at ``path`` has sitq's jobs table, looked up read-only:
    opening it as a backend would create the tables (and switch it to WAL), turning
    any database a typo names into a sitq one. ``True`` for what is not an SQLite
    database at all: the backend reports that, as it does for a worker."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sitq_jobs'"
            ).fetchone()
    except sqlite3.DatabaseError:
        return True
    return row is not None


def _check_postgres(dsn: str, schema: str) -> bool:
    """Connect once, so a wrong host or database fails at once with the server's words
    (the backend's pool retries quietly until its timeout). Returns whether sitq's
    tables exist in ``schema``."""
    import psycopg

    from sitq.backends.postgres import with_connect_timeout

    try:
        with psycopg.connect(with_connect_timeout(dsn, 10)) as conn:
            row = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".sitq_jobs',)).fetchone()
    except psycopg.Error as exc:
        text = " ".join(str(exc).split())
        missing = re.search(r'database "[^"]*" does not exist', text) is not None
        raise CliError(
            f"cannot connect to PostgreSQL: {text}", EXIT_NOT_FOUND if missing else EXIT_BACKEND
        ) from None
    return row is not None and row[0] is not None


def with_queue(url: str | None, work: Callable[[TaskQueue], Awaitable[T]]) -> T:
    """Open the backend at ``url`` (which must exist), run ``work``, close it."""
    backend = open_backend(url, must_exist=True)

    async def go() -> T:
        async with TaskQueue(backend) as queue:
            return await work(queue)

    return asyncio.run(go())
