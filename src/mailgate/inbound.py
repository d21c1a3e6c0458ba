"""The inbound decision (odoo-rules I1-I4): Odoo's route order, duplicates and the loop guard.

Pure functions: the addresses and headers of one message in, routes and an action out. What the
store knows (outbound Message-IDs, recent counts) is passed in as plain values or callables, so
the milter, `mailgate explain inbound` and the tests share one implementation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Callable, Iterable

from mailgate.addresses import clean_text, normalize, parse_mailboxes
from mailgate.config import Alias, Config
from mailgate.replies import SMTP
from mailgate.tokens import split_tokenised

LOOP_NOTICE_MARK = "-loop-detection-bounce-email@"
DIRECT_WRITE = "catchall-direct"
_MSGID = re.compile(r"<[^<>\s]+>")
_FOLDED_MSGID = re.compile(r"<[^<>]+>")  # Odoo's unfold_references: whitespace inside <...> is dropped
_FOLDING = re.compile(r"[\r\n\t ]+")
# Odoo's tracking Message-ID: <random.timestamp-openerp-RES_ID-MODEL@host>
_ODOO_MSGID = re.compile(r"-openerp-(\d+)-([a-z0-9_.]+)@", re.I)
# Odoo looks a reply up among the last 32 references only, and never by a `reply_to` id (the
# Message-ID of a message posted with reply_to_force_new: answers to it are new mail).
REPLY_REFERENCES_LIMIT = 32
FORCE_NEW_MARK = "reply_to"

TO_HEADERS = ("delivered-to", "to")
RECIPIENT_HEADERS = TO_HEADERS + ("cc", "resent-to", "resent-cc")


@dataclass(frozen=True)
class InboundMessage:
    headers: tuple[tuple[str, str], ...]
    envelope_recipients: tuple[str, ...] = ()
    envelope_sender: str = ""

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def first(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    def addresses(self, names: Iterable[str]) -> list[str]:
        found: list[str] = []
        for name in names:
            for value in self.values(name):
                found += [normalize(b.address) for b in parse_mailboxes(value) or []]
        return found

    @property
    def to_set(self) -> list[str]:
        """I1: Delivered-To and To, plus the envelope recipients known at SMTP time."""
        return _unique(self.addresses(TO_HEADERS) + [normalize(r) for r in self.envelope_recipients])

    @property
    def recipient_set(self) -> list[str]:
        """I1: the "to" set plus Cc, Resent-To and Resent-Cc: where aliases are looked for."""
        return _unique(self.to_set + self.addresses(RECIPIENT_HEADERS[2:]))

    @property
    def sender(self) -> str | None:
        boxes = parse_mailboxes(self.first("from"))
        return normalize(boxes[0].address) if boxes else None

    @property
    def message_id(self) -> str | None:
        value = self.first("message-id")
        found = _MSGID.search(value or "")
        return found.group(0) if found else (value.strip() or None if value else None)

    @property
    def references(self) -> list[str]:
        """`References`, or else `In-Reply-To`: the ids of the thread, oldest first.

        Ids folded over several lines by a buggy client are unfolded, as Odoo does."""
        refs = _unfold_ids(self.values("references"))
        return refs or _unfold_ids(self.values("in-reply-to"))

    @property
    def thread_references(self) -> list[str]:
        """The ids Odoo looks a reply up by: the last 32 references that are not `reply_to` ids."""
        return [r for r in self.references if FORCE_NEW_MARK not in r][-REPLY_REFERENCES_LIMIT:]

    @property
    def odoo_message_id(self) -> str | None:
        """`X-Odoo-Message-Id`: Odoo's own id of a message it sent, also checked for duplicates."""
        return (self.first("x-odoo-message-id") or "").strip() or None


def _unfold_ids(values: list[str]) -> list[str]:
    return [_FOLDING.sub("", ref) for ref in _FOLDED_MSGID.findall(" ".join(values))]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


@dataclass(frozen=True)
class Route:
    kind: str                  # bounce | reply | catchall | alias | fallback
    key: str                   # what the loop guard counts by: alias target, thread id, ...
    label: str                 # "alias:sales", "reply:<id>", "catchall", "bounce", "fallback:<t>"
    target: str | None = None  # where Postfix delivers (alias target, fallback target)


@dataclass(frozen=True)
class InboundDecision:
    routes: tuple[Route, ...]
    action: str                # deliver | reject | defer | hold | drop
    reply: str | None          # the SMTP reply for reject/defer ("550 5.1.1 ...")
    reasons: tuple[str, ...] = field(default=())
    bounce_token: str | None = None

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.routes]


def _address_set(config: Config, local: str) -> set[str]:
    return {f"{local}@{d}" for d in config.alias_domain_set}


def is_catchall(config: Config, address: str) -> bool:
    return normalize(address) in _address_set(config, config.catchall_alias)


def bounce_token_of(config: Config, address: str) -> str | None:
    """The token of `bounce+TOKEN@alias-domain`, or None when the address is not one."""
    parts = split_tokenised(normalize(address), config.bounce_alias)
    if parts and parts[1] in config.alias_domain_set:
        return parts[0]
    return None


def is_plain_bounce(config: Config, address: str) -> bool:
    return normalize(address) in _address_set(config, config.bounce_alias)


def alias_for_address(config: Config, address: str) -> Alias | None:
    """An alias by its full address, or an `incoming_local` alias by local part on an allowed
    domain (on any domain when `allowed_alias_domains: []` says there is no restriction)."""
    address = normalize(address)
    for alias in config.aliases:
        if alias.address.lower() == address:
            return alias
    local, _, domain = address.rpartition("@")
    if config.incoming_local_anywhere or domain in config.accepted_domain_set:
        for alias in config.aliases:
            if alias.incoming_local and alias.name == local:
                return alias
    return None


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
    if loop_exempt(config, sender):
        return []
    return [r for r in routes if loop_counted(r) and recent_count(sender, r.key) >= config.loop.threshold]


def decide_inbound(config: Config, message: InboundMessage, *,
                   known_outbound: Callable[[list[str]], str | None],
                   already_received: Callable[[str], bool],
                   recent_count: Callable[[str, str], int],
                   token_valid: Callable[[str], bool]) -> InboundDecision:
    """The whole inbound decision for one message, in the order Odoo applies its checks."""
    if is_loop_notice_reply(message):
        return InboundDecision((), "drop", None, ("a reply to a loop notice: dropped, as Odoo does",))
    routes, reasons, token = find_routes(config, message, known_outbound)
    if token is not None and not token_valid(token):
        return InboundDecision(tuple(routes), "reject", str(SMTP["forged_bounce"]),
                               (*reasons, "the bounce token was not issued by this gateway"), token)
    if not routes:
        return InboundDecision((), "reject", str(SMTP["no_route"]), tuple(reasons))
    if routes[0].key == DIRECT_WRITE and config.catchall_direct_write == "reject":
        return InboundDecision(tuple(routes), "reject", str(SMTP["catchall_direct"]),
                               (*reasons, "catchall_direct_write: reject"))
    duplicate = _duplicate_of(message, known_outbound, already_received)
    if duplicate:
        return InboundDecision(tuple(routes), "drop", None, (*reasons, f"duplicate of {duplicate}: dropped"),
                               token)
    looping = looping_routes(config, message.sender, routes, recent_count)
    if looping:
        # Odoo ignores the whole message when any one of its routes loops
        reasons = [*reasons, *(f"loop: {message.sender} reached {config.loop.threshold} messages on "
                               f"{r.label} within {config.loop.minutes} minutes" for r in looping)]
        action = config.loop.action
        reply = {"reject": str(SMTP["loop_reject"]), "defer": str(SMTP["loop_defer"])}.get(action)
        return InboundDecision(tuple(routes), action, reply, tuple(reasons))
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


def on_alias_domain(config: Config, address: str) -> bool:
    domain = normalize(address).rpartition("@")[2]
    return domain in config.accepted_domain_set


def recipient_verdict(config: Config, address: str, token_valid: Callable[[str], bool]) -> str:
    """What the policy service says of one RCPT: `outside`, `accept`, `no_such_alias`, `forged_bounce`.

    Only addresses on the alias domains (and the allowed alias domains) are judged; with a
    fallback target every address there is accepted, since Odoo would route it to the fallback.
    """
    if not on_alias_domain(config, address):
        return "outside"
    token = bounce_token_of(config, address)
    if token is not None:
        return "accept" if token_valid(token) else "forged_bounce"
    if is_catchall(config, address) or is_plain_bounce(config, address) or alias_for_address(config, address):
        return "accept"
    return "accept" if config.fallback_target else "no_such_alias"


ODOO_TRANSPORT = "mailgate-odoo"  # the pipe(8) service running `mailgate deliver --alias ${nexthop}`


def target_transport(target: str, name: str) -> str:
    """`odoo:MODEL` (or `odoo`) goes to Odoo through the pipe; anything else is a Postfix transport."""
    if target == "odoo" or target.startswith("odoo:"):
        return f"{ODOO_TRANSPORT}:{name}"
    return target


def delivery_transport(config: Config, address: str) -> str | None:
    """transport_maps for accepted inbound mail: where Postfix delivers one recipient.

    The policy service has already refused what has no route, so every address on an alias
    domain has an answer here; None (NOTFOUND) leaves other domains to Postfix.
    """
    if not on_alias_domain(config, address):
        return None
    if bounce_token_of(config, address) is not None or is_plain_bounce(config, address):
        return target_transport("odoo", config.bounce_alias)
    if is_catchall(config, address):
        return target_transport("odoo", config.catchall_alias)
    alias = alias_for_address(config, address)
    if alias is not None:
        return target_transport(alias.target, alias.name)
    if config.fallback_target:
        return target_transport(config.fallback_target, "fallback")
    return None


def takes_inbound_role(config: Config, listener: str | None, envelope_sender: str, recipients: list[str]) -> bool:
    """Mail on an inbound listener, or a delivery report (null sender) to our bounce addresses.

    The second case is Postfix's own reports on mail it could not deliver upstream: they are
    made inside Postfix (non_smtpd_milters, `internal_mail_filter_classes = bounce`) and reach
    the milter on the submission side, but they are inbound reports all the same.
    """
    if listener in config.inbound_listeners:
        return True
    return (not envelope_sender and bool(recipients)
            and all(bounce_token_of(config, r) is not None or is_plain_bounce(config, r) for r in recipients))
