"""A task module that takes its time to import, for signals that reach a worker while
it starts. With ``SITQ_TEST_IMPORT_MARKERS`` set to a directory, importing it touches
a file named after the process there, then sleeps a minute; only in the processes of
a ``--processes`` supervisor (not the supervisor itself) when
``SITQ_TEST_SLOW_IN_CHILDREN`` is set."""

from __future__ import annotations

import os
import time
from pathlib import Path

_markers = os.environ.get("SITQ_TEST_IMPORT_MARKERS")
_child = "SITQ_SUPERVISOR_PID" in os.environ
if _markers and (_child or not os.environ.get("SITQ_TEST_SLOW_IN_CHILDREN")):
    (Path(_markers) / str(os.getpid())).touch()
    time.sleep(60)
