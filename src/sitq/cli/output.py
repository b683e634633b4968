"""Presentation for the ``sitq`` command: tables, JSON, times, durations and logging.

Nothing here touches a backend, so every function is a plain function of its input.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import click

from sitq.backends.base import QueueStats
from sitq.core import Task
from sitq.json_payload import payload_or_bytes
from sitq.metrics import metrics_from
from sitq.scheduling import MAX_DURATION
from sitq.worker import TASK_FIELDS

#: How much of a message's payload a table row shows.
PAYLOAD_PREVIEW = 40

# -- durations -------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``1h30m``, ``1.5h`` or plain seconds (``90``)."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        pos = 0
        seconds = 0.0
        for match in _DURATION_PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            raise ValueError(
                f"{text!r} is not a duration; use e.g. 7d, 12h, 30m, 45s, 1h30m or seconds"
            ) from None
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a duration: it must be a finite, non-negative time")
    # The API's limit, checked here so the error names the option (and before
    # timedelta, which overflows from about 2.7 million years).
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is too long: at most {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


def format_age(delta: timedelta | None) -> str:
    """A compact age: ``45s``, ``3m12s``, ``2h05m``, ``3d04h``; ``-`` for none."""
    if delta is None:
        return "-"
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


# -- tables and JSON -------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns (numbers right-aligned), two spaces apart."""
    cells = [[str(cell) for cell in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int) for row in rows) and bool(rows) for i in range(len(headers))
    ]
    widths = [
        max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 3] + "..."


def task_dict(task: Task, *, full: bool = False) -> dict[str, Any]:
    """A task as JSON: every field; ``traceback`` and result size only with ``full``."""
    data: dict[str, Any] = {
        "id": task.id,
        "queue": task.queue,
        "kind": task.kind,
        "status": task.status.value,
        "priority": task.priority,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "enqueued_at": iso(task.enqueued_at),
        "available_at": iso(task.available_at),
        "started_at": iso(task.started_at),
        "finished_at": iso(task.finished_at),
        "interval_seconds": None if task.interval is None else task.interval.total_seconds(),
        "series_id": task.series_id,
        "error": task.error,
    }
    if full:
        data["traceback"] = task.traceback
        data["result_bytes"] = None if task.result is None else len(task.result)
    return data


def task_table(tasks: Sequence[Task]) -> str:
    rows = [
        (
            task.id,
            task.queue,
            task.status.value,
            f"{task.attempts}/{task.max_attempts}",
            format_time(task.enqueued_at),
            format_time(task.available_at),
            format_time(task.finished_at),
            short(task.error, 50),
        )
        for task in tasks
    ]
    headers = ("ID", "QUEUE", "STATUS", "TRIES", "ENQUEUED", "DUE", "FINISHED", "ERROR")
    return table(headers, rows)


def message_dict(message: Task) -> dict[str, Any]:
    """A message as JSON: its task fields, read count, visibility time and payload (a
    body that is not JSON, which only a foreign writer can store, as ``payload_raw``)."""
    data = task_dict(message)
    data["visible_at"] = data["available_at"]
    data["read_count"] = message.attempts
    payload = payload_or_bytes(message.payload)
    if isinstance(payload, bytes):
        data["payload"] = None
        data["payload_raw"] = payload.decode("utf-8", "replace")
    else:
        data["payload"] = payload
    return data


def payload_preview(message: Task) -> str:
    payload = payload_or_bytes(message.payload)
    if isinstance(payload, bytes):
        text = repr(payload)
    else:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= PAYLOAD_PREVIEW else text[: PAYLOAD_PREVIEW - 3] + "..."


def message_table(messages: Sequence[Task]) -> str:
    rows = [
        (
            message.id,
            message.queue,
            message.status.value,
            message.attempts,
            format_time(message.enqueued_at),
            format_time(message.available_at),
            payload_preview(message),
        )
        for message in messages
    ]
    return table(("ID", "QUEUE", "STATUS", "READS", "ENQUEUED", "VISIBLE AT", "PAYLOAD"), rows)


def task_details(task: Task) -> str:
    lines = [
        f"id:           {task.id}",
        f"queue:        {task.queue}",
        f"kind:         {task.kind}",
        f"status:       {task.status.value}",
        f"priority:     {task.priority}",
        f"attempts:     {task.attempts} of {task.max_attempts}",
        f"enqueued at:  {format_time(task.enqueued_at)}",
        f"due at:       {format_time(task.available_at)}",
        f"started at:   {format_time(task.started_at)}",
        f"finished at:  {format_time(task.finished_at)}",
    ]
    if task.interval is not None:
        lines.append(f"interval:     {task.interval} (series {task.series_id})")
    if task.result is not None:
        lines.append(f"result:       {len(task.result)} bytes")
    if task.error:
        lines.append(f"error:        {task.error}")
    if task.traceback:
        lines.append("traceback:")
        lines.extend("  " + line for line in task.traceback.rstrip().splitlines())
    return "\n".join(lines)


#: Columns of ``sitq queues``: (header, JSON key).
QUEUE_COLUMNS = (
    ("PENDING", "pending"),
    ("SCHEDULED", "scheduled"),
    ("RUNNING", "running"),
    ("SUCCEEDED", "succeeded"),
    ("FAILED", "failed"),
    ("CANCELLED", "cancelled"),
    ("DEAD", "dead"),
)


def queue_dict(stats: QueueStats, now: datetime) -> dict[str, Any]:
    """One queue's counts as JSON, with the numbers :mod:`sitq.metrics` defines."""
    metrics = metrics_from(stats, now)
    age = metrics.oldest_pending_age
    return {
        "queue": metrics.queue,
        "pending": metrics.pending,
        "scheduled": metrics.scheduled,
        "running": metrics.running,
        "succeeded": metrics.archived,
        "failed": metrics.failed,
        "cancelled": metrics.cancelled,
        "dead": metrics.dead,
        "total": sum(stats.counts.values()),
        "oldest_pending_at": iso(stats.oldest_pending_at),
        "oldest_pending_age_seconds": None if age is None else age.total_seconds(),
    }


def queue_table(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["QUEUE", *(header for header, _ in QUEUE_COLUMNS), "OLDEST PENDING"]
    body = [
        [
            row["queue"],
            *(row[key] for _, key in QUEUE_COLUMNS),
            _age_from_seconds(row["oldest_pending_age_seconds"]),
        ]
        for row in rows
    ]
    return table(headers, body)


def _age_from_seconds(seconds: float | None) -> str:
    return format_age(None if seconds is None else timedelta(seconds=seconds))


def metrics_text(metrics: Mapping[str, Any]) -> str:
    labels = [
        ("queue", "queue"),
        ("total", "total jobs"),
        ("pending", "pending (due now)"),
        ("scheduled", "scheduled (not yet due)"),
        ("running", "running"),
        ("succeeded", "succeeded"),
        ("failed", "failed"),
        ("cancelled", "cancelled"),
        ("dead", "dead"),
    ]
    lines = [f"{label + ':':<26}{metrics[key]}" for key, label in labels]
    oldest = metrics["oldest_pending_age_seconds"]
    lines.append(
        f"{'oldest pending:':<26}{_age_from_seconds(oldest)}"
        + ("" if oldest is None else f" (since {metrics['oldest_pending_at']})")
    )
    lines.append(f"{'next due at:':<26}{metrics['next_due_at'] or '-'}")
    lines.append(f"{'newest enqueued at:':<26}{metrics['newest_enqueued_at'] or '-'}")
    return "\n".join(lines)


# -- logging ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; task events also carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            "pid": record.process,
        }
        fields = getattr(record, TASK_FIELDS, None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send ``sitq.*`` log records to stderr as text lines or JSON objects."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    for name, wanted in (("sitq", level.upper()), ("psycopg", "WARNING")):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(wanted)
        logger.propagate = False


def quiet_logging() -> None:
    """Inspection commands: sitq reports failures itself, as one line; drivers'
    retry warnings would only repeat them."""
    for name in ("sitq", "psycopg"):
        logger = logging.getLogger(name)
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
