"""The store: every decision that matters later, behind one interface (`store.interface.Store`).

`database` names the backend: a file path is the embedded SQLite store; a `postgresql://` URL
is the PostgreSQL store that several gateways share. Importing this package loads no backend
(the rules import the interface alone); `open_store` imports the one it needs.
"""

from __future__ import annotations

from pathlib import Path

from mailgate.store.interface import (BounceFact, BounceRecord, DeliveryRecord, InboundRecord,  # noqa: F401
                                      OutboundRecord, Store, StoreUnavailable)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(database: str) -> bool:
    return database.startswith(POSTGRES_SCHEMES)


def open_store(database: str, password_file: Path | None = None) -> Store:
    """The store named by the configuration's `database` (password from a file or PG* variables)."""
    if is_postgres(database):
        from mailgate.store.postgres import PostgresStore
        password = Path(password_file).read_text().strip() if password_file else None
        return PostgresStore(database, password=password)
    from mailgate.store.sqlite import SQLiteStore
    return SQLiteStore(database)
