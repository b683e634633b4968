"""Build a backend from a URL: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
``memory://``, ``postgresql://user@host/db`` (needs the ``sitq[postgres]`` extra)."""

from __future__ import annotations

from urllib.parse import urlsplit

from sitq.backends.base import Backend
from sitq.errors import ValidationError


def backend_from_url(url: str) -> Backend:
    """The backend a URL names; a clear ``ValidationError`` for anything else."""
    if not isinstance(url, str) or "://" not in url:
        raise ValidationError(
            f"backend URL must look like sqlite:///path.db or postgresql://host/db, got {url!r}"
        )
    scheme = urlsplit(url).scheme.lower()
    # Schemes are case-insensitive (RFC 3986); libpq takes only lower case.
    url = scheme + url[len(scheme) :]
    if scheme == "sqlite":
        from sitq.backends.sqlite import SQLiteBackend

        path = url[len("sqlite://") :]
        if "?" in path or "#" in path:
            # Not options: they would end up in the file's name.
            raise ValidationError(f"sqlite URL takes no ?query or #fragment, got {url!r}")
        # sqlite:///tasks.db is relative, sqlite:////var/tasks.db absolute (SQLAlchemy's rule).
        file = path[1:]
        if not path.startswith("/") or not file or file.endswith("/"):
            raise ValidationError(f"sqlite URL needs a file path (sqlite:///file.db), got {url!r}")
        return SQLiteBackend(file)
    if scheme == "memory":
        from sitq.backends.memory import MemoryBackend

        return MemoryBackend()
    if scheme in {"postgres", "postgresql"}:
        try:
            from sitq.backends.postgres import PostgresBackend
        except ImportError as exc:
            raise ValidationError(
                "PostgreSQL support is not installed: pip install 'sitq[postgres]'"
            ) from exc
        return PostgresBackend(url)
    raise ValidationError(
        f"unknown backend scheme {scheme!r} in {url!r}; use sqlite, postgresql or memory"
    )
