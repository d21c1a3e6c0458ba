"""The entry points: the order of trust (see the package docstring) applied to one message."""

from __future__ import annotations

import email
import re
from dataclasses import replace
from email.message import Message
from email.parser import BytesHeaderParser

from mailgate.bounceparse.dsn import from_dsn
from mailgate.bounceparse.mime import (
    capped,
    clean,
    header_text,
    message_id,
    original_message_id,
    with_boundary_repaired,
)
from mailgate.bounceparse.report import NOT_A_BOUNCE, BounceReport
from mailgate.bounceparse.ses import from_ses
from mailgate.bounceparse.text import from_text, is_autoreply, report_type

_TOKEN_HEADERS = ("delivered-to", "x-original-to", "envelope-to", "to", "cc")


def parse_bounce(raw: bytes, *, bounce_alias: str = "bounce") -> BounceReport:
    """Read a delivery report. Never raises: unreadable input is "none", not an error.

    `bounce_alias` keeps our own `bounce+TOKEN@` address out of the failed recipients, where a
    heuristic could pick it up from the quoted original.
    """
    try:
        msg = with_boundary_repaired(email.message_from_bytes(capped(raw)))
    except Exception:  # the parser is lenient, but hostile input must not reach Postfix as a crash
        return NOT_A_BOUNCE
    try:
        return _parse(msg, bounce_alias)
    except Exception:  # last resort: what was read is lost, the message is still handled
        return BounceReport(False, "none", (), None, _safe(lambda: original_message_id(msg)))


def find_token(raw: bytes, bounce_alias: str = "bounce") -> str | None:
    """The TOKEN of the first `<bounce_alias>+TOKEN@domain` among the report's addressees.

    The envelope headers (Delivered-To, X-Original-To, Envelope-To) come before To and Cc: they
    are written by our own MTA from the envelope recipient, which is the address the remote
    server bounced to, while To is whatever the remote server chose to write. The local part is
    matched case-insensitively and the token lower-cased, as `rules.classify.bounce_token_of` does,
    because some servers fold the case of the address they bounce to.
    """
    try:
        if not bounce_alias:
            return None
        headers = BytesHeaderParser().parsebytes(capped(raw), headersonly=True)
        pattern = re.compile(r"(?<![\w.+=-])" + re.escape(bounce_alias)
                             + r"\+([^\s@<>\"'(),;:\[\]\\]+)@[a-z0-9-]+(?:\.[a-z0-9-]+)+", re.I)
        for name in _TOKEN_HEADERS:
            for value in headers.get_all(name) or []:
                found = pattern.search(header_text(value))
                if found:
                    return clean(found.group(1)).lower()
    except Exception:  # never raises: a token we cannot read is a token we do not have
        return None
    return None


def _parse(msg: Message, bounce_alias: str) -> BounceReport:
    original_id = _safe(lambda: original_message_id(msg))
    report = _safe(lambda: from_dsn(msg, original_id, bounce_alias))
    if report is None:
        report = _safe(lambda: from_ses(msg, original_id, bounce_alias))
    if report is None and is_autoreply(msg):
        return BounceReport(False, "autoreply", (), None, original_id)
    if report is None and report_type(msg) == "feedback-report":
        return BounceReport(False, "none", (), None, original_id)
    if report is None:
        report = from_text(msg, original_id, bounce_alias)
    if report.original_message_id is None and report.kind in ("dsn", "ses", "flufl", "unnamed", "delay"):
        # Reports that return no copy often still answer the message: Gmail, Exchange.
        report = replace(report, original_message_id=message_id(msg.get("in-reply-to")))
    return report


def _safe(read):
    """Run one independent reading step; a failure there loses only what that step reads."""
    try:
        return read()
    except Exception:  # each step is optional: the others still produce a report
        return None
