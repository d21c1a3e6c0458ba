"""The rows the rules and adapters hand to the store, and the interface they see it through.

The interface is named for what the callers need (record a message, count recent messages on
a route, add a bounce, is this address blacklisted, take from a quota), so that a backend for
several gateways sharing one state is one more class, not a rewrite.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Mapping, Protocol


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


@dataclass(frozen=True)
class BounceRecord:
    """One failed recipient of one delivery report."""

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


class Store(Protocol):
    def transaction(self, *lock_keys: str) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...
    def store_id(self) -> str: ...
    def purge(self, cutoffs: Mapping[str, float]) -> dict[str, int]: ...
    # outbound
    def record_outbound(self, record: OutboundRecord) -> int: ...
    def outbound_message(self, row_id: int) -> dict | None: ...
    def known_outbound(self, message_ids: list[str]) -> str | None: ...
    def outbound_by_message_id(self, message_id: str) -> dict | None: ...
    # inbound
    def already_received(self, message_id: str) -> bool: ...
    def recent_count(self, sender: str, key: str, since: float) -> int: ...
    def record_inbound(self, record: InboundRecord, route_keys: list[str]) -> int: ...
    def confirm_inbound(self, row_id: int) -> None: ...
    # bounces and the blacklist
    def record_bounce(self, record: BounceRecord) -> int: ...
    def countable_bounces(self, address: str, since: float) -> list[BounceFact]: ...
    def reset_bounces(self, address: str, at: float) -> None: ...
    def blacklisted(self, addresses: list[str]) -> set[str]: ...
    def blacklist_add(self, address: str, at: float, reason: str, source: str, bounce_ids: list[int]) -> bool: ...
    def blacklist_remove(self, address: str, at: float, reason: str, source: str | None = None) -> bool: ...
    # deliveries (from Postfix's log)
    def outbound_by_queue_id(self, queue_id: str) -> dict | None: ...
    def record_delivery(self, record: DeliveryRecord) -> int: ...
    def deliveries_of(self, queue_id: str, since: float) -> list[dict]: ...
    def log_position(self, path: str) -> tuple[int, int] | None: ...
    def save_log_position(self, path: str, inode: int, offset: int, at: float) -> None: ...
    # quota
    def quota_count(self, key: str, stream: str, since: float) -> int: ...
    def quota_take(self, key: str, stream: str, at: float, count: int = 1) -> None: ...
