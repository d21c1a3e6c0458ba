"""The bounce rules (docs/rules.md B1-B3): which bounces count, when an address is blacklisted,
and where a delivery report goes once it is recorded. Pure functions, time passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

from mailgate.config import BounceSettings, Config
from mailgate.rules.classify import is_any_bounce_address
from mailgate.rules.tokens import BounceToken
from mailgate.store.interface import BounceFact

DAY = 86400.0
UNTIED_ROWS_PER_REPORT = 10
"""Rows one report may write when it names no message whose recipients are known (the plain
bounce address, Odoo's own form, a message row from before recipients were kept): such rows never
count, and a report naming thousands of addresses must not write thousands of rows."""
ReportDestination = Literal["original", "odoo", "discard"]


@dataclass(frozen=True)
class ReportScreen:
    """Which failed recipients of one report are written (B1), and what was left out."""

    recorded: tuple[int, ...]    # indexes into the report's failed recipients, each address once
    not_recipients: int          # named, but the message was not sent to them
    repeated: int                # the same address again within the report
    over_limit: int              # addresses past what one report may name (never looked at)


def screen_failed(addresses: Sequence[str], recipient_count: int | None,
                  sent_to: Callable[[list[str]], AbstractSet[str]]) -> ReportScreen:
    """B1: a report counts only for recipients its message was really sent to, and one report's
    work is bounded. `addresses` are the report's failed recipients, normalised, in report
    order; `recipient_count` is how many recipients the message the report is tied to had, None
    when it is tied to no message whose recipients are known; `sent_to(addresses)` says which of
    them the message was sent to.

    Each address is looked at once, and at most `recipient_count` + UNTIED_ROWS_PER_REPORT of
    them (an honest report names no more failed recipients than the message had): tied, only the
    message's recipients are written, so a report writes at most as many rows as the message had
    recipients; untied, the first UNTIED_ROWS_PER_REPORT are written, rows that never count."""
    first: dict[str, int] = {}
    for index, address in enumerate(addresses):
        first.setdefault(address, index)
    repeated = len(addresses) - len(first)
    limit = (recipient_count or 0) + UNTIED_ROWS_PER_REPORT
    considered = list(first)[:limit]
    over_limit = len(first) - len(considered)
    if recipient_count is None:
        return ReportScreen(tuple(first[a] for a in considered), 0, repeated, over_limit)
    ours = sent_to(considered) if considered else set()
    recorded = tuple(first[a] for a in considered if a in ours)
    return ReportScreen(recorded, len(considered) - len(recorded), repeated, over_limit)


@dataclass(frozen=True)
class BlacklistVerdict:
    due: bool
    bounce_ids: tuple[int, ...]
    reason: str


def counts(fact: BounceFact, settings: BounceSettings) -> bool:
    """B3 `bounces.count`: `recipient` (the default) counts only the recipient's fault (B5:
    unknown user or domain, moved, a domain that accepts no mail), so a block list, a spam
    verdict or a full mailbox never blacklists a good address; `permanent` every permanent
    failure (mailgate's rule before reasons); `all` every bounce, as Odoo does."""
    if settings.count == "all":
        return True
    if settings.count == "permanent":
        return fact.permanent is True
    return fact.hard


_COUNTED = {"recipient": "hard bounces", "permanent": "permanent bounces", "all": "bounces"}


def blacklist_verdict(facts: list[BounceFact], settings: BounceSettings, now: float) -> BlacklistVerdict:
    """B3: at least `blacklist_after` counted bounces within `window_days`, the newest more than
    `min_spread_days` after the oldest, so that one bad day at a receiving server blacklists nobody.
    `facts` are the address's bounces not yet reset (B2); the window is applied here.
    """
    since = now - settings.window_days * DAY
    counted = sorted((f for f in facts if f.created_at >= since and counts(f, settings)), key=lambda f: f.created_at)
    if len(counted) < settings.blacklist_after:
        return BlacklistVerdict(False, (), f"{len(counted)} of {settings.blacklist_after} bounces")
    spread = counted[-1].created_at - counted[0].created_at
    if spread <= settings.min_spread_days * DAY:
        return BlacklistVerdict(False, (), f"{len(counted)} bounces within {spread / DAY:.1f} days: "
                                           f"not more than {settings.min_spread_days} days apart")
    reasons = ",".join(sorted({f.reason for f in counted if f.reason}))
    because = f" ({reasons})" if reasons else ""
    return BlacklistVerdict(True, tuple(f.id for f in counted),
                            f"{len(counted)} {_COUNTED[settings.count]}{because} in {settings.window_days} days, "
                            f"spread over {spread / DAY:.1f} days")


def token_is_stale(token: BounceToken, settings: BounceSettings, now: float) -> bool:
    """A report on a token older than `token_days` is recorded, never counted (a replayed or
    very late report proves nothing about the address today)."""
    return now - token.issued_at() > settings.token_days * DAY


def report_destination(config: Config, original_envelope: str | None,
                       to_odoo_own: bool = False) -> ReportDestination:
    """Where a recorded report goes: back to Odoo's own bounce address when the message came
    with one (so Odoo shows its red envelope), else per `bounces.forward` (`odoo` or `discard`).
    A report sent to Odoo's own pre-token form (`to_odoo_own`, T1) is Odoo's, on mail Odoo sent
    before the cut-over: it goes to Odoo as addressed, whatever `forward` says."""
    if to_odoo_own:
        return "odoo"
    if original_envelope and is_any_bounce_address(config, original_envelope):  # Odoo's own, any form
        return "original"
    return config.bounces.forward
