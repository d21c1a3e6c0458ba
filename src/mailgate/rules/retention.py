"""Retention (docs/rules.md R1): how long each table's rows still matter, and the purge of the older ones.

Nothing else deletes: without a purge the store grows by ≈ 370 bytes per message (1.1 GB a
month at 100,000 mails a day) and every scan over it slows down. A row is kept as long as the
longest window that still reads it, so that no rule ever sees a different answer because of
the purge:

- bounces (and the resets that end their counting): `bounces.window_days`, the blacklist rule's
  window and the operator views' default one. Bounces a blacklist entry names stay for ever
  (`blacklist why`), and so does the blacklist itself;
- deliveries: that window too, at least watch-log's expiry horizon (it reads a queue id's
  deferrals back that far);
- messages: the longest of that window (bounces name them), the bounce tokens' lifetime
  (`bounces.token_days`: a report on an older token is still recorded against its message) and
  watch-log's horizon (it ties deliveries to their message by queue id). A message's recipients'
  digests (docs/rules.md B1) go with it: a report is checked against them as long as it can
  still find its message, and never after;
- inbound messages and their routes: `loop.minutes`, the loop guard's window;
- quota counters: the quota's rolling 24 hours;
- reputation alerts (docs/rules.md B6): `bounces.window_days`, the window `stats` reads by default.
"""

from __future__ import annotations

from mailgate.config import Config
from mailgate.rules.quota import WINDOW as QUOTA_WINDOW
from mailgate.store.interface import Store

DAY = 86400.0
EXPIRY_HORIZON = 30 * DAY
"""A Postfix queue id's deferrals older than this belong to another message (watch-log reads
them back that far; queue ids are reused)."""


def retention_cutoffs(config: Config, now: float) -> dict[str, float]:
    """Per table, the time before which its rows are no longer read (for `Store.purge`)."""
    bounce_window = config.bounces.window_days * DAY
    return {
        "bounces": now - bounce_window,
        "bounce_resets": now - bounce_window,
        "deliveries": now - max(bounce_window, EXPIRY_HORIZON),
        "messages": now - max(bounce_window, config.bounces.token_days * DAY, EXPIRY_HORIZON),
        "inbound_messages": now - config.loop.minutes * 60.0,
        "quota_counters": now - QUOTA_WINDOW,
        "reputation_alerts": now - bounce_window,
    }


def purge_expired(store: Store, config: Config, now: float) -> dict[str, int]:
    """Delete what no window reads any more; returns the rows deleted per table (and the
    recipients the forgotten quota minutes counted, as `quota_recipients`)."""
    return store.purge(retention_cutoffs(config, now))
