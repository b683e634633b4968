"""huey's side of the SQLite benchmark: one SqliteHuey with default settings.

The database file comes from ``SITQ_BENCH_HUEY_DB`` so the parent and the consumer
process (which imports this module) share it. ``SITQ_BENCH_HUEY_FSYNC=0`` passes
``fsync=False`` (``PRAGMA synchronous=OFF``); huey 3's default leaves SQLite's
``synchronous=FULL`` (an fsync per commit), while sitq uses ``NORMAL``.
"""

from __future__ import annotations

import os
import tempfile

from common import stamp as write_stamp
from huey import SqliteHuey

_options = {"fsync": False} if os.environ.get("SITQ_BENCH_HUEY_FSYNC") == "0" else {}
huey = SqliteHuey(
    "bench",
    filename=os.environ.get(
        "SITQ_BENCH_HUEY_DB", os.path.join(tempfile.gettempdir(), "sitq-huey-bench.db")
    ),
    **_options,
)


@huey.task()
def noop() -> None:
    return None


@huey.task()
def stamp(path: str, key: str = "-") -> None:
    write_stamp(path, key)
