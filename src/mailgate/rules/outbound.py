"""The outbound decision (docs/rules.md O1-O7): server, header From and envelope sender.

Pure functions over the configuration: the milter, the lookup service and `mailgate explain`
all call `decide_outbound` or `route_sender`, so the three can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mailgate.config import AliasDomain, Config, Server
from mailgate.rules.addresses import (
    Mailbox,
    domain_of,
    format_mailbox,
    is_valid_address,
    is_valid_domain,
    normalize,
    parse_mailboxes,
    readable_addresses,
)
from mailgate.rules.filters import FromFilter
from mailgate.rules.replies import SMTP, SmtpReply

Step = Literal["mass", "from-address", "from-domain", "notification-address", "notification-domain", "no-filter",
               "fallback-first", "no-servers"]
# Why a server was chosen: the log's `reason=` and explain's first reason.
STEP_TEXT: dict[Step, str] = {
    "mass": "mass mail goes to the dedicated mass server",
    "from-address": "a server's from_filter lists the From address",
    "from-domain": "a server's from_filter lists the From domain",
    "notification-address": "a server's from_filter lists the notification address",
    "notification-domain": "a server's from_filter lists the notification address's domain",
    "no-filter": "no filter matches the From: first server without a from_filter",
    "fallback-first": "no server fits the From: first server used anyway",
    "no-servers": "no upstream server configured: Postfix's default route",
}

DomainReason = Literal["envelope", "author", "first", "none"]
# Why a message belongs to its alias domain (O1): explain's reason and the log's `domain_by=`.
DOMAIN_TEXT: dict[DomainReason, str] = {
    "envelope": "the envelope sender is on it",
    "author": "the author's address is on it",
    "first": "the first alias domain (neither the envelope sender nor the author is on one)",
    "none": "no alias domain is configured",
}


@dataclass(frozen=True)
class OutboundRequest:
    """What the milter (or `explain`) knows about one outgoing message."""

    header_from: str | None                 # the first From header; None: the message has none
    envelope_sender: str | None = None
    mass: bool = False
    more_froms: tuple[str, ...] = ()        # the From headers after the first (O5: one is kept)


@dataclass(frozen=True)
class FromReading:
    """The From headers of a message as O5 reads them.

    `boxes` are the mailboxes of a well-formed From (one header, parsed), else None. `malformed`
    says why not: several From headers, or a value that cannot be parsed. `addresses` is every
    address that can be read out of all the From headers: the parsed ones, and for a malformed
    From also every `local@domain` found anywhere in the raw and decoded text.
    """

    boxes: list[Mailbox] | None
    addresses: tuple[str, ...]
    malformed: str | None
    name: str              # the display name a rewritten From keeps (O5)


def read_from(header_from: str | None, more_froms: tuple[str, ...] = ()) -> FromReading:
    """O5: one From header of parsed mailboxes is well formed; anything else is read defensively."""
    values = [header_from, *more_froms] if header_from is not None else list(more_froms)
    parsed = [_well_formed(parse_mailboxes(value)) for value in values]
    if len(values) <= 1 and all(boxes is not None for boxes in parsed):
        boxes = parsed[0] if parsed else []
        assert boxes is not None
        first = boxes[0] if boxes else None
        return FromReading(boxes, tuple(b.address for b in boxes), None,
                           (first.name or first.local_part) if first else "")
    addresses: dict[str, None] = {}
    for value, boxes in zip(values, parsed, strict=True):
        addresses.update(dict.fromkeys(b.address for b in boxes or ()))
        if boxes is None:
            addresses.update(dict.fromkeys(readable_addresses(value)))
    why = "several From headers" if len(values) > 1 else "the From cannot be parsed"
    first_boxes = parsed[0]
    if first_boxes:
        name = first_boxes[0].name or first_boxes[0].local_part
    else:
        plausible = [a for a in addresses if is_valid_address(a)] or [a for a in addresses if a.rpartition("@")[0]]
        name = plausible[0].rpartition("@")[0] if plausible else ""
    return FromReading(None, tuple(addresses), why, name)


def _well_formed(boxes: list[Mailbox] | None) -> list[Mailbox] | None:
    """The mailboxes when every domain is a host name or a literal: the lenient fallback parser
    takes `=?utf-8?q?evil@example.com=0D=0A?=` for an address, domain `example.com=0D=0A?=`. An
    underscore counts as a letter (`jane@my_company.com`): DNS refuses it, but Odoo stores and
    sends such an author as written, and it cannot smuggle a header."""
    if boxes is None:
        return None
    for box in boxes:
        host = box.domain.replace("_", "u")
        if not (is_valid_domain(host) or (box.domain.startswith("[") and box.domain.endswith("]"))):
            return None
    return boxes


@dataclass(frozen=True)
class OutboundDecision:
    server: Server | None
    step: Step
    header_from: str | None          # the From header to send (the original when kept)
    original_from: str | None
    rewritten: bool                  # header_from replaces the first From (or is added: there was none)
    envelope_from: str               # plain MAIL FROM, before any token
    bounce_address: str | None       # the bounce address of this message (O1)
    envelope_is_bounce: bool         # the envelope is the bounce address: mailgate tokenises it
    reasons: tuple[str, ...] = field(default=())
    warning: str | None = None
    new_from: Mailbox | None = None  # the From written when rewritten: the milter folds it (O5)
    removed_froms: int = 0           # From headers after the first that are deleted (O5)
    malformed: str | None = None     # why the From was not one well-formed header
    reply: SmtpReply | None = None   # the message is refused (O5: a malformed From it cannot send)
    alias_domain: AliasDomain | None = None   # the domain whose notification and bounce addresses it uses (O1)
    domain_reason: DomainReason = "none"

    @property
    def server_name(self) -> str | None:
        return self.server.name if self.server else None


def message_domain(config: Config, envelope_sender: str | None,
                   author: str | None) -> tuple[AliasDomain | None, DomainReason]:
    """O1: the alias domain a message belongs to. Odoo 17+ sends each record's mail with its
    company's domain, putting that domain's bounce address in MAIL FROM: the envelope sender's
    domain names it; else the author's own domain when it is an alias domain; else the first."""
    candidates: tuple[tuple[str | None, DomainReason], ...] = ((envelope_sender, "envelope"), (author, "author"))
    for address, reason in candidates:
        domain = config.domain_named(domain_of(address)) if address else None
        if domain is not None:
            return domain, reason
    if config.alias_domains:
        return config.alias_domains[0], "first"
    return None, "none"


def notification_address(config: Config, domain: AliasDomain | None) -> str | None:
    """O1: the domain's default sender; with no alias domain, `default_from` when it is a full address."""
    if domain is not None:
        return domain.notification_address
    default_from = (config.default_from or "").strip()
    return default_from if "@" in default_from else None


def is_alias_domain_address(config: Config, address: str | None) -> bool:
    domain = domain_of(address)
    return bool(domain) and domain in config.alias_domain_set


def bounce_address(config: Config, envelope_sender: str | None, domain: AliasDomain | None) -> str | None:
    """O1: the client's own envelope when it sits on an alias domain, else the message's
    domain's bounce address."""
    if envelope_sender and is_alias_domain_address(config, envelope_sender):
        return envelope_sender
    return domain.bounce_address if domain is not None else None


def tokenised_address(config: Config, bounce: str, token: str) -> str:
    """T1: `<bounce_alias>+TOKEN@domain` for a bounce address on an alias domain, with that
    domain's own bounce alias."""
    domain = config.domain_named(domain_of(bounce))
    alias = domain.bounce_alias if domain is not None else config.bounce_aliases[0]
    return f"{alias}+{token}@{domain_of(bounce)}"


def _first_listing(servers: tuple[Server, ...], address: str) -> tuple[Server | None, Literal["address", "domain", ""]]:
    """The first server listing the address, else the first listing its domain."""
    for server in servers:
        if server.from_filter.lists_address(address):
            return server, "address"
    domain = domain_of(address)
    for server in servers:
        if server.from_filter.lists_domain(domain):
            return server, "domain"
    return None, ""


def choose_server(config: Config, from_boxes: list[Mailbox] | None,
                  notification: str | None) -> tuple[Server | None, bool, Step]:
    """O3: (server, send as the notification address?, step) in Odoo's order.

    `notification` is the notification address of the message's alias domain. `documented`
    selection swaps steps 2 and 3, as the seed document words the rule.
    """
    servers = config.active_servers
    if from_boxes and len(from_boxes) == 1:
        server, kind = _first_listing(servers, from_boxes[0].address)
        if server:
            return server, False, "from-address" if kind == "address" else "from-domain"

    def by_notification() -> tuple[Server | None, bool, Step] | None:
        if notification:
            server, kind = _first_listing(servers, notification)
            if server:
                return server, True, "notification-address" if kind == "address" else "notification-domain"
        return None

    def unfiltered() -> tuple[Server | None, bool, Step] | None:
        for server in servers:
            if server.from_filter.is_empty:
                return server, notification is not None, "no-filter"
        return None

    steps = (by_notification, unfiltered) if config.server_selection == "odoo" else (unfiltered, by_notification)
    for step in steps:
        found = step()
        if found:
            return found
    if servers:
        return servers[0], notification is not None, "fallback-first"
    keep = from_boxes is not None and len(from_boxes) == 1 and config.default_from_filter.matches(from_boxes[0].address)
    return None, (not keep and notification is not None), "no-servers"


def decide_outbound(config: Config, request: OutboundRequest) -> OutboundDecision:
    """The whole outbound decision for one message."""
    reading = read_from(request.header_from, request.more_froms)
    boxes = reading.boxes
    domain, domain_reason = message_domain(config, request.envelope_sender, boxes[0].address if boxes else None)
    notification = notification_address(config, domain)
    reasons: list[str] = []
    warning = None
    mass_server = config.mass_server if request.mass else None
    server: Server | None
    step: Step
    if mass_server:
        server, as_notification, step = mass_server, False, "mass"
    else:
        server, as_notification, step = choose_server(config, boxes, notification)
    reasons.append(STEP_TEXT[step] + (f" ({server.name})" if server else ""))
    if domain is not None:
        reasons.append(f"alias domain {domain.name}: {DOMAIN_TEXT[domain_reason]}")
    if step == "fallback-first":
        assert server is not None  # choose_server only falls back to an existing first server
        warning = f"no mail server matches the from_filter, using {server.name} as fallback"
    if request.mass and not mass_server:
        reasons.append("mass mail without an active mass server follows the normal order")

    server_filter = server.from_filter if server else config.default_from_filter
    header_from = request.header_from
    new_from: Mailbox | None = None
    reply: SmtpReply | None = None
    if reading.malformed:
        foreign = [a for a in reading.addresses if not server_filter.matches(a)]
        reasons.append(f"From malformed ({reading.malformed}): "
                       + (f"holds {', '.join(foreign)}, which the server may not send for" if foreign
                          else "every address in it may be sent for"))
        if foreign and (config.malformed_from == "reject" or not notification):
            reply = SMTP["malformed_from"]
            reasons.append(f"refused with {reply} (" + ("malformed_from is reject" if notification
                                                        else "no notification address to replace it with") + ")")
        elif (foreign or as_notification) and notification:
            new_from = Mailbox(reading.name, notification)
    elif as_notification and notification:
        if not boxes:
            new_from = Mailbox("", notification)
            reasons.append("no From address: the notification address becomes the From")
        elif not (len(boxes) == 1 and normalize(boxes[0].address) == normalize(notification)):
            new_from = Mailbox(reading.name, notification)
    if new_from is not None:
        header_from = format_mailbox(new_from.name, new_from.address)
        if boxes:
            reasons.append(f"From rewritten to the notification address {notification}")
        elif reading.malformed:
            reasons.append(f"From replaced by the notification address {notification}")
    elif reply is None:
        reasons.append("From kept")
    removed = len(request.more_froms) if reply is None else 0
    if removed:
        reasons.append(f"{removed} more From header{'s' if removed > 1 else ''} removed: the message leaves with one")
    rewritten = new_from is not None

    bounce = bounce_address(config, request.envelope_sender, domain)
    envelope, is_bounce = _envelope(config, server, bounce, boxes, header_from, rewritten,
                                    notification, request.envelope_sender)
    reasons.append("envelope sender is the bounce address" if is_bounce
                   else "envelope sender is the From address (the bounce address is outside the server's filter)")
    return OutboundDecision(server, step, header_from, request.header_from, rewritten, envelope,
                            bounce, is_bounce, tuple(reasons), warning, new_from, removed,
                            reading.malformed, reply, domain, domain_reason)


def _envelope(config: Config, server: Server | None, bounce: str | None, boxes: list[Mailbox] | None,
              header_from: str | None, rewritten: bool, notification: str | None,
              envelope_sender: str | None) -> tuple[str, bool]:
    """O6: the bounce address when the server's filter allows it, else the header From's address.

    Without a bounce address Odoo falls back to the original From as its bounce address; without
    any usable From the client's own envelope sender is kept.
    """
    server_filter: FromFilter = server.from_filter if server else config.default_from_filter
    original = boxes[-1].address if boxes else None
    candidate = bounce or original
    if candidate and server_filter.matches(candidate):
        return candidate, candidate == bounce
    if rewritten and notification:
        return notification, False
    if original:
        return original, False
    return envelope_sender or "", False


def route_sender(config: Config, sender: str) -> Server | None:
    """O7 without a token: run the server choice with the envelope sender as the From."""
    domain, _ = message_domain(config, sender, sender)
    return choose_server(config, [Mailbox("", sender)], notification_address(config, domain))[0]


def is_mass_mail(config: Config, listener: str | None, sasl_user: str | None,
                 headers: list[tuple[str, str]]) -> bool:
    """O4's signs: the listener, the SASL user, a configured header, or `X-Mailgate-Stream: mass`."""
    signs = config.mass_mail
    if listener and listener in signs.listeners:
        return True
    if sasl_user and sasl_user in signs.sasl_users:
        return True
    for name, value in headers:
        name, value = name.strip().lower(), value.strip().lower()
        if name == "x-mailgate-stream":
            if value == "mass":
                return True
            continue
        for wanted_name, wanted_value in signs.headers:
            if name == wanted_name and (wanted_value is None or value == wanted_value):
                return True
    return False
