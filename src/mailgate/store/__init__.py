"""The store: every decision that matters later, behind one interface (`Store`)."""

from __future__ import annotations

from mailgate.store.records import (BounceFact, BounceRecord, DeliveryRecord, InboundRecord,  # noqa: F401
                                    OutboundRecord, Store)
from mailgate.store.sqlite import SQLiteStore


def open_store(database: str) -> SQLiteStore:
    """The store named by the configuration's `database` (a SQLite file)."""
    return SQLiteStore(database)
