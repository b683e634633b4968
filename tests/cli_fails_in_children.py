"""A task module that imports in a ``--processes`` supervisor but fails to import in
its worker processes: a worker that fails at start, as with a bad configuration."""

import os

if "SITQ_SUPERVISOR_PID" in os.environ:
    raise RuntimeError("this worker process is misconfigured")
