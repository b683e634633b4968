"""The SQL of :mod:`sitq.backends.postgres`, in one place, with the decoding of the
rows it returns (which depends on its column orders).

Every statement is a template with ``{schema}`` standing for the quoted schema name;
:class:`Statements` fills it in once per backend. Parameters are psycopg's named
``%(name)s`` placeholders, so values are never formatted into the text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sitq.core import ReservedTask

# Identifiers we format into SQL: a plain name keeps quoting trivial and the
# NOTIFY channel (named after the schema) within PostgreSQL's 63-byte limit.
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # use with fullmatch
_INDENTATION = re.compile(r"\n[ \t]+")

# Each entry is one schema version; {schema}.sitq_migrations records which have run.
# Never edit a released entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE {schema}.sitq_jobs (
        seq              bigserial NOT NULL,
        id               text PRIMARY KEY,
        queue            text NOT NULL,
        kind             text NOT NULL,
        status           text NOT NULL,
        priority         integer NOT NULL,
        payload          bytea NOT NULL,
        enqueued_at      timestamptz NOT NULL,
        available_at     timestamptz NOT NULL,
        attempts         integer NOT NULL DEFAULT 0,
        max_attempts     integer NOT NULL,
        max_deliveries   integer,
        interval_us      bigint,
        series_id        text,
        owner            text,
        lease_expires_at timestamptz,
        started_at       timestamptz,
        finished_at      timestamptz,
        result           bytea,
        error            text,
        traceback        text,
        cancel_requested boolean NOT NULL DEFAULT false
    );
    -- The claim path: due jobs by priority then due time. Partial, so finished jobs
    -- cost it nothing.
    CREATE INDEX sitq_jobs_due ON {schema}.sitq_jobs (kind, priority DESC, available_at, seq)
        WHERE status = 'pending';
    -- next_due, and claims when most pending jobs are far in the future: a range scan
    -- on available_at stops at the first job not yet due.
    CREATE INDEX sitq_jobs_pending_at ON {schema}.sitq_jobs (kind, available_at)
        WHERE status = 'pending';
    CREATE INDEX sitq_jobs_lease ON {schema}.sitq_jobs (kind, lease_expires_at)
        WHERE status = 'running';
    CREATE INDEX sitq_jobs_enqueued ON {schema}.sitq_jobs (enqueued_at, seq);
    CREATE INDEX sitq_jobs_finished ON {schema}.sitq_jobs (finished_at)
        WHERE finished_at IS NOT NULL;
    CREATE INDEX sitq_jobs_series ON {schema}.sitq_jobs (series_id)
        WHERE series_id IS NOT NULL;
    """,
    """
    -- sitq_jobs_pending_at made claims fragile: with stale statistics (right after a
    -- bulk insert of scheduled jobs, say) the planner picked it for the claim's
    -- available_at <= now and sorted every due job, instead of walking sitq_jobs_due
    -- in order and stopping at LIMIT. Without it the ordered walk is the only index
    -- path; next_due is served from sitq_jobs_due (one probe per priority level).
    DROP INDEX IF EXISTS {schema}.sitq_jobs_pending_at;
    """,
    # The slot a recurring run was due at, kept when a retry moves available_at
    # (NULL, in rows from before: the same as available_at).
    "ALTER TABLE {schema}.sitq_jobs ADD COLUMN scheduled_at timestamptz",
    # A claim or next_due for some queues (every consumer's, a worker's with --queues):
    # each served queue's due range at each level. With sitq_jobs_due alone, filtered
    # by queue, they read every due job of other queues, or the whole table. The level
    # is keyed as priority::bigint, and matched so (see _CLAIM_STEPS).
    """
    CREATE INDEX sitq_jobs_queue_due
        ON {schema}.sitq_jobs (kind, queue, (priority::bigint), available_at, seq)
        WHERE status = 'pending';
    """,
)

# Run on each connection as it is made (pooled, LISTEN, a migrator's own): what sitq's
# statements and their decoding rely on, whatever the role or the database sets as its
# default (ALTER ROLE or ALTER DATABASE ... SET). psycopg reads timestamptz text only
# in the ISO DateStyle, and as a datetime in the session's TimeZone: west of UTC the
# first hours of year 1 (datetime.min, a valid eta) read as a BC date, east of it the
# last of year 9999 as year 10000, and both raised DataError (every claim, once such a
# task was due). Text comes in the client encoding: in SQL_ASCII it returns bytes
# (b"running" is not "running"), in LATIN1 it cannot send most of Unicode. The
# statements are written for READ COMMITTED, each seeing what committed before it
# started: a migrator's second look at the schema version after the lock wait, a
# purge's re-check of rows changed meanwhile. Under SERIALIZABLE, a settle's pipeline
# could also fail at its commit, which psycopg reports as a broken pipeline. And the
# connections are idle by design between calls (a pool's) or always (a LISTEN's), so
# idle_session_timeout (PostgreSQL 14+, hence the lookup) would only make them churn.
#
# The plans: psycopg prepares a statement at its sixth call, and PostgreSQL's default
# (plan_cache_mode = auto) then planned each call afresh whenever the table had
# statistics (autovacuum's ANALYZE): a generic plan, costed for any LIMIT and any time,
# always looks dearer than a custom one. Planning a claim took as long as running it
# (0.4-0.9 ms); measured with statistics, one worker ran 1.44-1.50x the tasks/s at
# concurrency 8 and 1.66-1.73x at 1 with generic plans. The statements are shaped so
# that one plan suits any values (see _CLAIM_STEPS, _CLAIM_LEASE), and the tests check
# the generic ones. Those costs overshoot jit_above_cost, though (266,000 for a claim
# with 200,000 jobs scheduled): JIT compiled each call, 30-50 ms, so it is off. And a
# generic plan lasts for the session, or until the next ANALYZE: made while the table
# was empty (a worker's first polls, even under auto), it read the whole table at
# each call once jobs came (67-72 tasks/s instead of 1,250-1,380). Every statement
# here has an index to use, so sequential scans are off; queue_stats, which reads
# every row, turns them back on.
SESSION_SETUP = (
    "SET client_encoding = 'UTF8'; SET DateStyle = 'ISO'; SET TimeZone = 'UTC';"
    " SET default_transaction_isolation = 'read committed';"
    " SET plan_cache_mode = 'force_generic_plan'; SET jit = off; SET enable_seqscan = off;"
    " SELECT set_config(name, '0', false) FROM pg_settings"
    " WHERE name = 'idle_session_timeout'"
)

MIGRATION_TABLE = """
CREATE TABLE IF NOT EXISTS {schema}.sitq_migrations (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

TASK_COLUMNS = (
    "id, queue, kind, status, priority, attempts, max_attempts, enqueued_at, available_at,"
    " started_at, finished_at, interval_us, series_id, error, traceback, result"
)
RESERVED_COLUMNS = (
    "j.id, j.queue, j.kind, j.payload, j.priority, j.attempts, j.max_attempts,"
    " j.available_at, j.enqueued_at, j.lease_expires_at, j.interval_us, j.series_id, j.status,"
    " j.seq, coalesce(j.scheduled_at, j.available_at), j.cancel_requested"
)

_INSERT_COLUMNS = (
    "id, queue, kind, status, priority, payload, enqueued_at, available_at, max_attempts,"
    " max_deliveries, interval_us, series_id, scheduled_at"
)

# One job: a plain VALUES row.
_INSERT_ONE = (
    "INSERT INTO {schema}.sitq_jobs (" + _INSERT_COLUMNS + ")"
    " VALUES (%(id)s, %(queue)s, %(kind)s, 'pending', %(priority)s, %(payload)s,"
    " %(enqueued_at)s, %(available_at)s, %(max_attempts)s, %(max_deliveries)s,"
    " %(interval_us)s, %(series_id)s, %(available_at)s)"
)

# Many jobs: one array per column, unnested into rows, so a batch is one statement
# (one round trip, one plan) whatever its size. unnest keeps the arrays' order, so
# jobs get their seq (the tie-break among equals) in the order given.
_INSERT_MANY = (
    "INSERT INTO {schema}.sitq_jobs (" + _INSERT_COLUMNS + ")"
    " SELECT id, queue, kind, 'pending', priority, payload, enqueued_at, available_at,"
    " max_attempts, max_deliveries, interval_us, series_id, available_at"
    " FROM unnest(%(id)b::text[], %(queue)s::text[], %(kind)s::text[],"
    " %(priority)s::integer[], %(payload)b::bytea[], %(enqueued_at)b::timestamptz[],"
    " %(available_at)b::timestamptz[], %(max_attempts)s::integer[],"
    " %(max_deliveries)s::integer[], %(interval_us)s::bigint[], %(series_id)s::text[])"
    " AS rows (id, queue, kind, priority, payload, enqueued_at, available_at,"
    " max_attempts, max_deliveries, interval_us, series_id)"
)

# Many jobs that differ only in id and payload (the usual batch: one task, one set of
# options, enqueued at one moment): only those travel as arrays, in binary (cheap to
# encode); the rest are single values.
_INSERT_UNIFORM = (
    "INSERT INTO {schema}.sitq_jobs (" + _INSERT_COLUMNS + ")"
    " SELECT id, %(queue)s, %(kind)s, 'pending', %(priority)s::integer, payload,"
    " %(enqueued_at)s::timestamptz, %(available_at)s::timestamptz,"
    " %(max_attempts)s::integer, %(max_deliveries)s::integer, %(interval_us)s::bigint,"
    " %(series_id)s::text, %(available_at)s::timestamptz"
    " FROM unnest(%(id)b::text[], %(payload)b::bytea[]) AS rows (id, payload)"
)

# Insert and announce in ONE statement, so an enqueue in autocommit is one round trip.
# A data-modifying CTE always runs to completion; the NOTIFY is queued only when it
# inserted something, and (the statement being its own transaction) delivered at
# commit: never for a failed insert, never before the rows are visible.
_ANNOUNCE = (
    "WITH inserted AS ({insert} RETURNING 1)"
    " SELECT pg_notify(%(channel)s, %(token)s) WHERE EXISTS (SELECT FROM inserted)"
)

# The priority levels present among pending jobs of a kind, highest first: a loose
# index scan of sitq_jobs_due (one probe per level), shared by the claim and next_due.
# A recursive CTE: the statements using it put it in their WITH RECURSIVE list.
_PRIORITY_LEVELS = """
levels (priority) AS (
    (SELECT priority FROM {schema}.sitq_jobs
     WHERE status = 'pending' AND kind = %(kind)s
     ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT l.priority FROM {schema}.sitq_jobs AS l
            WHERE l.status = 'pending' AND l.kind = %(kind)s AND l.priority < levels.priority
            ORDER BY l.priority DESC LIMIT 1)
    FROM levels WHERE levels.priority IS NOT NULL
)"""

# One statement: lock due jobs and jobs whose lease ran out (a dead worker's), skipping
# rows other claimers hold, keep the best ``limit`` of them, and lease those. A job read
# more than ``max_deliveries`` times turns 'dead' instead of being handed out again.
# Among equals, the first enqueued goes first.
# The two candidate sets are selected separately so each uses its own partial index.
#
# Due jobs are found level by level: ``levels`` lists the priorities present among
# pending jobs (a loose scan of sitq_jobs_due, one probe per level), and within a
# level, jobs sit in sitq_jobs_due by due time, so "due now, earliest first" is a
# bounded range that stops at the first job not yet due. Each step is an ordered
# index probe with a LIMIT, a shape no statistics (stale after a bulk insert, or
# saying nothing is due) can make the planner trade for a sort of every due job or a
# scan of the scheduled backlog. Up to ``limit`` jobs per level are locked, the best
# ``limit`` overall kept; the others are released at commit.
#
# For some queues, the same per served queue (``served``): its range of
# sitq_jobs_queue_due at each level, up to ``limit`` jobs each. Filtered by queue, a
# walk of sitq_jobs_due read every due job of other queues ahead of the served ones'.
# The level is matched as priority::bigint, that index's key, not as priority: then
# both indexes gave the order wanted, and when the statistics know of one queue only
# (a backlog in one queue, the served ones empty) the planner could not tell them
# apart and walked sitq_jobs_due. Matched so, sitq_jobs_due would need a sort.
_CLAIM_STEPS = (
    _PRIORITY_LEVELS
    + """, due AS (
    SELECT level_due.* FROM levels{served} CROSS JOIN LATERAL (
        SELECT id, priority, available_at, seq FROM {schema}.sitq_jobs
        WHERE status = 'pending' AND kind = %(kind)s{at_level}
              AND available_at <= %(now)s
        ORDER BY available_at, seq
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS level_due
    WHERE levels.priority IS NOT NULL
), expired AS (
    SELECT id, priority, available_at, seq FROM {schema}.sitq_jobs
    WHERE status = 'running' AND kind = %(kind)s AND lease_expires_at <= %(now)s
          {queue_filter}{unfinished}
    ORDER BY priority DESC, available_at, seq
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id FROM (SELECT * FROM due UNION ALL SELECT * FROM expired) AS candidates
    ORDER BY priority DESC, available_at, seq
    LIMIT %(limit)s
)
"""
)

# The picked jobs are leased by an array of ids, not a join: always primary-key
# probes, even in a generic plan (which cannot know how few rows LIMIT leaves, and
# might hash-join the table).
_CLAIM_LEASE = """
UPDATE {schema}.sitq_jobs AS j SET
    status = CASE WHEN j.max_deliveries IS NOT NULL AND j.attempts >= j.max_deliveries
                  THEN 'dead' ELSE 'running' END,
    owner = CASE WHEN j.max_deliveries IS NOT NULL AND j.attempts >= j.max_deliveries
                 THEN NULL ELSE %(owner)s END,
    lease_expires_at = CASE WHEN j.max_deliveries IS NOT NULL
                                 AND j.attempts >= j.max_deliveries
                            THEN NULL ELSE %(lease_expires_at)s END,
    finished_at = CASE WHEN j.max_deliveries IS NOT NULL AND j.attempts >= j.max_deliveries
                       THEN %(now)s ELSE j.finished_at END,
    error = CASE WHEN j.max_deliveries IS NOT NULL AND j.attempts >= j.max_deliveries
                 THEN 'delivered ' || j.attempts || ' times without being finished'
                 ELSE j.error END,
    attempts = CASE WHEN j.max_deliveries IS NOT NULL AND j.attempts >= j.max_deliveries
                    THEN j.attempts ELSE j.attempts + 1 END,
    started_at = CASE WHEN j.max_deliveries IS NOT NULL AND j.attempts >= j.max_deliveries
                      THEN j.started_at ELSE %(now)s END
WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING {reserved}
"""

_CLAIM = "WITH RECURSIVE " + _CLAIM_STEPS + _CLAIM_LEASE

# Rows are locked in id order so a heartbeat and a settle of the same worker, which
# touch the same rows, cannot deadlock. They are found by primary key alone, owner
# and status checked on the locked rows, for the reason given at _FINISHES.
_EXTEND = """
WITH held AS (
    SELECT id, owner, status FROM {schema}.sitq_jobs
    WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE
)
UPDATE {schema}.sitq_jobs AS j SET lease_expires_at = %(lease_expires_at)s
FROM held
WHERE j.id = held.id AND held.owner = %(owner)s AND held.status = 'running'
RETURNING j.id, j.cancel_requested
"""

# Outcomes announce the rows they change (at commit): a finish to result waiters, a
# retry as work, or as a finish when it cancels. NOTIFYs repeated in one transaction
# are delivered once.
# coalesce(status, '') (status is never NULL): a plain status = 'running' matches the
# predicate of sitq_jobs_lease, which the planner takes for small (few jobs run at
# once) and preferred to the primary key, though it keeps an entry for every job leased
# since the last vacuum: the finish read 18-28 pages there instead of 3.
_FINISH = """
UPDATE {schema}.sitq_jobs SET status = %(status)s, owner = NULL, lease_expires_at = NULL,
    finished_at = %(finished_at)s, result = %(result)s, error = %(error)s,
    traceback = %(traceback)s
WHERE id = %(finished_id)s AND owner = %(finished_by)s AND coalesce(status, '') = 'running'
RETURNING cancel_requested, pg_notify(%(finished_channel)s, %(token)s)
"""

# A worker's usual settle at concurrency 1 (one finish, then a claim for its slot) as
# ONE statement: one round trip that commits, where the pipeline of two statements
# takes a second for the commit. Measured: 760 -> 590 us of wall time per settle, and
# half the client CPU. The claim leaves out the job being finished (its lease may have
# run out): of two updates of one row in one statement, PostgreSQL applies one, and
# which is not promised. Each row returned holds the finish's cancel_requested (NULL
# when it was not recorded) and a claimed job's columns (NULLs when nothing was
# claimed): at least one row, always.
_FINISH_AND_CLAIM = (
    "WITH RECURSIVE finished AS ("
    + _FINISH
    + "), "
    + _CLAIM_STEPS
    + ", claimed AS ("
    + _CLAIM_LEASE
    + """)
SELECT finished.cancel_requested, claimed.* FROM (SELECT) AS one
LEFT JOIN finished ON true LEFT JOIN claimed ON true
"""
)

# Many finishes with no next run (a worker's settle at concurrency > 1, a consumer's
# archive_many) in one statement, with their values in one JSON document: one
# parameter, so the statement text and its plan are the same for any count (a list
# parameter would make PostgreSQL plan the statement on every call, and one scalar
# per value grows the text past what psycopg caches). The rows are locked in id
# order (``held``) before they are updated, as the heartbeat (_EXTEND) locks them:
# two transactions taking the same rows in one order cannot deadlock. Measured in
# isolation against the pipeline of one statement per finish (3 to 8 finishes and a
# claim): half the client CPU, 12-18% less wall time.
#
# ``held`` finds the rows by primary key alone and checks owner and status only on
# the locked rows (FOR UPDATE returns their latest version). Were the check in its
# WHERE, the planner could scan sitq_jobs_lease for status = 'running': an index it
# thinks small (few jobs run at once) but that keeps an entry for every job leased
# since the last vacuum. That scan made each settle cost time in proportion to the
# jobs run since then: measured, draining 20,000 tasks at concurrency 8 ran at less
# than half the rate of this form.
_FINISHES = """
outcome AS (
    SELECT * FROM json_to_recordset(%(finishes)s::json) AS o(id text, owner text,
        status text, finished_at timestamptz, result text, error text, traceback text)
), held AS (
    SELECT j.id, j.owner, j.status FROM {schema}.sitq_jobs AS j
    WHERE j.id = ANY(ARRAY(SELECT id FROM outcome))
    ORDER BY j.id FOR UPDATE
), finished AS (
    UPDATE {schema}.sitq_jobs AS j SET status = o.status, owner = NULL,
        lease_expires_at = NULL, finished_at = o.finished_at,
        result = decode(o.result, 'base64'), error = o.error, traceback = o.traceback
    FROM outcome AS o
    WHERE j.id = ANY(ARRAY(SELECT held.id FROM held JOIN outcome AS mine USING (id)
                           WHERE held.owner = mine.owner AND held.status = 'running'))
          AND o.id = j.id
    RETURNING j.id, pg_notify(%(finished_channel)s, %(token)s)
)"""

_FINISH_MANY = "WITH " + _FINISHES + " SELECT array_agg(id) FROM finished"

# The same, then a claim, as _FINISH_AND_CLAIM does for one finish. Each row returned
# holds the ids finished (NULL for none) and a claimed job's columns (NULLs when
# nothing was claimed): at least one row, always.
_FINISH_MANY_AND_CLAIM = (
    "WITH RECURSIVE "
    + _FINISHES
    + ", "
    + _CLAIM_STEPS
    + ", claimed AS ("
    + _CLAIM_LEASE
    + """)
SELECT (SELECT array_agg(id) FROM finished), claimed.* FROM (SELECT) AS one
LEFT JOIN claimed ON true
"""
)

# A job whose cancel was asked for is cancelled instead, keeping the due time it ran at.
_RESCHEDULE = """
UPDATE {schema}.sitq_jobs SET
    status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE WHEN cancel_requested THEN %(finished_at)s ELSE NULL END,
    available_at = CASE WHEN cancel_requested THEN available_at ELSE %(at)s END,
    owner = NULL, lease_expires_at = NULL,
    attempts = attempts - %(undo)s, error = coalesce(%(error)s, error),
    traceback = coalesce(%(traceback)s, traceback)
WHERE id = %(id)s AND owner = %(owner)s AND coalesce(status, '') = 'running'  -- see _FINISH
RETURNING id, pg_notify(
    CASE WHEN status = 'cancelled' THEN %(finished_channel)s ELSE %(channel)s END, %(token)s)
"""

_CANCEL = """
UPDATE {schema}.sitq_jobs SET
    status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END,
    finished_at = CASE WHEN status = 'pending' THEN %(now)s ELSE finished_at END,
    cancel_requested = true
WHERE id = %(id)s AND status IN ('pending', 'running')
RETURNING id
"""

# A run of an interval series whose series lives on (a failed run's next run was
# inserted when it failed) is run once more, as a one-off: keeping its interval would
# start a second series. A stopped (cancelled) series starts again from it.
# Taken before _REQUEUE, in its transaction: requeues of runs of one series wait for
# each other, so each one's statement (a new snapshot, under READ COMMITTED) sees
# whether another already restarted the series. Without it, two at once both did.
_LOCK_SERIES = """
SELECT pg_advisory_xact_lock(hashtextextended(series_id, 0)) FROM {schema}.sitq_jobs
WHERE id = %(id)s AND series_id IS NOT NULL
"""

_REQUEUE = """
UPDATE {schema}.sitq_jobs AS j SET status = 'pending', available_at = %(now)s,
    scheduled_at = %(now)s, attempts = 0, started_at = NULL,
    finished_at = NULL, error = NULL, traceback = NULL, result = NULL,
    cancel_requested = false,
    interval_us = CASE WHEN EXISTS (
        SELECT FROM {schema}.sitq_jobs AS s
        WHERE s.series_id = j.series_id AND s.id <> j.id
              AND s.status IN ('pending', 'running'))
        THEN NULL ELSE j.interval_us END
WHERE j.id = %(id)s AND j.status IN ('failed', 'dead', 'cancelled')
RETURNING j.id
"""

# The earliest due time among pending jobs, from sitq_jobs_due (kind, priority DESC,
# available_at, seq): a loose index scan visits each priority level present (a
# recursive probe for the next lower one), takes that level's first due time (an
# index probe), and keeps the smallest. Cheap however many jobs are pending, as long
# as the distinct priorities are few. For some queues, each served queue's first due
# time at each level, from sitq_jobs_queue_due, as in the claim. Or, if sooner, the
# first lease to run out (sitq_jobs_lease): a dead worker's job is claimable then.
_NEXT_DUE = (
    "WITH RECURSIVE "
    + _PRIORITY_LEVELS
    + """
SELECT least(
    (SELECT min((SELECT available_at FROM {schema}.sitq_jobs
                 WHERE status = 'pending' AND kind = %(kind)s{at_level}
                 ORDER BY available_at LIMIT 1))
     FROM levels{served} WHERE levels.priority IS NOT NULL),
    (SELECT lease_expires_at FROM {schema}.sitq_jobs
     WHERE status = 'running' AND kind = %(kind)s{queue_filter}
     ORDER BY lease_expires_at LIMIT 1))
"""
)

_QUEUE_STATS = """
SELECT queue, status, count(*),
    count(*) FILTER (WHERE status = 'pending' AND available_at > %(now)s),
    count(*) FILTER (WHERE status = 'running' AND lease_expires_at <= %(now)s),
    min(CASE WHEN status = 'pending' AND available_at <= %(now)s THEN available_at
        WHEN status = 'running' AND lease_expires_at <= %(now)s THEN lease_expires_at END)
FROM {schema}.sitq_jobs GROUP BY queue, status ORDER BY queue
"""


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements for one schema."""

    schema: str
    migration_table: str
    enqueue_one: str
    enqueue_many: str
    enqueue_uniform: str
    claim_all: str
    claim_queues: str
    finish_and_claim_all: str
    finish_and_claim_queues: str
    finish_many: str
    finish_many_and_claim_all: str
    finish_many_and_claim_queues: str
    extend: str
    finish: str
    reschedule: str
    cancel: str
    requeue: str
    lock_series: str
    delete: str
    get: str
    list_prefix: str
    list_with_payload_prefix: str
    queue_stats: str
    next_due_all: str
    next_due_queues: str
    purge: str
    migrations: tuple[str, ...]

    @classmethod
    def for_schema(cls, name: str) -> Statements:
        schema = f'"{name}"'

        def fill(template: str, **extra: str) -> str:
            # Without the indentation: psycopg caches a statement's conversion only
            # up to 4 kB of text (see test_every_statement_fits_the_drivers_query_cache).
            return _INDENTATION.sub("\n", template.format(schema=schema, **extra))

        # For all queues or some (see _CLAIM_STEPS); lease expiry is read alike.
        every_queue = {
            "served": "",
            "at_level": " AND priority = levels.priority",
            "queue_filter": "",
        }
        some_queues = {
            "served": " CROSS JOIN unnest(%(queues)s::text[]) AS served (name)",
            "at_level": " AND queue = served.name AND priority::bigint = levels.priority",
            "queue_filter": " AND queue = ANY(%(queues)s)",
        }
        unfinished = " AND id <> %(finished_id)s"
        unfinished_many = " AND id <> ALL(ARRAY(SELECT id FROM outcome))"
        table = f"{schema}.sitq_jobs"
        return cls(
            schema=schema,
            migration_table=fill(MIGRATION_TABLE),
            enqueue_one=fill(_ANNOUNCE.replace("{insert}", _INSERT_ONE)),
            enqueue_many=fill(_ANNOUNCE.replace("{insert}", _INSERT_MANY)),
            enqueue_uniform=fill(_ANNOUNCE.replace("{insert}", _INSERT_UNIFORM)),
            claim_all=fill(_CLAIM, **every_queue, unfinished="", reserved=RESERVED_COLUMNS),
            claim_queues=fill(_CLAIM, **some_queues, unfinished="", reserved=RESERVED_COLUMNS),
            finish_and_claim_all=fill(
                _FINISH_AND_CLAIM,
                **every_queue,
                unfinished=unfinished,
                reserved=RESERVED_COLUMNS,
            ),
            finish_and_claim_queues=fill(
                _FINISH_AND_CLAIM,
                **some_queues,
                unfinished=unfinished,
                reserved=RESERVED_COLUMNS,
            ),
            finish_many=fill(_FINISH_MANY),
            finish_many_and_claim_all=fill(
                _FINISH_MANY_AND_CLAIM,
                **every_queue,
                unfinished=unfinished_many,
                reserved=RESERVED_COLUMNS,
            ),
            finish_many_and_claim_queues=fill(
                _FINISH_MANY_AND_CLAIM,
                **some_queues,
                unfinished=unfinished_many,
                reserved=RESERVED_COLUMNS,
            ),
            extend=fill(_EXTEND),
            finish=fill(_FINISH),
            reschedule=fill(_RESCHEDULE),
            cancel=fill(_CANCEL),
            requeue=fill(_REQUEUE),
            lock_series=fill(_LOCK_SERIES),
            delete=f"DELETE FROM {table} WHERE id = %(id)s",
            get=f"SELECT {TASK_COLUMNS} FROM {table} WHERE id = %(id)s",
            list_prefix=f"SELECT {TASK_COLUMNS} FROM {table}",
            list_with_payload_prefix=f"SELECT {TASK_COLUMNS}, payload FROM {table}",
            queue_stats=fill(_QUEUE_STATS),
            next_due_all=fill(_NEXT_DUE, **every_queue),
            next_due_queues=fill(_NEXT_DUE, **some_queues),
            # LIMIT NULL is no limit. By id array, as in the claim: primary-key probes.
            # The conditions again on the DELETE itself: the array is read from the
            # statement's snapshot, and a row changed meanwhile (a retry() committed
            # while the DELETE waited for it) is re-checked against these, not it.
            purge=(
                f"DELETE FROM {table} WHERE id = ANY(ARRAY(SELECT id FROM {table}"
                " WHERE finished_at < %(before)s AND status = ANY(%(statuses)s)"
                " AND (%(kind)s::text IS NULL OR kind = %(kind)s)"
                " AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s))"
                " LIMIT %(limit)s))"
                " AND finished_at < %(before)s AND status = ANY(%(statuses)s)"
            ),
            migrations=tuple(fill(script) for script in MIGRATIONS),
        )


# -- rows to objects: the column orders above, decoded ----------------------------------


def claim_order(row: Sequence[Any]) -> tuple[int, datetime, int]:
    # RETURNING has no order: sort like the claim's ORDER BY (priority, due, seq).
    return (-row[4], row[7], row[13])


def utc(value: datetime | None) -> datetime | None:
    # timestamptz comes back in the session's TimeZone; the API speaks UTC.
    return None if value is None else value.astimezone(UTC)


def utc_required(value: datetime) -> datetime:
    return value.astimezone(UTC)


def micros(value: timedelta | None) -> int | None:
    return None if value is None else value // timedelta(microseconds=1)


def interval_from(value: int | None) -> timedelta | None:
    return None if value is None else timedelta(microseconds=value)


def reserved_from_row(row: Sequence[Any]) -> ReservedTask:
    return ReservedTask(
        id=row[0],
        queue=row[1],
        kind=row[2],
        payload=bytes(row[3]),
        priority=row[4],
        attempts=row[5],
        max_attempts=row[6],
        available_at=utc_required(row[7]),
        enqueued_at=utc_required(row[8]),
        lease_expires_at=utc_required(row[9]),
        interval=interval_from(row[10]),
        series_id=row[11],
        scheduled_at=utc_required(row[14]),
        cancel_requested=row[15],
    )
