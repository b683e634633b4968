"""The ``sitq`` console command. ``main`` is the entry point; ``cli`` the click group."""

from __future__ import annotations

from sitq.cli.app import cli, main
from sitq.cli.worker import worker_command

cli.add_command(worker_command)

__all__ = ["cli", "main"]
