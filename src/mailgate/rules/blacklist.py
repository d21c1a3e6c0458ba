"""What a recorded bounce, and a later successful delivery, do to the blacklist (docs/rules.md B2, B3).

Two readers learn that a recipient failed: the milter, from delivery reports to our tokenised
bounce address, and `watch-log`, from Postfix's own `status=bounced` lines. Both must record the
row and run the blacklist rule the same way, inside the caller's transaction, so that the count
and the entry it leads to are atomic; this module is that one way. The caller's transaction
holds the lock key `bounce_lock(address)` for every address it touches (PostgreSQL queues
concurrent gateways on it; SQLite's write lock covers it anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.config import BounceSettings
from mailgate.rules.bounces import blacklist_verdict
from mailgate.store.interface import BounceRecord, Store

RULE_SOURCE = "rule"
DELIVERED_REASON = "delivered successfully"
REEVALUATED_REASON = "re-evaluated: its bounces no longer count"


def bounce_lock(address: str) -> str:
    """The transaction lock key of an address's bounces and blacklist entry."""
    return f"bounce:{address}"


@dataclass(frozen=True)
class BounceOutcome:
    bounce_id: int | None        # None: a repeat, not written
    blacklisted: str | None      # the rule's reason when this bounce put the address on the list

    @property
    def repeat(self) -> bool:
        """The message's failure for this recipient was recorded already (B1: once per message)."""
        return self.bounce_id is None


@dataclass(frozen=True)
class Reevaluated:
    address: str
    verdict: str                 # what the rule says of the address's bounces now


@dataclass(frozen=True)
class DeliveryOutcome:
    reset: bool                  # the address had bounces that counted; they no longer do
    unblacklisted: bool          # the rule's blacklist entry was ended


def record_and_judge(store: Store, settings: BounceSettings, record: BounceRecord, now: float) -> BounceOutcome:
    """Record one failed recipient and, when it may count (tied to a message of ours and not
    stale), run the blacklist rule over the address's bounces. A message fails for a recipient
    once (B1): when a row for this message and recipient exists already (another report under
    another Message-ID, or the log and a report on the same message), nothing is written and the
    outcome is a repeat. Call inside `store.transaction(bounce_lock(record.recipient))`, which
    makes the check and the row atomic."""
    if record.message is not None and store.bounce_recorded(record.message, record.recipient):
        return BounceOutcome(None, None)
    bounce_id = store.record_bounce(record)
    if not record.matched or record.stale:
        return BounceOutcome(bounce_id, None)
    verdict = blacklist_verdict(store.countable_bounces(record.recipient, 0.0), settings, now)
    if verdict.due and store.blacklist_add(record.recipient, now, verdict.reason, RULE_SOURCE,
                                           list(verdict.bounce_ids)):
        return BounceOutcome(bounce_id, verdict.reason)
    return BounceOutcome(bounce_id, None)


def clear_after_delivery(store: Store, address: str, at: float) -> DeliveryOutcome:
    """A message reached the address: its earlier bounces stop counting (B2) and the rule's
    blacklist entry ends; an operator's entry stays, because the operator had a reason the
    rule cannot see. The reset is written only when something counted, so that every
    delivered recipient does not cost a write. Call inside
    `store.transaction(bounce_lock(address))`."""
    reset = bool(store.countable_bounces(address, 0.0))
    if reset:
        store.reset_bounces(address, at)
    removed = store.blacklist_remove(address, at, DELIVERED_REASON, source=RULE_SOURCE)
    return DeliveryOutcome(reset, removed)


def reevaluate_blacklist(store: Store, settings: BounceSettings, now: float) -> list[Reevaluated]:
    """B3 once more over every entry the rule made (an operator's stay): an address whose
    bounces no longer make the verdict due under the current counting (after the migration
    that gave bounces their reasons, a block list or spam refusal no longer counts) comes off
    the list. Each address in its own transaction under its lock; returns those removed."""
    removed: list[Reevaluated] = []
    for entry in store.blacklisted_by_rule():
        with store.transaction(bounce_lock(entry.address)):
            verdict = blacklist_verdict(store.countable_bounces(entry.address, 0.0), settings, now)
            if not verdict.due and store.blacklist_remove(entry.address, now, REEVALUATED_REASON, RULE_SOURCE):
                removed.append(Reevaluated(entry.address, verdict.reason))
    return removed
