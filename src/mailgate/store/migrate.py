"""`mailgate migrate-store`: copy an embedded SQLite store into PostgreSQL.

For a site that grows from one gateway to several: every table is copied with its ids (the
blacklist names its bounce rows by id), in one transaction, into an empty PostgreSQL store
whose schema is at the same version; the id sequences then continue after the copied rows. The
PostgreSQL store takes the SQLite store's identity too: the rows are the same, so the bounce
tokens already issued must keep matching them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailgate.store.postgres import PostgresStore
from mailgate.store.sqlite import SQLiteStore

TABLES = ("messages", "inbound_messages", "inbound_routes", "bounces", "bounce_resets", "blacklist",
          "quota_counters", "deliveries", "log_positions", "purged_counts")
WITH_IDS = ("messages", "inbound_messages", "bounces", "blacklist", "deliveries")
BATCH = 1000


class MigrationError(RuntimeError):
    """The copy cannot be made safely; nothing was written."""


@dataclass(frozen=True)
class MigrationResult:
    rows: dict[str, int]


def migrate_store(source: Path, target: PostgresStore) -> MigrationResult:
    if not Path(source).exists():
        raise MigrationError(f"{source}: no such SQLite store")
    sqlite = SQLiteStore(source, read_only=True)
    try:
        if sqlite.schema_version != target.schema_version:
            raise MigrationError(f"schema versions differ ({sqlite.schema_version} vs {target.schema_version}): "
                                 "start `mailgate serve` once on the SQLite file to migrate it first")
        copied: dict[str, int] = {}
        with target.transaction("migrate-store"):
            busy = [t for t in TABLES if target._scalar(f"select count(*) from {t}")]
            if busy:
                raise MigrationError(f"the PostgreSQL store is not empty ({', '.join(busy)}): refusing to mix")
            for table in TABLES:
                copied[table] = _copy_table(sqlite, target, table)
            for table in WITH_IDS:
                target._execute(f"select setval(pg_get_serial_sequence('{table}', 'id'), "
                                f"coalesce((select max(id) from {table}), 0) + 1, false)")
            target._execute("update store_identity set id = ?", [sqlite.store_id()])
        target._store_id = None
        return MigrationResult(copied)
    finally:
        sqlite.close()


def _copy_table(sqlite: SQLiteStore, target: PostgresStore, table: str) -> int:
    cursor = sqlite._execute(f"select * from {table}")
    names = [c[0] for c in cursor.description]
    columns = ", ".join(f'"{n}"' for n in names)
    insert = f"insert into {table} ({columns}) values ({', '.join('?' * len(names))})"
    count = 0
    while rows := cursor.fetchmany(BATCH):
        for row in rows:
            target._execute(insert, row)
        count += len(rows)
    return count
