"""Run one huey consumer process (thread workers) until SIGTERM.

usage: huey_worker.py [--workers N]   (database: SITQ_BENCH_HUEY_DB)

Every other consumer setting is huey's default: polling starts at 0.1 s and backs off
by 1.15x up to 10 s while the queue is empty; the scheduler runs once a second.
"""

from __future__ import annotations

import argparse
import logging

from huey_tasks import huey


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    huey.create_consumer(workers=args.workers, worker_type="thread").run()


if __name__ == "__main__":
    main()
