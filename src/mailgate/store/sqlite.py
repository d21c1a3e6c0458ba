"""The embedded store: one SQLite file (WAL) holding every decision that matters later.

Each thread gets its own connection: libmilter calls back from many threads at once. The
schema is versioned with `PRAGMA user_version` and migrated at start (sqlite-utils builds the
tables); the queries are shared with the PostgreSQL backend (`mailgate.store.sql`).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import sqlite_utils

from mailgate.store.sql import QUOTA_COUNTERS, SQLStore

BUSY_TIMEOUT_MS = 5000


def _v1(db: sqlite_utils.Database) -> None:
    db["messages"].create({
        "id": int, "direction": str, "queue_id": str, "message_id": str,
        "envelope_from_original": str, "envelope_from": str,
        "header_from_before": str, "header_from_after": str,
        "server": str, "mass": int, "listener": str, "sasl_user": str, "created_at": float,
    }, pk="id", not_null={"direction", "created_at"})
    db["messages"].create_index(["message_id"])
    db["messages"].create_index(["queue_id"])
    db["messages"].create_index(["created_at"])


def _v2(db: sqlite_utils.Database) -> None:
    """Inbound messages, and one row per accepted route: what the loop guard counts."""
    db["inbound_messages"].create({
        "id": int, "queue_id": str, "message_id": str, "sender": str, "routes": str, "action": str,
        "created_at": float,
    }, pk="id", not_null={"created_at"})
    db["inbound_messages"].create_index(["message_id"])
    db["inbound_routes"].create({"message": int, "sender": str, "route_key": str, "created_at": float},
                                foreign_keys=[("message", "inbound_messages", "id")])
    db["inbound_routes"].create_index(["sender", "route_key", "created_at"])


def _v3(db: sqlite_utils.Database) -> None:
    """Bounces, the blacklist (with its history) and the quota's events."""
    db["bounces"].create({
        "id": int, "created_at": float, "recipient": str, "status": str, "action": str, "permanent": int,
        "reason": str, "reporting_mta": str, "remote_mta": str, "message": int, "server": str, "source": str,
        "stale": int, "matched": int,
    }, pk="id", not_null={"created_at", "recipient"})
    db["bounces"].create_index(["recipient", "created_at"])
    db["bounces"].create_index(["created_at"])
    db["bounce_resets"].create({"address": str, "at": float}, pk="address")
    db["blacklist"].create({
        "id": int, "address": str, "added_at": float, "reason": str, "source": str, "bounce_ids": str,
        "removed_at": float, "removed_reason": str,
    }, pk="id", not_null={"address", "added_at"})
    db["blacklist"].create_index(["address", "removed_at"])
    db["quota_events"].create({"key": str, "stream": str, "at": float})
    db["quota_events"].create_index(["key", "stream", "at"])


def _v4(db: sqlite_utils.Database) -> None:
    """Delivery attempts from Postfix's log, where the log reader stands, and whether a message's
    envelope carried our token (then its reports come back to the milter, not from the log)."""
    db["messages"].add_column("tokenised", int)
    db["deliveries"].create({
        "id": int, "at": float, "queue_id": str, "recipient": str, "relay": str, "status": str, "dsn": str,
        "delay": float, "reason": str, "message": int, "server": str,
    }, pk="id", not_null={"at", "queue_id", "status"})
    db["deliveries"].create_index(["queue_id"])
    db["deliveries"].create_index(["at"])
    db["deliveries"].create_index(["server", "at"])
    db["log_positions"].create({"path": str, "inode": int, "offset": int, "updated_at": float}, pk="path")


def _v5(db: sqlite_utils.Database) -> None:
    """The quota counted in one row per key, stream and minute: a check reads at most 1,440
    rows, however many recipients the day had (one row per recipient made it a scan)."""
    db.execute(QUOTA_COUNTERS)
    db.execute("insert into quota_counters (key, stream, minute, count) select key, stream, "
               "cast(at / 60 as integer), count(*) from quota_events group by 1, 2, 3")
    db["quota_events"].drop()


# Each entry moves the schema one version up; `PRAGMA user_version` says where a file stands.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2, _v3, _v4, _v5)


class SQLiteStore(SQLStore):
    def __init__(self, path: str | Path, *, read_only: bool = False):
        """`read_only` opens an existing file without migrating or writing (for `explain`)."""
        self.path = str(path)
        self.read_only = read_only
        if self.path != ":memory:" and not read_only:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        if not read_only:
            self._migrate(self._db())

    def _db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
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
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    def _migrate(self, db: sqlite_utils.Database) -> None:
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(db)
                db.execute(f"PRAGMA user_version={number}")

    @property
    def schema_version(self) -> int:
        return self._db().execute("PRAGMA user_version").fetchone()[0]

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db().conn.execute(sql, params)
        except sqlite3.OperationalError:
            if not self._in_transaction():
                self._drop_connection()
            raise

    def _in_transaction(self) -> bool:
        db = getattr(self._local, "db", None)
        return db is not None and db.conn.in_transaction

    def _drop_connection(self) -> None:
        """After a failure (read-only or full file system, a lost file) this thread opens a new
        connection at its next call: an old one can stay unusable after the cause is gone."""
        db = getattr(self._local, "db", None)
        self._local.db = None
        if db is not None:
            try:
                db.conn.close()
            except sqlite3.Error:
                pass

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

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
