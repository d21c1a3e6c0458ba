"""What a report's own words say about one address: the lines around it, the server named there.

Both paths read them: the free-text path for every recipient, the DSN path for a group that
carries no Diagnostic-Code.
"""

from __future__ import annotations

import re

from mailgate.bounceparse import phrases as bt
from mailgate.bounceparse.mime import ADDRESS_RE


def paragraph_about(address: str, text: str, others: tuple[str, ...] | list[str] = ()) -> str | None:
    """The lines about `address`: from its first mention until the next recipient, a blank
    line once a reply code has been read (Gmail's old reports put it two paragraphs down), or
    twelve lines; the bare address line itself left out."""
    found = address_pattern(address).search(text)
    if not found:
        return None
    start = text.rfind("\n", 0, found.start()) + 1
    lines: list[str] = []
    for number, line in enumerate(text[start:start + 8000].splitlines()[:40]):
        if number and any(address_pattern(o).search(line) for o in others) and not _mentions(address, line):
            break
        if not line.strip():
            if len(lines) >= 2 and _has_code("\n".join(lines)):
                break
            continue
        bare = ADDRESS_RE.sub("", line).strip(" \t<>:;,.()[]*-")
        if number == 0 and not bare:
            continue
        lines.append(line)
        if len(lines) >= 12:
            break
    return bt.one_line("\n".join(lines))


def coded_paragraph(text: str) -> str | None:
    """The first paragraph carrying a reply code: the reason of a report's only recipient when
    its text names that recipient by a bare local part (Exim) or not at all."""
    for block in re.split(r"\n[ \t]*\n", text[:bt.MAX_TEXT]):
        if _has_code(block):
            return bt.one_line(block)
    return None


def _has_code(text: str) -> bool:
    return bool(bt.find_status(text) or bt.find_smtp_code(text))


def _mentions(address: str, line: str) -> bool:
    return bool(address_pattern(address).search(line))


def address_pattern(address: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w.+-])" + re.escape(address) + r"(?![\w-]|\.[\w-])", re.I)


def remote_mta(reason: str | None) -> str | None:
    for pattern in bt.REMOTE_MTA_RES:
        found = pattern.search(reason or "")
        if found:
            return found.group(1).lower()
    return None
