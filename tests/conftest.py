"""Shared fixtures. ``backend`` runs a test once per backend (the conformance suite).

PostgreSQL tests use ``SITQ_TEST_POSTGRES_DSN`` (default: the local server). When no
server answers they skip with the reason, except under ``CI=true`` where that fails.
Each PostgreSQL test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from sitq import MemoryBackend, SQLiteBackend
from sitq.backends.base import Backend

POSTGRES_DSN = os.environ.get("SITQ_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ON_CI = os.environ.get("CI", "").lower() == "true"


def postgres_unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here, or ``None`` if they can."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'sitq[postgres]')"
    try:
        with psycopg.connect(POSTGRES_DSN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"no PostgreSQL server answers at {POSTGRES_DSN}: {exc}".strip()


_PG_REASON: list[str | None] = []


def require_postgres() -> None:
    """Skip (or, on CI, fail) the calling test when PostgreSQL is not reachable."""
    if not _PG_REASON:
        _PG_REASON.append(postgres_unavailable())
    reason = _PG_REASON[0]
    if reason is None:
        return
    if ON_CI:
        pytest.fail(f"PostgreSQL is required on CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema name for this test, dropped afterwards."""
    require_postgres()
    import psycopg

    name = f"sitq_test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def sessions_named(application_name: str) -> int:
    """Open sessions carrying ``application_name``: a test's own, whatever else runs
    on the server (other tests' schemas share the database)."""
    import psycopg

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


BACKEND_KINDS = ["memory", "sqlite", "postgres"]


@pytest.fixture
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], Backend]:
    """A factory: ``make_backend(kind)`` returns a fresh, isolated backend of that kind.

    Calling it twice with the same kind in one test returns two objects on the same
    storage (two "processes" sharing one database), except for memory.
    """
    shared_memory: dict[str, MemoryBackend] = {}

    def make(kind: str) -> Backend:
        if kind == "memory":
            return shared_memory.setdefault("m", MemoryBackend())
        if kind == "sqlite":
            return SQLiteBackend(tmp_path / "sitq.db")
        if kind == "postgres":
            schema = request.getfixturevalue("pg_schema")
            from sitq.backends.postgres import PostgresBackend

            return PostgresBackend(POSTGRES_DSN, schema=schema)
        raise ValueError(kind)

    return make


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind == "postgres":
        require_postgres()
    return kind


@pytest.fixture
async def backend(
    backend_kind: str, make_backend: Callable[[str], Backend]
) -> AsyncIterator[Backend]:
    """Every backend in turn, opened, closed after the test."""
    instance = make_backend(backend_kind)
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()
