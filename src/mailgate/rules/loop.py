"""The loop guard (docs/rules.md I4): which routes of a message reached the threshold, and the
replies to Odoo's own loop notices that are dropped.
"""

from __future__ import annotations

from collections.abc import Callable

from mailgate.config import Config
from mailgate.rules.addresses import normalize
from mailgate.rules.message import InboundMessage, Route

LOOP_NOTICE_MARK = "-loop-detection-bounce-email@"


def is_loop_notice_reply(message: InboundMessage) -> bool:
    """Odoo looks in References and In-Reply-To alike (`_detect_loop_headers`)."""
    return any(LOOP_NOTICE_MARK in value for name in ("references", "in-reply-to") for value in message.values(name))


def loop_counted(route: Route) -> bool:
    """I4 counts new mail per alias target (and fallback) and replies per thread."""
    return route.kind in ("alias", "fallback", "reply")


def loop_exempt(config: Config, sender: str | None) -> bool:
    allowed = {normalize(a) for a in config.loop.allowed_senders}
    return not sender or normalize(sender) in allowed


def looping_routes(config: Config, sender: str | None, routes: list[Route],
                   recent_count: Callable[[str, str], int]) -> list[Route]:
    """I4: the routes on which this sender reached the threshold within the window.

    `recent_count(sender, key)` is the number of messages already accepted from the sender on
    that key within `loop.minutes`; at `count >= threshold` the new message is a loop.
    """
    if not sender or loop_exempt(config, sender):
        return []
    return [r for r in routes if loop_counted(r) and recent_count(sender, r.key) >= config.loop.threshold]
