"""The store: one SQLite file (WAL) holding every decision that matters later.

The rules and adapters see it through `Store`, named for what they need, so that another
backend (PostgreSQL, for several gateways sharing one state) is one more class, not a rewrite.
Each thread gets its own connection: libmilter calls back from many threads at once.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import sqlite_utils

BUSY_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class OutboundRecord:
    """One outgoing message as the milter handled it."""

    queue_id: str
    message_id: str | None
    envelope_from_original: str
    envelope_from: str
    header_from_before: str | None
    header_from_after: str | None
    server: str | None
    mass: bool
    listener: str | None
    sasl_user: str | None
    created_at: float


@dataclass(frozen=True)
class InboundRecord:
    """One inbound message as accepted (or dropped) by the milter."""

    queue_id: str
    message_id: str | None
    sender: str | None
    routes: str
    action: str
    created_at: float


class Store(Protocol):
    def record_outbound(self, record: OutboundRecord) -> int: ...
    def outbound_message(self, row_id: int) -> dict | None: ...
    def known_outbound(self, message_ids: list[str]) -> str | None: ...
    def transaction(self) -> AbstractContextManager[None]: ...
    def already_received(self, message_id: str) -> bool: ...
    def recent_count(self, sender: str, key: str, since: float) -> int: ...
    def record_inbound(self, record: InboundRecord, route_keys: list[str]) -> int: ...
    def close(self) -> None: ...


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


# Each entry moves the schema one version up; `PRAGMA user_version` says where a file stands.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2)


class SQLiteStore:
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
            else:
                conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                       check_same_thread=False)
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

    def record_outbound(self, record: OutboundRecord) -> int:
        row = asdict(record)
        row["mass"] = int(record.mass)
        row["direction"] = "outbound"
        return self._db()["messages"].insert(row).last_pk

    def outbound_message(self, row_id: int) -> dict | None:
        rows = list(self._db()["messages"].rows_where("id = ? and direction = 'outbound'", [row_id]))
        return rows[0] if rows else None

    def known_outbound(self, message_ids: list[str]) -> str | None:
        """The most recently sent of these Message-IDs, as Odoo picks the thread of a reply."""
        if not message_ids:
            return None
        marks = ",".join("?" * len(message_ids))
        row = self._db().execute(
            f"select message_id from messages where direction = 'outbound' and message_id in ({marks}) "
            "order by id desc limit 1", message_ids).fetchone()
        return row[0] if row else None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One writer at a time (BEGIN IMMEDIATE): a count and the row it leads to are atomic."""
        conn = self._db().conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def already_received(self, message_id: str) -> bool:
        row = self._db().execute(
            "select 1 from inbound_messages where message_id = ? and action = 'deliver' limit 1",
            [message_id]).fetchone()
        return row is not None

    def recent_count(self, sender: str, key: str, since: float) -> int:
        return self._db().execute(
            "select count(*) from inbound_routes where sender = ? and route_key = ? and created_at >= ?",
            [sender, key, since]).fetchone()[0]

    def record_inbound(self, record: InboundRecord, route_keys: list[str]) -> int:
        """Plain statements (no implicit commit), so that it can sit inside `transaction()`."""
        conn = self._db().conn
        cursor = conn.execute(
            "insert into inbound_messages (queue_id, message_id, sender, routes, action, created_at) "
            "values (?, ?, ?, ?, ?, ?)",
            [record.queue_id, record.message_id, record.sender, record.routes, record.action, record.created_at])
        row_id = cursor.lastrowid
        conn.executemany("insert into inbound_routes (message, sender, route_key, created_at) values (?, ?, ?, ?)",
                         [(row_id, record.sender, key, record.created_at) for key in route_keys])
        return row_id

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None


def open_store(database: str) -> Store:
    """The store named by the configuration's `database`."""
    return SQLiteStore(database)
