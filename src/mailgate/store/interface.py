"""The rows the rules and adapters hand to the store, and the interface they see it through.

The interface is named for what the callers need (record a message, count recent messages on
a route, add a bounce, is this address blacklisted, take from a quota), so that a backend for
several gateways sharing one state is one more class, not a rewrite. Every caller, the operator
views and `migrate-store` included, sees a store through `Store` alone, and reads rows back as
the typed records below (never a backend's dicts), so that it works the same on either backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mailgate.rules.reason_vocabulary import UNDECIDED

# A task a migration leaves for `serve` (Store.take_pending_task): schema v9 gave every bounce
# its reason, so the blacklist is judged once more under the counting of the configuration.
PENDING_REEVALUATION = "blacklist-reevaluation"


class StoreUnavailable(RuntimeError):
    """The store cannot be opened and written at start (a read-only or full file system, a
    missing directory): better to exit and be restarted than to serve and refuse every message."""


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
    tokenised: bool = False      # the envelope is our bounce+TOKEN: reports come back to the milter
    # The keyed digests of the envelope recipients (TokenSigner.recipient_digest), each once: a
    # delivery report counts only for a recipient the message was sent to (docs/rules.md B1).
    recipient_digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class InboundRecord:
    """One inbound message as accepted (or dropped) by the milter.

    `confirmed` is 0 while the milter cannot know that Postfix queued the message: the row is
    written before the milter answers, and a milter killed in between (or a session that fails
    then) leaves the client to retry a message that no queue holds. Such a row must not make
    the retry a duplicate; the milter confirms it once Postfix has gone on past that message."""

    queue_id: str
    message_id: str | None
    sender: str | None
    routes: str
    action: str
    created_at: float
    confirmed: int = 1


def bounce_kind(hard: bool, permanent: bool | None, reason: str | None) -> str:
    """hard (the recipient's fault), soft (anything else the report told), or unknown (it said
    neither a status nor words we know): the `BOUNCE_KIND` of the SQL views."""
    if hard:
        return "hard"
    return "unknown" if permanent is None and (reason is None or reason in UNDECIDED) else "soft"


@dataclass(frozen=True)
class BounceRecord:
    """One failed recipient of one delivery report. `reason` is the class, a plain lower-case
    word of `rules.reason_vocabulary.REASONS` ("userunknown", "blocked"); what the report said
    is `diagnostic`; `hard` says it was the recipient's fault (docs/rules.md B5)."""

    created_at: float
    recipient: str
    status: str | None
    action: str | None
    permanent: bool | None
    reason: str | None
    reporting_mta: str | None
    remote_mta: str | None
    message: int | None          # the outbound message row the report is about
    server: str | None
    source: str                  # dsn | flufl | postfix-log | ...
    stale: bool = False          # the token was older than bounces.token_days: never counted
    matched: bool = True         # tied to a message of ours (token or attached Message-ID)
    diagnostic: str | None = None
    hard: bool = False


@dataclass(frozen=True)
class DeliveryRecord:
    """One delivery attempt as Postfix logged it (`QID: to=<…>, relay=…, status=…`)."""

    at: float
    queue_id: str
    recipient: str
    relay: str | None
    status: str                  # sent | deferred | bounced | expired
    dsn: str | None
    delay: float | None
    reason: str | None
    message: int | None          # the outbound message row with this queue id
    server: str | None


@dataclass(frozen=True)
class BounceFact:
    """What the blacklist rule needs of a recorded bounce."""

    id: int
    created_at: float
    permanent: bool | None
    reason: str | None = None
    hard: bool = False


def bounce_ids_of(text: str | None) -> list[int]:
    """The bounce row ids a blacklist entry names (`bounce_ids`, comma separated)."""
    return [int(part) for part in (text or "").split(",") if part]


# -- rows read back ---------------------------------------------------------------------------------
# Fields in the order of their table's columns: the operator commands print them in that order.


@dataclass(frozen=True)
class StoredOutbound:
    """An outgoing message as recorded (`OutboundRecord`), with its row id: what a bounce token
    names and what a delivery report is tied to. `tokenised` is None for a row from before the
    flag existed (schema v4): such a message may have carried a token, so its reports cannot be
    assumed to come back by the log alone. `recipient_count` is None for a row from before
    recipients were kept (schema v8): no report can be checked against its recipients."""

    id: int
    queue_id: str | None
    message_id: str | None
    envelope_from_original: str | None
    envelope_from: str | None
    header_from_before: str | None
    header_from_after: str | None
    server: str | None
    mass: bool | None
    listener: str | None
    sasl_user: str | None
    created_at: float
    tokenised: bool | None
    recipient_count: int | None


@dataclass(frozen=True)
class StoredBounce:
    """One recorded bounce (`BounceRecord`), with its row id: what a blacklist entry names."""

    id: int
    created_at: float
    recipient: str
    status: str | None
    action: str | None
    permanent: bool | None
    reason: str | None
    reporting_mta: str | None
    remote_mta: str | None
    message: int | None
    server: str | None
    source: str | None
    stale: bool
    matched: bool
    diagnostic: str | None
    hard: bool

    @property
    def kind(self) -> str:
        return bounce_kind(self.hard, self.permanent, self.reason)


@dataclass(frozen=True)
class BlacklistEntry:
    """One blacklisting of an address, active or ended (the history keeps both)."""

    id: int
    address: str
    added_at: float
    reason: str | None
    source: str | None           # rule | operator
    bounce_ids: str | None       # the bounces that caused it, as stored (comma separated ids)
    removed_at: float | None
    removed_reason: str | None

    @property
    def active(self) -> bool:
        return self.removed_at is None

    @property
    def cause_ids(self) -> list[int]:
        """The bounce row ids the entry names."""
        return bounce_ids_of(self.bounce_ids)


@dataclass(frozen=True)
class StoredDelivery:
    """One recorded delivery attempt (`DeliveryRecord`), with its row id."""

    id: int
    at: float
    queue_id: str
    recipient: str | None
    relay: str | None
    status: str
    dsn: str | None
    delay: float | None
    reason: str | None
    message: int | None
    server: str | None


# -- the operator views' aggregates -------------------------------------------------------------------


@dataclass(frozen=True)
class BounceDay:
    day: str                     # YYYY-MM-DD, UTC
    bounces: int
    hard: int


@dataclass(frozen=True)
class ServerBounces:
    server: str                  # "-": no server known
    bounces: int


@dataclass(frozen=True)
class KindBounces:
    kind: str                    # hard | soft | unknown
    bounces: int


@dataclass(frozen=True)
class ReasonBounces:
    reason: str                  # a word of rules.reason_vocabulary.REASONS; "-": none recorded
    bounces: int
    hard: int


@dataclass(frozen=True)
class SenderSideCount:
    """Bounces of one sender-side reason, per upstream server and recipient domain (the
    reputation alert's input, docs/rules.md B6)."""

    server: str                  # "-": no server known
    domain: str
    reason: str
    bounces: int


@dataclass(frozen=True)
class ReputationAlert:
    """One alert: the window it covers (its start), what passed the threshold."""

    window_start: float
    server: str
    domain: str
    reason: str
    bounces: int
    at: float


@dataclass(frozen=True)
class DomainBounces:
    domain: str
    bounces: int


@dataclass(frozen=True)
class BounceStats:
    """`bounces stats`: counts per day, per server, per kind and the top recipient domains."""

    per_day: tuple[BounceDay, ...]
    per_server: tuple[ServerBounces, ...]
    per_kind: tuple[KindBounces, ...]
    top_domains: tuple[DomainBounces, ...]
    per_reason: tuple[ReasonBounces, ...] = ()


@dataclass(frozen=True)
class DeliveryCount:
    """Delivery attempts of one day, server and status."""

    day: str                     # YYYY-MM-DD, UTC
    server: str                  # "-": no server known
    status: str
    count: int
    # the domain of the envelope sender the message left with (its alias domain when it left
    # with the bounce address); "-": no outbound row for the queue id
    domain: str = "-"


@dataclass(frozen=True)
class DeliveryTotal:
    """All-time delivery attempts of one server and status (purged rows included)."""

    server: str
    status: str
    count: int


QuotaTake = tuple[str, str, float, int]
"""(key, stream, at, recipients): recipients taken from, or given back to, the minute of one
counter that `at` falls in."""


@dataclass(frozen=True)
class QuotaBatch:
    """A policy batch's quota work (docs/rules.md Q) for `Store.quota_batch`, done in one
    transaction holding every lock of `locks` (`rules.quota.quota_lock_key` of each counter
    touched), in this order: the give-backs (a minute's counter lowered, never below zero), the
    takes again of what a closed connection gave back, then, per claimed counter, its count over
    the window since `since` and a take at `at` of as many of its `wanted` recipients as its limit
    leaves room for (`rules.quota.recipients_within`; a counter's claims share one limit, the
    stream's). `claims` names each counter once, as (key, stream, wanted, limit)."""

    locks: tuple[str, ...]
    give_backs: tuple[QuotaTake, ...] = ()
    retakes: tuple[QuotaTake, ...] = ()
    claims: tuple[tuple[str, str, int, int], ...] = ()
    at: float = 0.0
    since: float = 0.0


@dataclass(frozen=True)
class TableBatch:
    """Rows of one table as stored, ids included (what `migrate-store` copies)."""

    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]


@runtime_checkable
class Store(Protocol):
    """What every caller may ask of a store, whichever backend it is."""

    def transaction(self, *lock_keys: str) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...
    def store_id(self) -> str: ...
    def checkpoint(self) -> None: ...
    def check_writable(self) -> None: ...
    @property
    def schema_version(self) -> int: ...
    # outbound
    def record_outbound(self, record: OutboundRecord) -> int: ...
    def outbound_message(self, row_id: int) -> StoredOutbound | None: ...
    def known_outbound(self, message_ids: list[str]) -> str | None: ...
    def outbound_by_message_id(self, message_id: str) -> StoredOutbound | None: ...
    def outbound_by_queue_id(self, queue_id: str) -> StoredOutbound | None: ...
    def sent_to(self, message: int, recipient_digests: Sequence[str]) -> set[str]: ...
    # inbound
    def already_received(self, message_id: str) -> bool: ...
    def recent_count(self, sender: str, key: str, since: float) -> int: ...
    def record_inbound(self, record: InboundRecord, route_keys: list[str]) -> int: ...
    def confirm_inbound(self, row_id: int) -> None: ...
    # bounces and the blacklist
    def record_bounce(self, record: BounceRecord) -> int: ...
    def bounce_recorded(self, message: int, recipient: str) -> bool: ...
    def countable_bounces(self, address: str, since: float) -> list[BounceFact]: ...
    def reset_bounces(self, address: str, at: float) -> None: ...
    def blacklisted(self, addresses: list[str]) -> set[str]: ...
    def blacklist_add(self, address: str, at: float, reason: str, source: str, bounce_ids: list[int]) -> bool: ...
    def blacklist_remove(self, address: str, at: float, reason: str, source: str | None = None) -> bool: ...
    def blacklist_entries(self, include_removed: bool = False) -> list[BlacklistEntry]: ...
    def blacklist_history(self, address: str) -> list[BlacklistEntry]: ...
    def bounce_rows(self, since: float = 0.0, address: str | None = None, ids: list[int] | None = None,
                    limit: int | None = None) -> list[StoredBounce]: ...
    def bounce_stats(self, since: float) -> BounceStats: ...
    def bounce_kind_totals(self) -> list[KindBounces]: ...
    def blacklisted_by_rule(self) -> list[BlacklistEntry]: ...
    def sender_side_counts(self, since: float, reasons: Sequence[str]) -> list[SenderSideCount]: ...
    def record_reputation_alert(self, alert: ReputationAlert) -> bool: ...
    def reputation_alerts(self, since: float) -> list[ReputationAlert]: ...
    def take_pending_task(self, name: str) -> bool: ...
    # deliveries (from Postfix's log)
    def record_delivery(self, record: DeliveryRecord) -> int: ...
    def deliveries_of(self, queue_id: str, since: float) -> list[StoredDelivery]: ...
    def delivery_stats(self, since: float) -> list[DeliveryCount]: ...
    def delivery_totals(self) -> list[DeliveryTotal]: ...
    def log_position(self, path: str) -> tuple[int, int] | None: ...
    def save_log_position(self, path: str, inode: int, offset: int, at: float) -> None: ...
    # quota
    def quota_count(self, key: str, stream: str, since: float) -> int: ...
    def quota_take(self, key: str, stream: str, at: float, count: int = 1) -> None: ...
    def quota_counts(self, counters: Sequence[tuple[str, str]], since: float) -> dict[tuple[str, str], int]: ...
    def quota_take_many(self, takes: Sequence[tuple[str, str, float, int]]) -> None: ...
    def quota_give_back(self, key: str, stream: str, at: float, count: int) -> None: ...
    def quota_batch(self, batch: QuotaBatch) -> dict[tuple[str, str], int]: ...
    def purge_quota(self, before: float) -> int: ...
    # retention
    def purge(self, cutoffs: Mapping[str, float]) -> dict[str, int]: ...
    # copying a whole store (migrate-store)
    def table_rows(self, table: str, batch: int = ...) -> Iterator[TableBatch]: ...
    def tables_with_rows(self, tables: Sequence[str]) -> list[str]: ...
    def insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...
    def reset_id_sequences(self) -> None: ...
    def adopt_store_id(self, store_id: str) -> None: ...
