"""The store: one SQLite file (WAL) holding every decision that matters later.

The rules and adapters see it through `Store`, named for what they need, so that another
backend (PostgreSQL, for several gateways sharing one state) is one more class, not a rewrite.
Each thread gets its own connection: libmilter calls back from many threads at once.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

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


class Store(Protocol):
    def record_outbound(self, record: OutboundRecord) -> int: ...
    def outbound_message(self, row_id: int) -> dict | None: ...
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


# Each entry moves the schema one version up; `PRAGMA user_version` says where a file stands.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1,)


class SQLiteStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._migrate(self._db())

    def _db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
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

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None


def open_store(database: str) -> Store:
    """The store named by the configuration's `database`."""
    return SQLiteStore(database)
