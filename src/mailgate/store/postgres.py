"""The shared store: PostgreSQL, for several gateways that must count together.

Loop counts, quotas, the blacklist and bounce records live in one database, so that two MX
hosts do not each let through their own 20 loop messages or their own 200 a day. A count and
the row it leads to run in one transaction holding an advisory lock per key (the sender, the
quota key, the bounced address): concurrent gateways queue on the same key, never both count
19 and both insert. Outside a transaction every statement borrows a pooled connection in
autocommit mode. The policy service's quota batch is one statement, a function of the schema
(`mailgate_quota_batch`), so that the event loop waits for one round trip per batch.

An outage is logged once when it starts and once when it ends; in between every store call
raises, so the milter tempfails, the policy service defers and Postfix keeps the mail.
"""

from __future__ import annotations

import json
import logging
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from mailgate.infra.logfmt import kv_line
from mailgate.store.interface import PENDING_REEVALUATION, QuotaBatch, QuotaTake
from mailgate.store.sql import (
    QUOTA_COUNTERS,
    RECLASSIFY,
    TABLES_WITH_IDS,
    SQLStore,
    new_store_id,
    reclassify_bounces,
)


def _identify(conn: psycopg.Connection) -> None:
    conn.execute("insert into store_identity (id) values (%s)", [new_store_id()])


def _classify_bounces(conn: psycopg.Connection) -> None:
    """v9: each bounce's reason and hard flag from the text recorded so far (sqlite's `_v9`)."""
    reclassify_bounces(lambda sql, params: conn.execute(sql.replace("?", "%s"), params).fetchall(),
                       lambda batch: conn.cursor().executemany(RECLASSIFY.replace("?", "%s"), batch))


# `QuotaBatch` in one statement, so that a policy batch costs one round trip (and one commit)
# instead of one per statement. Its argument is one jsonb (psycopg adapts a dozen Python lists as
# arrays at twice the client's CPU). The locks first, each counter's lock in the order given
# (sorted, as `transaction` takes them, so that the two never wait for each other in a circle);
# then each later statement takes a new snapshot (a volatile function's statements do, in READ
# COMMITTED), which sees everything committed by whoever held a lock before: the count is exact
# across gateways. The give-backs and takes again are summed per minute first (a statement may
# change a row once); the claims' takes are `rules.quota.recipients_within`, in SQL. Generic plans
# (a custom plan per call was planned anew every call) without hash or merge joins (a generic plan
# would join the give-backs to the whole of quota_counters instead of looking each up by its key).
# Its commit is synchronous whatever the server's default (SET LOCAL: until the transaction's end,
# its commit included): with `synchronous_commit = off` a server that crashes loses the takes of
# its last moments (up to three `wal_writer_delay`s), recipients that were sent and are no longer
# counted, and the quota could overshoot by as many; `on` (PostgreSQL's default, which then waits
# for synchronous standbys too) loses none. The lab's server runs with fsync off, so there the
# commit only writes the WAL, which costs less than waking the WAL writer for an asynchronous one.
QUOTA_BATCH_FUNCTION = """
create function mailgate_quota_batch(batch jsonb)
returns table (quota_key text, quota_stream text, quota_count bigint)
language plpgsql volatile
set plan_cache_mode = force_generic_plan set enable_hashjoin = off set enable_mergejoin = off
as $$
begin
    set local synchronous_commit = on;
    perform pg_advisory_xact_lock(hashtextextended(lock_key, 0))
        from jsonb_array_elements_text(batch->'locks') as lock_key;
    if jsonb_array_length(batch->'back') > 0 then
        update quota_counters as q set count = greatest(q.count - b.n, 0)
            from (select e->>0 as k, e->>1 as s, (e->>2)::bigint as m, sum((e->>3)::integer) as n
                  from jsonb_array_elements(batch->'back') as e group by 1, 2, 3) as b
            where q.key = b.k and q.stream = b.s and q.minute = b.m;
    end if;
    if jsonb_array_length(batch->'again') > 0 then
        insert into quota_counters as q (key, stream, minute, count)
            select e->>0, e->>1, (e->>2)::bigint, sum((e->>3)::integer)
                from jsonb_array_elements(batch->'again') as e group by 1, 2, 3
            on conflict (key, stream, minute) do update set count = q.count + excluded.count;
    end if;
    if jsonb_array_length(batch->'claims') > 0 then
        return query
            with claimed as (
                select e->>0 as k, e->>1 as s, (e->>2)::integer as wanted, (e->>3)::integer as lim
                from jsonb_array_elements(batch->'claims') as e),
            counted as (
                select c.k, c.s, c.wanted, c.lim,
                       (select coalesce(sum(q.count), 0) from quota_counters as q
                        where q.key = c.k and q.stream = c.s and q.minute >= (batch->>'since')::bigint)::bigint as total
                from claimed as c),
            taken as (
                insert into quota_counters as q (key, stream, minute, count)
                    select k, s, (batch->>'at')::bigint, least(wanted, lim - total) from counted
                    where wanted > 0 and total < lim
                    on conflict (key, stream, minute) do update set count = q.count + excluded.count)
            select k, s, total from counted;
    end if;
end
$$"""
QUOTA_BATCH = "select quota_key, quota_stream, quota_count from mailgate_quota_batch(%s::jsonb)"


# The same versions as the SQLite schema (mailgate.store.sqlite.MIGRATIONS), in PostgreSQL's DDL;
# a step that needs a value made at migration time is a function of the connection.
MIGRATIONS: tuple[tuple[str | Callable[[psycopg.Connection], None], ...], ...] = (
    ("""create table messages (id bigserial primary key, direction text not null, queue_id text,
        message_id text, envelope_from_original text, envelope_from text, header_from_before text,
        header_from_after text, server text, mass integer, listener text, sasl_user text,
        created_at double precision not null)""",
     "create index messages_message_id on messages (message_id)",
     "create index messages_queue_id on messages (queue_id)",
     "create index messages_created_at on messages (created_at)"),
    ("""create table inbound_messages (id bigserial primary key, queue_id text, message_id text, sender text,
        routes text, action text, created_at double precision not null)""",
     "create index inbound_messages_message_id on inbound_messages (message_id)",
     """create table inbound_routes (message bigint references inbound_messages (id), sender text,
        route_key text, created_at double precision)""",
     "create index inbound_routes_count on inbound_routes (sender, route_key, created_at)"),
    ("""create table bounces (id bigserial primary key, created_at double precision not null, recipient text not null,
        status text, action text, permanent integer, reason text, reporting_mta text, remote_mta text,
        message bigint, server text, source text, stale integer, matched integer)""",
     "create index bounces_recipient on bounces (recipient, created_at)",
     "create index bounces_created_at on bounces (created_at)",
     "create table bounce_resets (address text primary key, at double precision)",
     """create table blacklist (id bigserial primary key, address text not null, added_at double precision not null,
        reason text, source text, bounce_ids text, removed_at double precision, removed_reason text)""",
     "create index blacklist_address on blacklist (address, removed_at)",
     "create table quota_events (key text, stream text, at double precision)",
     "create index quota_events_count on quota_events (key, stream, at)"),
    ("alter table messages add column tokenised integer",
     """create table deliveries (id bigserial primary key, at double precision not null, queue_id text not null,
        recipient text, relay text, status text not null, dsn text, delay double precision, reason text,
        message bigint, server text)""",
     "create index deliveries_queue_id on deliveries (queue_id)",
     "create index deliveries_at on deliveries (at)",
     "create index deliveries_server on deliveries (server, at)",
     """create table log_positions (path text primary key, inode bigint, "offset" bigint,
        updated_at double precision)"""),
    (QUOTA_COUNTERS,
     "insert into quota_counters (key, stream, minute, count) select key, stream, floor(at / 60)::bigint, count(*) "
     "from quota_events group by 1, 2, 3",
     "drop table quota_events"),
    ("create index bounces_stats on bounces (created_at, permanent, server, recipient)",
     "drop index bounces_created_at",
     "create index deliveries_stats on deliveries (at, server, status)",
     "drop index deliveries_at",
     "create index deliveries_totals on deliveries (server, status)",
     "drop index deliveries_server",
     "create index inbound_messages_created_at on inbound_messages (created_at)",
     "create index inbound_routes_message on inbound_routes (message)",
     """create table purged_counts (family text not null, server text not null, status text not null,
        count bigint not null, primary key (family, server, status))""",
     "create table store_identity (id text not null)",
     _identify),
    ("alter table inbound_messages add column confirmed integer",),
    ("alter table messages add column recipient_count integer",
     """create table outbound_recipients (message bigint not null, recipient_digest text not null,
        primary key (message, recipient_digest))""",
     "create index bounces_message on bounces (message, recipient)"),
    ("alter table bounces add column diagnostic text",
     "alter table bounces add column hard integer not null default 0",
     _classify_bounces,
     "create index bounces_reasons on bounces (created_at, hard, permanent, reason, server, recipient)",
     "drop index bounces_stats",
     """create table reputation_alerts (window_start double precision not null, server text not null,
        domain text not null, reason text not null, bounces bigint not null, at double precision not null,
        primary key (window_start, server, domain))""",
     "create table pending_tasks (name text primary key)",
     f"insert into pending_tasks (name) values ('{PENDING_REEVALUATION}')"),
    (QUOTA_BATCH_FUNCTION,),
)
MIGRATION_LOCK = 7_357_001  # one gateway migrates at a time


def _minutes(takes: Sequence[QuotaTake]) -> list[tuple[str, str, int, int]]:
    """Quota takes with the minute each falls in, as the function's rows."""
    return [(key, stream, int(at // 60), count) for key, stream, at, count in takes]


def _check_idle_connection(conn: psycopg.Connection) -> None:
    """The pool's check of a connection it hands out: the server's empty-query round trip only
    when the idle connection's socket has something to read. A server that restarted, stopped or
    ended the session has closed the socket or sent its goodbye, which makes it readable; a
    healthy idle connection has nothing to read (we LISTEN for nothing). So every checkout no
    longer costs a round trip (a fifth of a policy batch's wall time with the quota in one
    statement), and a dead connection is still replaced before a call uses it."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


class _Fetched:
    """A cursor's results read before its connection went back to the pool."""

    def __init__(self, cursor: psycopg.Cursor):
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self._rows = cursor.fetchall() if cursor.description else []
        self._next = 0

    def fetchone(self) -> tuple | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple]:
        return self._rows

    def fetchmany(self, size: int) -> list[tuple]:
        """The next `size` rows (all were read already: this only hands them out in batches)."""
        rows = self._rows[self._next:self._next + size]
        self._next += len(rows)
        return rows


class PostgresStore(SQLStore):
    day_of = "to_char(to_timestamp({}) at time zone 'UTC', 'YYYY-MM-DD')"
    greatest = "greatest"

    def __init__(self, dsn: str, *, password: str | None = None, max_size: int = 10,
                 logger: logging.Logger | None = None):
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": 3}
        if password:
            kwargs["password"] = password
        self.logger = logger or logging.getLogger("mailgate")
        self._local = threading.local()
        self._down = False
        # Short waits: a milter or policy call must fail fast (Postfix then tempfails) rather than
        # hang; a short reconnect_timeout ends the pool's growing backoff, so that the next call
        # after an outage connects at once instead of waiting for a late retry.
        self._pool = ConnectionPool(dsn, min_size=1, max_size=max_size, kwargs=kwargs, open=True, timeout=5.0,
                                    reconnect_timeout=5.0, check=_check_idle_connection, name="mailgate")
        try:
            self._pool.wait(timeout=30)
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def domain_of(self, column: str) -> str:
        return f"split_part({column}, '@', 2)"

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("select pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
            conn.execute("create table if not exists mailgate_schema (version integer not null)")
            row = conn.execute("select version from mailgate_schema").fetchone()
            version = row[0] if row else 0
            if row is None:
                conn.execute("insert into mailgate_schema (version) values (0)")
            for statements in MIGRATIONS[version:]:
                for statement in statements:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
            # written even when current: a real write, so that a read-only database fails at start
            conn.execute("update mailgate_schema set version = %s", [max(version, len(MIGRATIONS))])

    @property
    def schema_version(self) -> int:
        """The `mailgate_schema` table's version: how many of `MIGRATIONS` the database has had."""
        return self._scalar("select version from mailgate_schema")

    def reset_id_sequences(self) -> None:
        """Rows inserted with their ids leave each `bigserial` sequence behind: set it after the
        largest id, so that the next row gets a free one."""
        for table in TABLES_WITH_IDS:
            self._execute(f"select setval(pg_get_serial_sequence('{table}', 'id'), "
                          f"coalesce((select max(id) from {table}), 0) + 1, false)")

    def _noted(self, ok: bool, error: Exception | None = None) -> None:
        """Log an outage once when it starts and once when it ends."""
        if ok and self._down:
            self._down = False
            self.logger.warning(kv_line(None, event="database", state="back"))
        elif not ok and not self._down:
            self._down = True
            self.logger.error(kv_line(None, event="database", state="unavailable", error=str(error).strip()))

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        sql = sql.replace("?", "%s")
        conn = getattr(self._local, "conn", None)
        try:
            if conn is not None:
                cursor = conn.execute(sql, params)
            else:
                with self._pool.connection() as pooled:
                    cursor = _Fetched(pooled.execute(sql, params))
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self._noted(False, exc)
            raise
        self._noted(True)
        return cursor

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        sql = sql.replace("?", "%s")
        conn = getattr(self._local, "conn", None)
        try:
            if conn is not None:
                conn.cursor().executemany(sql, rows)
            else:
                with self._pool.connection() as pooled:
                    pooled.cursor().executemany(sql, rows)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self._noted(False, exc)
            raise
        self._noted(True)

    def _in_transaction(self) -> bool:
        return getattr(self._local, "conn", None) is not None

    @contextmanager
    def transaction(self, *lock_keys: str) -> Iterator[None]:
        """One transaction on one pooled connection, holding an advisory lock per key (in a fixed
        order, so that two gateways never wait for each other's locks in a circle), all taken by
        one statement."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                if lock_keys:  # one statement: unnest yields the sorted keys in order, locked as they come
                    conn.execute("select pg_advisory_xact_lock(hashtextextended(key, 0)) "
                                 "from unnest(%s::text[]) as key", [sorted(set(lock_keys))])
                self._local.conn = conn
                try:
                    yield
                finally:
                    self._local.conn = None
        except (psycopg.OperationalError, PoolTimeout) as exc:
            self._noted(False, exc)
            raise

    def quota_batch(self, batch: QuotaBatch) -> dict[tuple[str, str], int]:
        """`SQLStore.quota_batch` as one statement, `mailgate_quota_batch` (schema v10): outside a
        transaction it is one of its own, one round trip in all."""
        rows = self._execute(QUOTA_BATCH, [json.dumps({
            "locks": sorted(set(batch.locks)), "back": _minutes(batch.give_backs), "again": _minutes(batch.retakes),
            "claims": batch.claims, "at": int(batch.at // 60), "since": int(batch.since // 60)})]).fetchall()
        return {(key, stream): int(count) for key, stream, count in rows}

    def checkpoint(self) -> None:
        """Nothing to do: the server checkpoints its own WAL."""

    def close(self) -> None:
        self._pool.close()

