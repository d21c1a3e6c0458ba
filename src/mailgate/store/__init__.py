"""The store: every decision that matters later, behind one interface (`store.interface.Store`).

`database` names the backend: a file path is the embedded SQLite store; a `postgresql://` URL
is the PostgreSQL store that several gateways share. Importing this package loads no backend
(the rules import the interface alone); `open_store` imports the one it needs.
"""

from __future__ import annotations

from pathlib import Path

from mailgate.store.interface import (  # noqa: F401
    BlacklistEntry,
    BounceDay,
    BounceFact,
    BounceRecord,
    BounceStats,
    DeliveryCount,
    DeliveryRecord,
    DeliveryTotal,
    DomainBounces,
    InboundRecord,
    KindBounces,
    OutboundRecord,
    ServerBounces,
    Store,
    StoredBounce,
    StoredDelivery,
    StoredOutbound,
    StoreUnavailable,
    TableBatch,
)

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(database: str) -> bool:
    """Whether `database` names the shared PostgreSQL store (else it is a SQLite file)."""
    return database.startswith(POSTGRES_SCHEMES)


def open_store(database: str, password_file: Path | None = None, *, read_only: bool = False,
               background_checkpoints: bool = False) -> Store:
    """The store named by the configuration's `database` (password from a file or PG* variables).

    `read_only` opens an existing SQLite file without migrating or writing it (`explain`, the
    source of `migrate-store`); `background_checkpoints`: SQLite's WAL is checkpointed only by
    `checkpoint()`, never inside a commit (`mailgate.store.sqlite`). Neither applies to
    PostgreSQL, which is opened as the gateways open it: shared, its schema is kept current by
    whichever gateway starts."""
    if is_postgres(database):
        from mailgate.store.postgres import PostgresStore
        password = Path(password_file).read_text().strip() if password_file else None
        return PostgresStore(database, password=password)
    from mailgate.store.sqlite import SQLiteStore
    return SQLiteStore(database, read_only=read_only, background_checkpoints=background_checkpoints)
