"""`mailgate migrate-store`: copy an embedded SQLite store into PostgreSQL.

For a site that grows from one gateway to several: every table is copied with its ids (the
blacklist names its bounce rows by id), in one transaction, into an empty PostgreSQL store
whose schema is at the same version; the id sequences then continue after the copied rows. The
PostgreSQL store takes the SQLite store's identity too: the rows are the same, so the bounce
tokens already issued must keep matching them. Both stores are used through the `Store`
interface alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailgate.store import open_store
from mailgate.store.interface import Store
from mailgate.store.sql import DATA_TABLES

BATCH = 1000


class MigrationError(RuntimeError):
    """The copy cannot be made safely; nothing was written."""


@dataclass(frozen=True)
class MigrationResult:
    rows: dict[str, int]


def migrate_store(source: Path, target: Store) -> MigrationResult:
    """Copy the SQLite store file `source` into `target` (an empty store of the same schema
    version); returns the rows copied per table, or raises MigrationError having written nothing."""
    if not Path(source).exists():
        raise MigrationError(f"{source}: no such SQLite store")
    sqlite = open_store(str(source), read_only=True)
    try:
        if sqlite.schema_version != target.schema_version:
            raise MigrationError(f"schema versions differ ({sqlite.schema_version} vs {target.schema_version}): "
                                 "start `mailgate serve` once on the SQLite file to migrate it first")
        copied: dict[str, int] = {}
        with target.transaction("migrate-store"):
            busy = target.tables_with_rows(DATA_TABLES)
            if busy:
                raise MigrationError(f"the PostgreSQL store is not empty ({', '.join(busy)}): refusing to mix")
            for table in DATA_TABLES:
                copied[table] = _copy_table(sqlite, target, table)
            target.reset_id_sequences()
            target.adopt_store_id(sqlite.store_id())
        return MigrationResult(copied)
    finally:
        sqlite.close()


def _copy_table(source: Store, target: Store, table: str) -> int:
    count = 0
    for batch in source.table_rows(table, BATCH):
        target.insert_rows(table, batch.columns, batch.rows)
        count += len(batch.rows)
    return count
