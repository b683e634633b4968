"""Build a backend from a URL: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
``memory://``, ``postgresql://user@host/db`` (needs the ``sitq[postgres]`` extra)."""

from __future__ import annotations

from sitq.backends.base import Backend
from sitq.errors import ValidationError


def backend_from_url(url: str) -> Backend:
    """The backend a URL names; a clear ``ValidationError`` for anything else."""
    if not isinstance(url, str) or "://" not in url:
        raise ValidationError(
            f"backend URL must look like sqlite:///path.db or postgresql://host/db, got {url!r}"
        )
    if url != url.strip():
        # Refused, not stripped: it is a slip (an env file's stray space or CR), and
        # stripping would guess, as a space may end a file or database name.
        raise ValidationError(f"backend URL must not start or end with whitespace, got {url!r}")
    # The scheme is what the URL starts with: urlsplit() skips leading whitespace and
    # control characters, so its scheme's length does not say where the rest begins.
    scheme, _, rest = url.partition("://")
    # Schemes are case-insensitive (RFC 3986); libpq takes only lower case.
    scheme = scheme.lower()
    url = f"{scheme}://{rest}"
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
