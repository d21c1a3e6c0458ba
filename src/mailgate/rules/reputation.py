"""The "it's our fault" alert (docs/rules.md B6): when receivers refuse us, tell the operator.

A block list, a spam verdict, a failed SPF or DMARC check or a missing PTR record is about our
upstream server or our domain, not about the recipient; such bounces never count toward a
recipient's blacklist by default (B3), so they would go unseen. They are counted per upstream
server and recipient domain within fixed windows (`bounces.reputation_window_minutes`, from
the epoch), and the first time a pair passes `bounces.reputation_threshold` in a window one
alert is recorded and logged; the store keeps it, so several gateways log it once between them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mailgate.config import BounceSettings
from mailgate.rules.reason_vocabulary import SENDER_SIDE
from mailgate.store.interface import ReputationAlert, SenderSideCount, Store


def window_start(settings: BounceSettings, now: float) -> float:
    """The start of the fixed window `now` falls in."""
    width = settings.reputation_window_minutes * 60.0
    return now - now % width


@dataclass(frozen=True)
class PairCount:
    server: str
    domain: str
    reason: str                  # the most frequent sender-side reason of the pair
    bounces: int                 # all its sender-side bounces in the window


def over_threshold(counts: list[SenderSideCount], threshold: int) -> list[PairCount]:
    """The (server, domain) pairs whose sender-side bounces reach the threshold, with their
    most frequent reason (ties: the alphabetically first, so that the line is stable)."""
    totals: Counter[tuple[str, str]] = Counter()
    by_reason: dict[tuple[str, str], Counter[str]] = {}
    for row in counts:
        pair = (row.server, row.domain)
        totals[pair] += row.bounces
        by_reason.setdefault(pair, Counter())[row.reason] += row.bounces
    found = []
    for pair, total in totals.items():
        if total >= threshold:
            reason = min(by_reason[pair].items(), key=lambda item: (-item[1], item[0]))[0]
            found.append(PairCount(pair[0], pair[1], reason, total))
    return sorted(found, key=lambda p: (-p.bounces, p.server, p.domain))


def new_alerts(store: Store, settings: BounceSettings, now: float) -> list[ReputationAlert]:
    """The alerts due now and not yet recorded for this window (recorded by this call)."""
    if settings.reputation_threshold is None:
        return []
    start = window_start(settings, now)
    due = over_threshold(store.sender_side_counts(start, sorted(SENDER_SIDE)), settings.reputation_threshold)
    alerts = [ReputationAlert(start, p.server, p.domain, p.reason, p.bounces, now) for p in due]
    return [alert for alert in alerts if store.record_reputation_alert(alert)]


def alerts_after(store: Store, settings: BounceSettings, reasons: list[str], now: float) -> list[ReputationAlert]:
    """`new_alerts` when some of the bounces just recorded (their `reasons`) blame our side:
    the counting query runs only then."""
    return new_alerts(store, settings, now) if SENDER_SIDE.intersection(reasons) else []


def alert_fields(alert: ReputationAlert) -> dict[str, object]:
    """The alert's log line fields, `event=reputation server=… domain=… reason=… count=…`."""
    return {"event": "reputation", "server": alert.server, "domain": alert.domain, "reason": alert.reason,
            "count": alert.bounces}
