"""The embedded store: one SQLite file (WAL) holding every decision that matters later.

Each thread gets its own connection: libmilter calls back from many threads at once. The
schema is versioned with `PRAGMA user_version` and migrated at start. Statements that may run
inside `transaction()` are plain SQL, because sqlite-utils' writes commit on their own.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import sqlite_utils

from mailgate.store.records import BounceFact, BounceRecord, DeliveryRecord, InboundRecord, OutboundRecord

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


# Each entry moves the schema one version up; `PRAGMA user_version` says where a file stands.
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (_v1, _v2, _v3, _v4)


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
        row["tokenised"] = int(record.tokenised)
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

    def outbound_by_message_id(self, message_id: str) -> dict | None:
        rows = list(self._db()["messages"].rows_where(
            "message_id = ? and direction = 'outbound'", [message_id], order_by="id desc", limit=1))
        return rows[0] if rows else None

    # -- bounces and the blacklist ------------------------------------------------------------

    def record_bounce(self, record: BounceRecord) -> int:
        row = asdict(record)
        for flag in ("stale", "matched"):
            row[flag] = int(row[flag])
        row["permanent"] = None if record.permanent is None else int(record.permanent)
        names = ", ".join(row)
        cursor = self._db().conn.execute(
            f"insert into bounces ({names}) values ({', '.join('?' * len(row))})", list(row.values()))
        return cursor.lastrowid

    def countable_bounces(self, address: str, since: float) -> list[BounceFact]:
        """Bounces that may count: matched, not stale, newer than the window and the last reset."""
        rows = self._db().execute(
            "select id, created_at, permanent from bounces where recipient = ? and created_at >= max(?, "
            "coalesce((select at from bounce_resets where address = ?), 0)) and stale = 0 and matched = 1 "
            "order by created_at", [address, since, address]).fetchall()
        return [BounceFact(r[0], r[1], None if r[2] is None else bool(r[2])) for r in rows]

    def reset_bounces(self, address: str, at: float) -> None:
        self._db().conn.execute("insert into bounce_resets (address, at) values (?, ?) "
                                "on conflict(address) do update set at = excluded.at", [address, at])

    def blacklisted(self, addresses: list[str]) -> set[str]:
        if not addresses:
            return set()
        marks = ",".join("?" * len(addresses))
        rows = self._db().execute(
            f"select distinct address from blacklist where removed_at is null and address in ({marks})",
            addresses).fetchall()
        return {r[0] for r in rows}

    def blacklist_add(self, address: str, at: float, reason: str, source: str, bounce_ids: list[int]) -> bool:
        if self.blacklisted([address]):
            return False
        self._db().conn.execute(
            "insert into blacklist (address, added_at, reason, source, bounce_ids) values (?, ?, ?, ?, ?)",
            [address, at, reason, source, ",".join(str(i) for i in bounce_ids)])
        return True

    def blacklist_remove(self, address: str, at: float, reason: str, source: str | None = None) -> bool:
        """End the address's active entry; with `source`, only an entry that source made (a
        delivery that succeeds clears the rule's entries, never the operator's)."""
        sql = "update blacklist set removed_at = ?, removed_reason = ? where address = ? and removed_at is null"
        params: list = [at, reason, address]
        if source is not None:
            sql += " and source = ?"
            params.append(source)
        return self._db().conn.execute(sql, params).rowcount > 0

    def blacklist_entries(self, include_removed: bool = False) -> list[dict]:
        where = None if include_removed else "removed_at is null"
        return list(self._db()["blacklist"].rows_where(where, order_by="added_at"))

    def blacklist_history(self, address: str) -> list[dict]:
        return list(self._db()["blacklist"].rows_where("address = ?", [address], order_by="added_at"))

    def bounce_rows(self, since: float = 0.0, address: str | None = None, ids: list[int] | None = None,
                    limit: int | None = None) -> list[dict]:
        clauses, params = ["created_at >= ?"], [since]
        if address:
            clauses.append("recipient = ?")
            params.append(address)
        if ids is not None:
            clauses.append(f"id in ({','.join('?' * len(ids)) or 'null'})")
            params += ids
        return list(self._db()["bounces"].rows_where(" and ".join(clauses), params,
                                                      order_by="created_at desc", limit=limit))

    def bounce_stats(self, since: float) -> dict[str, list[dict]]:
        """Counts per day, per server, hard/soft and the top recipient domains (SQL aggregates)."""
        db = self._db()

        def rows(sql: str) -> list[dict]:
            cursor = db.execute(sql, [since])
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, r)) for r in cursor.fetchall()]
        kind = ("case when permanent = 1 then 'hard' when permanent = 0 then 'soft' else 'unknown' end")
        return {
            "per_day": rows("select date(created_at, 'unixepoch') as day, count(*) as bounces, "
                            "sum(permanent = 1) as hard from bounces where created_at >= ? group by day order by day"),
            "per_server": rows("select coalesce(server, '-') as server, count(*) as bounces from bounces "
                               "where created_at >= ? group by server order by bounces desc"),
            "per_kind": rows(f"select {kind} as kind, count(*) as bounces from bounces where created_at >= ? "
                             "group by kind order by bounces desc"),
            "top_domains": rows("select substr(recipient, instr(recipient, '@') + 1) as domain, count(*) as bounces "
                                "from bounces where created_at >= ? group by domain order by bounces desc limit 10"),
        }

    # -- deliveries (from Postfix's log) ---------------------------------------------------------

    def outbound_by_queue_id(self, queue_id: str) -> dict | None:
        rows = list(self._db()["messages"].rows_where(
            "queue_id = ? and direction = 'outbound'", [queue_id], order_by="id desc", limit=1))
        return rows[0] if rows else None

    def record_delivery(self, record: DeliveryRecord) -> int:
        row = asdict(record)
        names = ", ".join(row)
        cursor = self._db().conn.execute(
            f"insert into deliveries ({names}) values ({', '.join('?' * len(row))})", list(row.values()))
        return cursor.lastrowid

    def delivery_stats(self, since: float) -> list[dict]:
        """Attempts per day, server and status (the last attempt of a recipient counts once per status)."""
        cursor = self._db().execute(
            "select date(at, 'unixepoch') as day, coalesce(server, '-') as server, status, count(*) as count "
            "from deliveries where at >= ? group by day, server, status order by day, server, status", [since])
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]

    def delivery_totals(self) -> list[dict]:
        """All-time counters per server and status (for Prometheus)."""
        cursor = self._db().execute(
            "select coalesce(server, '-') as server, status, count(*) as count from deliveries "
            "group by server, status order by server, status")
        return [dict(zip(("server", "status", "count"), r)) for r in cursor.fetchall()]

    def log_position(self, path: str) -> tuple[int, int] | None:
        row = self._db().execute("select inode, offset from log_positions where path = ?", [path]).fetchone()
        return (row[0], row[1]) if row else None

    def save_log_position(self, path: str, inode: int, offset: int, at: float) -> None:
        self._db().conn.execute(
            "insert into log_positions (path, inode, offset, updated_at) values (?, ?, ?, ?) on conflict(path) "
            "do update set inode = excluded.inode, offset = excluded.offset, updated_at = excluded.updated_at",
            [path, inode, offset, at])

    # -- quota ----------------------------------------------------------------------------------

    def quota_count(self, key: str, stream: str, since: float) -> int:
        return self._db().execute("select count(*) from quota_events where key = ? and stream = ? and at >= ?",
                                  [key, stream, since]).fetchone()[0]

    def quota_take(self, key: str, stream: str, at: float) -> None:
        self._db().conn.execute("insert into quota_events (key, stream, at) values (?, ?, ?)", [key, stream, at])

    def purge_quota(self, before: float) -> int:
        return self._db().conn.execute("delete from quota_events where at < ?", [before]).rowcount

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None


