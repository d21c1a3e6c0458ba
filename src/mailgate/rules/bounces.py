"""The bounce rules (docs/rules.md B1-B3): which bounces count, when an address is blacklisted,
and where a delivery report goes once it is recorded. Pure functions, time passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mailgate.config import BounceSettings, Config
from mailgate.rules.classify import bounce_token_of, is_plain_bounce
from mailgate.rules.tokens import BounceToken
from mailgate.store.interface import BounceFact

DAY = 86400.0
ReportDestination = Literal["original", "odoo", "discard"]


@dataclass(frozen=True)
class BlacklistVerdict:
    due: bool
    bounce_ids: tuple[int, ...]
    reason: str


def counts(fact: BounceFact, settings: BounceSettings) -> bool:
    """mailgate counts hard bounces only; `count_soft` counts every bounce, as Odoo does."""
    return settings.count_soft or fact.permanent is True


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
    kind = "bounces" if settings.count_soft else "hard bounces"
    return BlacklistVerdict(True, tuple(f.id for f in counted),
                            f"{len(counted)} {kind} in {settings.window_days} days, "
                            f"spread over {spread / DAY:.1f} days")


def token_is_stale(token: BounceToken, settings: BounceSettings, now: float) -> bool:
    """A report on a token older than `token_days` is recorded, never counted (a replayed or
    very late report proves nothing about the address today)."""
    return now - token.issued_at() > settings.token_days * DAY


def is_odoo_bounce_address(config: Config, address: str | None) -> bool:
    """Odoo's own bounce address (`bounce@…`, `bounce+37-mail.mail-9@…` on an alias domain)."""
    if not address:
        return False
    return is_plain_bounce(config, address) or bounce_token_of(config, address) is not None


def report_destination(config: Config, original_envelope: str | None) -> ReportDestination:
    """Where a recorded report goes: back to Odoo's own bounce address when the message came
    with one (so Odoo shows its red envelope), else per `bounces.forward` (`odoo` or `discard`)."""
    if is_odoo_bounce_address(config, original_envelope):
        return "original"
    return config.bounces.forward
