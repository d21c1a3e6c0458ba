"""Who the returned message was addressed to, for a report that names no failed recipient in
its own words ("Message could not be delivered to mobile.", a Google Groups refusal): the To and
Cc of the attached original, of its returned headers, or of the header lines quoted after the
report's "original message" line. Used only when they name one address, since a report on a
message to several cannot say which of them failed, and never for a message that came through a
mailing list (its To names the list, not the member whose address failed)."""

from __future__ import annotations

import re
from email.message import Message

from mailgate.bounceparse import phrases as bt
from mailgate.bounceparse.mime import ADDRESS_RE, MAX_TEXT, clean_address, header_text, returned_parts

_QUOTED_TO_RE = re.compile(r"^[ \t>]*(?:to|cc)[ \t]*:[ \t]*(.+)$", re.I | re.M)
_LIST_HEADERS = ("list-id", "list-post", "x-beenthere", "x-mailman-version", "mailing-list")
_QUOTED_LIST_RE = re.compile(r"^[ \t>]*(?:" + "|".join(_LIST_HEADERS) + r")[ \t]*:", re.I | re.M)


def returned_recipient(msg: Message) -> str | None:
    """The one address the returned message was sent to, or None (none, or several)."""
    found: list[str] = []
    for headers, text in returned_parts(msg):
        if text is not None:
            quoted = _quoted(text[:MAX_TEXT])
            if quoted is None:
                return None
            found += quoted
        if headers is not None and any(headers.get(name) is not None for name in _LIST_HEADERS):
            return None
        if headers is not None:
            for name in ("to", "cc"):
                found += [a for v in headers.get_all(name) or [] for a in _addresses(header_text(v))]
    unique = list(dict.fromkeys(found))
    return unique[0] if len(unique) == 1 else None


def _quoted(text: str) -> list[str] | None:
    """To and Cc lines of the header block quoted after the "original message" line; None for
    a message that came through a list."""
    marker = bt.ORIGINAL_MARKER_RE.search(text)
    if not marker:
        return []
    block = re.split(r"\n[ \t]*\n", text[marker.end():].lstrip("\r\n-= \t.:"), maxsplit=1)[0]
    if _QUOTED_LIST_RE.search(block):
        return None
    return [a for line in _QUOTED_TO_RE.findall(block) for a in _addresses(line)]


def _addresses(value: str) -> list[str]:
    return [a for a in (clean_address(m) for m in ADDRESS_RE.findall(value)) if a]
