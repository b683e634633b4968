"""Part 1: sitq on SQLiteBackend against huey's SqliteHuey, each in a fresh file."""

from __future__ import annotations

from pathlib import Path

from huey_bench import HueyNoFsync, HueySystem
from scenarios import System
from sitq_bench import SitqSystem

from sitq import SQLiteBackend


class SitqSqlite(SitqSystem):
    name = "sitq"

    def new_backend(self) -> SQLiteBackend:
        self.db = self.new_path("db") + ".sqlite3"
        return SQLiteBackend(self.db)

    def worker_args(self) -> list[str]:
        return [f"sqlite://{self.db}"]


def systems(scratch: Path) -> list[System]:
    return [SitqSqlite(scratch), HueySystem(scratch), HueyNoFsync(scratch)]
