"""Objects holding state that belongs to one process (locks, connections, loops): a
forked child starts theirs afresh instead of using copies of its parent's."""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class ProcessLocal(Protocol):
    def _start_in_this_process(self) -> None:
        """Set the state that belongs to one process: at creation, and again in the
        child of a fork."""


_OBJECTS: weakref.WeakSet[ProcessLocal] = weakref.WeakSet()


def renew_after_fork(obj: ProcessLocal) -> None:
    """Have ``obj._start_in_this_process()`` called in every forked child it reaches."""
    _OBJECTS.add(obj)


def _after_fork_in_child() -> None:
    for obj in list(_OBJECTS):
        obj._start_in_this_process()


if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
