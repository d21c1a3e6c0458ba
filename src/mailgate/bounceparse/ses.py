"""Amazon SES notifications sent by mail (an SNS topic subscribed by email): no DSN part, but a
JSON body that says everything a DSN would, per recipient. A `Bounce` notification's
`bouncedRecipients` are read like DSN groups (status, action, diagnostic code); a `Complaint` or
`Delivery` notification is no failure. Sendmail-style line splitting ("!" and a newline with a
space, for lines over its limit) is undone before the JSON is read."""

from __future__ import annotations

import json
import re
from email.message import Message
from typing import Any

from mailgate.bounceparse import phrases as bt
from mailgate.bounceparse.judge import judged
from mailgate.bounceparse.mime import (
    MAX_TEXT,
    clean,
    clean_address,
    decoded_text,
    is_ours,
    is_text,
    message_id,
    report_parts,
)
from mailgate.bounceparse.report import BouncedRecipient, BounceReport

_START_RE = re.compile(r"\{\s*\"(?:notificationType|eventType|Type)\"")
_SPLIT_LINE_RE = re.compile(r"!\r?\n ")
NOT_FAILURES = ("complaint", "delivery")


def from_ses(msg: Message, original_id: str | None, bounce_alias: str) -> BounceReport | None:
    """The report of an SES notification, or None when the message carries none."""
    for part in report_parts(msg):
        if not is_text(part):
            continue
        notice = _notification(decoded_text(part)[:MAX_TEXT])
        if notice is None:
            continue
        kind = str(notice.get("notificationType") or notice.get("eventType") or "").lower()
        if kind in NOT_FAILURES:
            return BounceReport(False, "none", (), None, original_id)
        found = notice.get("bounce")
        bounce: dict[str, Any] = found if isinstance(found, dict) else {}
        failed: dict[str, BouncedRecipient] = {}
        for entry in bounce.get("bouncedRecipients") or []:
            recipient = _recipient(entry)
            if recipient is not None and not is_ours(recipient.address, bounce_alias):
                failed.setdefault(recipient.address, recipient)
        if not failed:
            return None
        reporting = _typed(bounce.get("reportingMTA"))
        return BounceReport(True, "ses", tuple(failed.values()), clean(reporting), original_id or _sent_id(notice))
    return None


def _sent_id(notice: dict[str, Any]) -> str | None:
    """The Message-ID of the message that bounced, as SES quotes its headers."""
    mail = notice.get("mail")
    common = mail.get("commonHeaders") if isinstance(mail, dict) else None
    found = common.get("messageId") if isinstance(common, dict) else None
    return message_id(found) if isinstance(found, str) else None


def _notification(text: str) -> dict[str, Any] | None:
    """The SES notification in a text, unwrapped from its SNS envelope when it has one."""
    text = _SPLIT_LINE_RE.sub("", text)
    found = _START_RE.search(text)
    if not found:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[found.start():])
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("Message"), str):  # the SNS envelope
        return _notification(value["Message"])
    return value if isinstance(value, dict) else None


def _recipient(entry: object) -> BouncedRecipient | None:
    """One of `bouncedRecipients`: SES has given up on it, transient or not (a transient
    bounce is a soft one, which its 4.x.x status says)."""
    if not isinstance(entry, dict):
        return None
    address = clean_address(str(entry.get("emailAddress") or ""))
    if address is None:
        return None
    diagnostic = bt.one_line(_typed(entry.get("diagnosticCode")))
    status = bt.find_status(str(entry.get("status") or "")) or bt.find_status(diagnostic)
    return judged(address, status, "failed", diagnostic, None)


def _typed(value: object) -> str | None:
    """`smtp; 550 ...` -> `550 ...`."""
    text = str(value or "").strip()
    kind, semicolon, rest = text.partition(";")
    return (rest.strip() if semicolon and " " not in kind.strip() else text) or None
