"""The embedded store: one SQLite file (WAL) holding every decision that matters later.

Each thread uses its own connection: libmilter calls back from many threads at once. Because
libmilter starts a thread per Postfix connection, a connection is not closed with its thread but
handed to the next one (opening it costs ~0.5 ms, more than the rest of a message's writes). The
schema is versioned with `PRAGMA user_version` and migrated at start (sqlite-utils builds the
tables); the queries are shared with the PostgreSQL backend (`mailgate.store.sql`).
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from mailgate.store.interface import PENDING_REEVALUATION, StoreUnavailable
from mailgate.store.sql import (
    QUOTA_COUNTERS,
    RECLASSIFY,
    SQLStore,
    new_store_id,
    reclassify_bounces,
)

BUSY_TIMEOUT_MS = 5000
WAL_RESTART_PAGES = 4096
"""A WAL this long (16 MiB of 4 KiB pages) is started again from its beginning by the next
checkpoint (see `SQLiteStore.checkpoint`)."""
RESTART_WAIT_MS = 100
"""How long that checkpoint may hold back the writers while readers finish with the WAL."""
IDLE_CONNECTIONS = 16      # connections of ended threads kept for the next ones; more are closed


def _v1(db: sqlite_utils.Database) -> None:
    db.table("messages").create({
        "id": int, "direction": str, "queue_id": str, "message_id": str,
        "envelope_from_original": str, "envelope_from": str,
        "header_from_before": str, "header_from_after": str,
        "server": str, "mass": int, "listener": str, "sasl_user": str, "created_at": float,
    }, pk="id", not_null={"direction", "created_at"})
    db.table("messages").create_index(["message_id"])
    db.table("messages").create_index(["queue_id"])
    db.table("messages").create_index(["created_at"])


def _v2(db: sqlite_utils.Database) -> None:
    """Inbound messages, and one row per accepted route: what the loop guard counts."""
    db.table("inbound_messages").create({
        "id": int, "queue_id": str, "message_id": str, "sender": str, "routes": str, "action": str,
        "created_at": float,
    }, pk="id", not_null={"created_at"})
    db.table("inbound_messages").create_index(["message_id"])
    db.table("inbound_routes").create({"message": int, "sender": str, "route_key": str, "created_at": float},
                                foreign_keys=[("message", "inbound_messages", "id")])
    db.table("inbound_routes").create_index(["sender", "route_key", "created_at"])


def _v3(db: sqlite_utils.Database) -> None:
    """Bounces, the blacklist (with its history) and the quota's events."""
    db.table("bounces").create({
        "id": int, "created_at": float, "recipient": str, "status": str, "action": str, "permanent": int,
        "reason": str, "reporting_mta": str, "remote_mta": str, "message": int, "server": str, "source": str,
        "stale": int, "matched": int,
    }, pk="id", not_null={"created_at", "recipient"})
    db.table("bounces").create_index(["recipient", "created_at"])
    db.table("bounces").create_index(["created_at"])
    db.table("bounce_resets").create({"address": str, "at": float}, pk="address")
    db.table("blacklist").create({
        "id": int, "address": str, "added_at": float, "reason": str, "source": str, "bounce_ids": str,
        "removed_at": float, "removed_reason": str,
    }, pk="id", not_null={"address", "added_at"})
    db.table("blacklist").create_index(["address", "removed_at"])
    db.table("quota_events").create({"key": str, "stream": str, "at": float})
    db.table("quota_events").create_index(["key", "stream", "at"])


def _v4(db: sqlite_utils.Database) -> None:
    """Delivery attempts from Postfix's log, where the log reader stands, and whether a message's
    envelope carried our token (then its reports come back to the milter, not from the log)."""
    db.table("messages").add_column("tokenised", int)
    db.table("deliveries").create({
        "id": int, "at": float, "queue_id": str, "recipient": str, "relay": str, "status": str, "dsn": str,
        "delay": float, "reason": str, "message": int, "server": str,
    }, pk="id", not_null={"at", "queue_id", "status"})
    db.table("deliveries").create_index(["queue_id"])
    db.table("deliveries").create_index(["at"])
    db.table("deliveries").create_index(["server", "at"])
    db.table("log_positions").create({"path": str, "inode": int, "offset": int, "updated_at": float}, pk="path")


def _v5(db: sqlite_utils.Database) -> None:
    """The quota counted in one row per key, stream and minute: a check reads at most 1,440
    rows, however many recipients the day had (one row per recipient made it a scan)."""
    db.execute(QUOTA_COUNTERS)
    db.execute("insert into quota_counters (key, stream, minute, count) select key, stream, "
               "cast(at / 60 as integer), count(*) from quota_events group by 1, 2, 3")
    db.table("quota_events").drop()


def _v6(db: sqlite_utils.Database) -> None:
    """Covering indexes for the operator views (each aggregate reads the index alone instead of
    fetching every row by rowid; the indexes they replace were their prefixes, or read only by
    those views); the indexes retention walks (inbound messages by time, their routes by
    message); the counts retention leaves behind (the all-time totals never go down); the store's
    random identity (a re-created store's row ids start again at 1: bounce tokens of the lost
    store must not match its new messages)."""
    db.table("bounces").create_index(["created_at", "permanent", "server", "recipient"])
    db.table("bounces").drop_index("idx_bounces_created_at")
    db.table("deliveries").create_index(["at", "server", "status"])
    db.table("deliveries").drop_index("idx_deliveries_at")
    db.table("deliveries").create_index(["server", "status"])
    db.table("deliveries").drop_index("idx_deliveries_server_at")
    db.table("inbound_messages").create_index(["created_at"])
    db.table("inbound_routes").create_index(["message"])
    db.table("purged_counts").create({"family": str, "server": str, "status": str, "count": int},
                               pk=("family", "server", "status"), not_null={"family", "server", "status", "count"})
    db.table("store_identity").create({"id": str}, not_null={"id"})
    db.table("store_identity").insert({"id": new_store_id()})


def _v7(db: sqlite_utils.Database) -> None:
    """Whether Postfix is known to have queued an inbound message (InboundRecord.confirmed):
    only then does its Message-ID make a later copy a duplicate."""
    db.table("inbound_messages").add_column("confirmed", int)


def _v8(db: sqlite_utils.Database) -> None:
    """Whom each outgoing message was sent to, as keyed digests (a report counts only for a real
    recipient, docs/rules.md B1), without a rowid (one b-tree, keyed for the lookup), and how many
    (NULL: a message from before, whose recipients are unknown); bounces by message and recipient
    (a message's failure for a recipient is recorded once)."""
    db.table("messages").add_column("recipient_count", int)
    db.execute("create table outbound_recipients (message integer not null, recipient_digest text not null, "
               "primary key (message, recipient_digest)) without rowid")
    db.table("bounces").create_index(["message", "recipient"])


def _v9(db: sqlite_utils.Database) -> None:
    """A reason per bounce (docs/rules.md B4, B5): the text recorded so far moves to
    `diagnostic`, every row gets its reason and hard flag from it, and the blacklist is to be
    re-judged once under the new counting (`PENDING_REEVALUATION`); the reputation alerts, one
    per window, server and domain (B6)."""
    db.table("bounces").add_column("diagnostic", str)
    db.table("bounces").add_column("hard", int)
    db.execute("update bounces set hard = 0")
    reclassify_bounces(lambda sql, params: db.execute(sql, params).fetchall(),
                       lambda batch: db.conn.executemany(RECLASSIFY, batch))
    db.table("bounces").create_index(["created_at", "hard", "permanent", "reason", "server", "recipient"])
    db.table("bounces").drop_index("idx_bounces_created_at_permanent_server_recipient")
    db.execute("create table reputation_alerts (window_start real not null, server text not null, "
               "domain text not null, reason text not null, bounces integer not null, at real not null, "
               "primary key (window_start, server, domain))")
    db.execute("create table pending_tasks (name text primary key)")
    db.execute("insert into pending_tasks (name) values (?)", [PENDING_REEVALUATION])


def _v10(db: sqlite_utils.Database) -> None:
    """Nothing for SQLite: v10 gives PostgreSQL its quota batch function (`mailgate_quota_batch`),
    while SQLite runs `SQLStore.quota_batch` statement by statement; the versions stay the same on
    both backends, as `migrate-store` requires."""


# Each entry moves the schema one version up; `PRAGMA user_version` says where a file stands.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9,
                                                                   _v10)


def _close(db: sqlite_utils.Database) -> None:
    try:
        db.conn.close()
    except sqlite3.Error:
        pass


class _IdleConnections:
    """Connections whose thread has ended, for the next thread to take."""

    def __init__(self, limit: int):
        self._limit = limit
        self._idle: list[sqlite_utils.Database] = []
        self._lock = threading.Lock()

    def take(self) -> sqlite_utils.Database | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def give_back(self, db: sqlite_utils.Database) -> None:
        """Keep a connection for the next thread, unless it was left inside a transaction (its
        thread died mid-way) or enough are kept already."""
        if not db.conn.in_transaction:
            with self._lock:
                if len(self._idle) < self._limit:
                    self._idle.append(db)
                    return
        _close(db)

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for db in idle:
            _close(db)


class _Lease:
    """A thread's hold on one connection, kept in the thread's local storage: when the thread
    ends, its locals go and the finaliser gives the connection back for the next thread."""

    def __init__(self, db: sqlite_utils.Database, idle: _IdleConnections):
        self.db = db
        self._finalizer = weakref.finalize(self, idle.give_back, db)

    def end(self) -> sqlite_utils.Database:
        """Keep the connection from going back (it is to be closed)."""
        self._finalizer.detach()
        return self.db


class SQLiteStore(SQLStore):
    def __init__(self, path: str | Path, *, read_only: bool = False, background_checkpoints: bool = False):
        """`read_only` opens an existing file without migrating or writing (for `explain`).
        Otherwise the schema is migrated and the file proven writable, or StoreUnavailable.

        `background_checkpoints` (the serving processes): no commit checkpoints the WAL, so that
        none waits for the checkpoint's two disk flushes (SQLite's default checkpoints in the
        commit that takes the WAL past 1,000 pages: milliseconds, up to tens on this kind of
        disk, every ~150 messages, with Postfix waiting); `checkpoint()`, called by a thread of
        `serve` every second, does it instead. Durability is unchanged: a commit is in the WAL
        either way, and the WAL is what a crash is recovered from."""
        self.path = str(path)
        self.read_only = read_only
        self.background_checkpoints = background_checkpoints
        self._local = threading.local()
        self._idle = _IdleConnections(IDLE_CONNECTIONS)
        if not read_only:
            self._prepare()

    def _prepare(self) -> None:
        """Migrate on a connection of its own and close it: a connection opened while the file
        system is read-only stays read-only, and while it is open SQLite's WAL index stays
        read-only for every other connection of the process (healing only with a restart)."""
        if self.path == ":memory:":     # each connection is its own database: keep the migrated one
            self._migrate(self._db())
            return
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"the store {self.path} cannot be opened: {exc}") from exc
        try:
            self._migrate(db)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the store {self.path} cannot be written: {exc}") from exc
        finally:
            _close(db)

    def _connect(self) -> sqlite_utils.Database:
        if self.read_only:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
        elif self.path == ":memory:":
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        else:
            # A connection opened while the file system is read-only stays read-only; it is
            # dropped after a failure (see _drop_connection) so that the next call reopens.
            conn = sqlite3.connect(f"file:{self.path}?mode=rwc", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if self.background_checkpoints:
                conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return sqlite_utils.Database(conn)

    def _db(self) -> sqlite_utils.Database:
        """This thread's connection: the one it holds, else an idle one, else a new one."""
        lease = getattr(self._local, "lease", None)
        if lease is None:
            lease = self._local.lease = _Lease(self._idle.take() or self._connect(), self._idle)
        return lease.db

    def _migrate(self, db: sqlite_utils.Database) -> None:
        """Every missing version in one transaction, and the version written even when it is
        current: a real write, so that a store that cannot be written fails here, at start."""
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for migration in MIGRATIONS[version:]:
                migration(db)
            db.execute(f"PRAGMA user_version={max(version, len(MIGRATIONS))}")

    @property
    def schema_version(self) -> int:
        """`PRAGMA user_version`: how many of `MIGRATIONS` the file has had."""
        return self._db().execute("PRAGMA user_version").fetchone()[0]

    def reset_id_sequences(self) -> None:
        """Nothing to do: an integer primary key takes the largest id + 1 by itself."""

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db().conn.execute(sql, params)
        except sqlite3.OperationalError:
            if not self._in_transaction():
                self._drop_connection()
            raise

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self._db().conn.executemany(sql, rows)
        except sqlite3.OperationalError:
            if not self._in_transaction():
                self._drop_connection()
            raise

    def _in_transaction(self) -> bool:
        lease = getattr(self._local, "lease", None)
        return lease is not None and lease.db.conn.in_transaction

    def _drop_connection(self) -> None:
        """After a failure (read-only or full file system, a lost file) this thread opens a new
        connection at its next call: an old one can stay unusable after the cause is gone. The
        idle connections go too: opened under the same conditions, they may be as unusable, and
        an idle read-only one would keep the file's WAL index read-only for all the others."""
        lease = getattr(self._local, "lease", None)
        self._local.lease = None
        if lease is not None:
            _close(lease.end())
        self._idle.close_all()

    @contextmanager
    def transaction(self, *lock_keys: str) -> Iterator[None]:
        """One writer at a time (BEGIN IMMEDIATE): a count and the row it leads to are atomic.
        SQLite's write lock covers the whole file, so the lock keys need no lock of their own."""
        conn = self._db().conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            self._drop_connection()
            raise
        try:
            yield
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                self._drop_connection()
            raise

    def checkpoint(self) -> None:
        """Copy the WAL's committed pages into the file without waiting for anyone (PASSIVE: the
        writers of every process go on; what a reader still needs waits for the next pass).

        A PASSIVE checkpoint never starts the WAL again from its beginning; the next writer does
        that, but only at a moment when no other connection is reading from the WAL, which under
        steady load from the milter's threads and the policy service may never come: the WAL then
        grows by every commit (22 KB a message, 245 MB after 11,000 messages in bench/memory.py).
        So once it is `WAL_RESTART_PAGES` long, a RESTART checkpoint waits up to
        `RESTART_WAIT_MS` for the readers to finish with it, holding new writers back meanwhile,
        and the next commit writes from the WAL's start; if the readers take longer it gives up
        and the next pass tries again. The wait is the price of a bounded file: at most one
        in every few hundred messages waits that long, and never for a disk flush of the whole WAL,
        which the PASSIVE passes have already copied."""
        _busy, wal_pages, _copied = self._execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if wal_pages < WAL_RESTART_PAGES:
            return
        self._execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
        try:
            self._execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            self._execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def close(self) -> None:
        """Close this thread's connection and the idle ones (threads still running keep theirs
        until they end; a later call opens a new one)."""
        self._drop_connection()
