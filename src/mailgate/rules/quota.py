"""The daily sending limit (docs/rules.md Q): recipients per rolling 24 hours, per scope.

The seed's 200 a day is a limit of Odoo's hosted service; mailgate offers it as its own abuse
guard, counted per recipient that leaves the gateway, with a separate limit for mass mail.
A recipient is taken at RCPT (so that concurrent sessions cannot overshoot the limit) and given
back when its transaction ends without the message; at the end of a message, the recipients
Postfix refused after taking them are given back (`recipients_to_give_back`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mailgate.config import Config
from mailgate.rules.addresses import domain_of

WINDOW = 24 * 3600.0
Stream = Literal["transactional", "mass"]


@dataclass(frozen=True)
class QuotaClaim:
    """One leaving recipient's take from a quota: which counter, and its limit."""

    key: str
    stream: Stream
    limit: int

    @property
    def lock_key(self) -> str:
        """What concurrent gateways serialise on while counting and taking."""
        return quota_lock_key(self.key, self.stream)


def quota_lock_key(key: str, stream: str) -> str:
    """The lock a take and a give-back of one counter both hold, so that across gateways every
    count sees every change made before it."""
    return f"quota:{key}:{stream}"


def quota_key(config: Config, sender: str, sasl_user: str | None) -> str | None:
    """What the limit is counted by; None when the mail is not counted (the null sender)."""
    scope = config.quota.scope
    if scope == "gateway":
        return "gateway"
    if scope == "sasl_user" and sasl_user:
        return f"sasl:{sasl_user.lower()}"
    domain = domain_of(sender)
    return f"domain:{domain}" if domain else None


def quota_limit(config: Config, mass: bool) -> int | None:
    return config.quota.mass_daily if mass else config.quota.daily


def quota_claim(config: Config, sender: str, sasl_user: str | None, mass: bool) -> QuotaClaim | None:
    """The claim one leaving recipient makes; None when nothing is counted (no limit, or the
    null sender)."""
    key = quota_key(config, sender, sasl_user)
    limit = quota_limit(config, mass)
    if key is None or limit is None:
        return None
    return QuotaClaim(key, "mass" if mass else "transactional", limit)


def quota_allows(count: int, limit: int | None) -> bool:
    """`count` recipients already taken in the window: one more is allowed while below the limit."""
    return limit is None or count < limit


def recipients_within(count: int, wanted: int, limit: int | None) -> int:
    """How many of `wanted` claims on one counter, counted in turn from `count` taken, the limit
    lets through (`quota_allows` for each, the ones before it taken): the store's take for a
    batch's claims on that counter (PostgreSQL's `mailgate_quota_batch` computes the same)."""
    if limit is None:
        return wanted
    return max(min(wanted, limit - count), 0)


def recipients_to_give_back(taken: int, accepted: int) -> int:
    """At the end of a message, how many of the `taken` recipients its transaction took to give
    back, Postfix having accepted `accepted` recipients for it (`recipient_count`).

    Recipients Postfix refused after the policy service let them through (a later restriction,
    the milter at RCPT) were taken but not sent. The accepted count also includes recipients that
    took nothing (the alias domains), so the difference may give back fewer than were refused,
    never more: the count stays on the safe side."""
    return max(taken - accepted, 0)
