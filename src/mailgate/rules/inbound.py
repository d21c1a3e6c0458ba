"""The inbound decision (docs/rules.md I2-I4): Odoo's route order, duplicates and the loop guard.

Pure functions: the addresses and headers of one message in, routes and an action out. What the
store knows (outbound Message-IDs, recent counts) is passed in as callables, so the milter,
`mailgate explain inbound` and the tests share one implementation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from typing import Literal

from mailgate.config import Alias, Config
from mailgate.rules.addresses import clean_text
from mailgate.rules.classify import alias_for_address, bounce_token_of, is_catchall, is_odoo_own_bounce, is_plain_bounce
from mailgate.rules.loop import is_loop_notice_reply, looping_routes
from mailgate.rules.message import InboundMessage, Route, _unique
from mailgate.rules.replies import SMTP, SmtpReply
from mailgate.rules.tokens import BounceToken

_ODOO_MSGID = re.compile(r"-openerp-(\d+)-([a-z0-9_.]+)@", re.I)
DIRECT_WRITE = "catchall-direct"
InboundAction = Literal["deliver", "reject", "defer", "hold", "drop"]


@dataclass(frozen=True)
class InboundDecision:
    routes: tuple[Route, ...]
    action: InboundAction
    reply: SmtpReply | None    # the SMTP reply for reject/defer
    reasons: tuple[str, ...] = field(default=())
    bounce_token: BounceToken | None = None   # verified once here; the bounce recording uses it

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.routes]


def thread_target(message_id: str) -> str | None:
    """The Odoo model a tracking Message-ID names, as an alias target (`odoo:crm.lead`)."""
    found = _ODOO_MSGID.search(message_id)
    return f"odoo:{found.group(2).lower()}" if found else None


def thread_key(message_id: str) -> str:
    """What the loop guard counts replies by: the record a tracking Message-ID names
    (`odoo:crm.lead/42`), as Odoo counts a sender's messages per record, whichever of the
    record's messages they answer; else the Message-ID itself."""
    found = _ODOO_MSGID.search(message_id)
    return f"odoo:{found.group(2).lower()}/{found.group(1)}" if found else message_id


def is_delivery_report(message: InboundMessage) -> bool:
    """multipart/report with report-type=delivery-status; like Odoo, also a malformed type
    such as `multipart/report: report-type=delivery-status` (the report type shows it)."""
    value = message.first("content-type")
    if not value:
        return False
    holder = Message()
    holder["Content-Type"] = clean_text(value)
    try:
        content_type = holder.get_content_type()
        if "report-type=delivery-status" in content_type:
            return True
        return (content_type == "multipart/report"
                and str(holder.get_param("report-type", "")).lower() == "delivery-status")
    except (UnicodeError, ValueError):
        return False


def find_routes(config: Config, message: InboundMessage,
                known_outbound: Callable[[list[str]], str | None]) -> tuple[list[Route], list[str], str | None]:
    """I2: (routes, reasons, bounce token) in Odoo's order; the first step that applies wins.

    `known_outbound(ids)` returns the first of the ids that went out through this gateway.
    """
    to_set = message.to_set
    sender = message.sender or ""
    for address in to_set:
        token = bounce_token_of(config, address)
        if token is not None:
            return [Route("bounce", "bounce", "bounce")], [f"{address} is a tokenised bounce address"], token
    if any(is_plain_bounce(config, a) for a in to_set):
        return [Route("bounce", "bounce", "bounce")], ["addressed to the bounce address"], None
    odoo_own = next((a for a in to_set if is_odoo_own_bounce(config, a)), None)
    if odoo_own is not None:
        return [Route("bounce", "bounce", "bounce")], [f"{odoo_own} is Odoo's own bounce address"], None
    if sender.split("@")[0] == "mailer-daemon":
        return [Route("bounce", "bounce", "bounce")], ["sent by mailer-daemon"], None
    if is_delivery_report(message):
        return [Route("bounce", "bounce", "bounce")], ["a delivery status report"], None

    refs = message.thread_references
    thread = known_outbound(refs) if refs else None
    if thread:
        target = thread_target(thread)
        other = _unique_aliases(a for a in (alias_for_address(config, t) for t in to_set)
                                if a is not None and target is not None and a.target != target)
        if not other:
            return ([Route("reply", thread_key(thread), f"reply:{thread}")],
                    [f"a reply to {thread}, sent by this gateway"], None)
        # Odoo: a forward to aliases of other targets; only those aliases route it
        return ([Route("alias", alias.target, f"alias:{alias.name}", alias.target) for alias in other],
                [f"alias {alias.name} ({alias.address}) of another target than the thread {thread}: "
                 "new mail for it" for alias in other], None)

    if to_set and all(is_catchall(config, a) for a in to_set):
        return [Route("catchall", DIRECT_WRITE, "catchall")], ["written directly to the catchall"], None

    aliases = _unique_aliases(alias_for_address(config, a) for a in message.recipient_set)
    if aliases:
        return ([Route("alias", alias.target, f"alias:{alias.name}", alias.target) for alias in aliases],
                [f"alias {alias.name} ({alias.address}) among the recipients" for alias in aliases], None)
    if config.fallback_target:
        target = config.fallback_target
        return [Route("fallback", target, f"fallback:{target}", target)], ["no alias matches: fallback target"], None
    if any(is_catchall(config, a) for a in to_set):
        return [Route("catchall", "catchall", "catchall")], ["a catchall address among the recipients"], None
    return [], ["no possible route"], None


def _unique_aliases(aliases: Iterable[Alias | None]) -> list[Alias]:
    found: dict[str, Alias] = {}
    for alias in aliases:
        if alias is not None:
            found.setdefault(alias.name, alias)
    return list(found.values())


def decide_inbound(config: Config, message: InboundMessage, *,
                   known_outbound: Callable[[list[str]], str | None],
                   already_received: Callable[[str], bool],
                   recent_count: Callable[[str, str], int],
                   verify_token: Callable[[str], BounceToken | None]) -> InboundDecision:
    """The whole inbound decision for one message, in the order Odoo applies its checks.

    `verify_token(text)` is the token signer's check: the token it returns travels with the
    decision, so the bounce recording never parses or verifies the address again."""
    if is_loop_notice_reply(message):
        return InboundDecision((), "drop", None, ("a reply to a loop notice: dropped, as Odoo does",))
    routes, reasons, token_text = find_routes(config, message, known_outbound)
    token = verify_token(token_text) if token_text is not None else None
    if token_text is not None and token is None:
        return InboundDecision(tuple(routes), "reject", SMTP["forged_bounce"],
                               (*reasons, "the bounce token was not issued by this gateway"))
    if not routes:
        return InboundDecision((), "reject", SMTP["no_route"], tuple(reasons))
    if routes[0].key == DIRECT_WRITE and config.catchall_direct_write == "reject":
        return InboundDecision(tuple(routes), "reject", SMTP["catchall_direct"],
                               (*reasons, "catchall_direct_write: reject"))
    duplicate = _duplicate_of(message, known_outbound, already_received)
    if duplicate:
        return InboundDecision(tuple(routes), "drop", None, (*reasons, f"duplicate of {duplicate}: dropped"),
                               token)
    looping = looping_routes(config, message.sender, routes, recent_count)
    if looping:
        # Odoo ignores the whole message when any one of its routes loops
        loop_reasons = (*reasons, *(f"loop: {message.sender} reached {config.loop.threshold} messages on "
                                    f"{r.label} within {config.loop.minutes} minutes" for r in looping))
        action = config.loop.action
        reply = {"reject": SMTP["loop_reject"], "defer": SMTP["loop_defer"]}.get(action)
        return InboundDecision(tuple(routes), action, reply, loop_reasons)
    return InboundDecision(tuple(routes), "deliver", None, tuple(reasons), token)


def _duplicate_of(message: InboundMessage, known_outbound: Callable[[list[str]], str | None],
                  already_received: Callable[[str], bool]) -> str | None:
    """I3, as Odoo checks it: the Message-ID, or Odoo's own `X-Odoo-Message-Id`, was received
    before. The latter is also Odoo's when it went out through this gateway: Odoo's own mail
    coming back. (A Message-ID that went out is not enough: other applications submit here too,
    and Odoo holds only its own messages.)"""
    for message_id in _unique([i for i in (message.message_id, message.odoo_message_id) if i]):
        if already_received(message_id):
            return message_id
    odoo_id = message.odoo_message_id
    return known_outbound([odoo_id]) if odoo_id else None
