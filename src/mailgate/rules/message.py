"""What Odoo reads of an incoming message (docs/rules.md I1): its address sets, sender,
Message-ID and thread references, and the route value the inbound rules hand on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from mailgate.rules.addresses import normalize, parse_mailboxes

_MSGID = re.compile(r"<[^<>\s]+>")


_FOLDED_MSGID = re.compile(r"<[^<>]+>")  # Odoo's unfold_references: whitespace inside <...> is dropped


_FOLDING = re.compile(r"[\r\n\t ]+")
# Odoo's tracking Message-ID: <random.timestamp-openerp-RES_ID-MODEL@host>


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


RouteKind = Literal["bounce", "reply", "catchall", "alias", "fallback"]


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    key: str                   # what the loop guard counts by: alias target, thread id, ...
    label: str                 # "alias:sales", "reply:<id>", "catchall", "bounce", "fallback:<t>"
    target: str | None = None  # where Postfix delivers (alias target, fallback target)
