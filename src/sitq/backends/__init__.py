"""Storage backends. ``backend_from_url`` picks one from a URL."""

from __future__ import annotations

from sitq.backends.base import Backend
from sitq.backends.memory import MemoryBackend
from sitq.backends.sqlite import SQLiteBackend

__all__ = ["Backend", "MemoryBackend", "SQLiteBackend"]
