"""Reports without a DSN part (kind "flufl"), and the auto-replies screened out before them:
flufl.bounce's detectors first, then `bouncetext.RECIPIENT_LINE_RES`, each only for mail that
looks like a report."""

from __future__ import annotations

import email
import logging
import re
from collections.abc import Callable
from email.message import Message

from mailgate.bounceparse import phrases as bt
from mailgate.bounceparse.judge import judged
from mailgate.bounceparse.mime import (
    ADDRESS_RE,
    MAX_INPUT,
    ORIGINAL_TYPES,
    attached_headers,
    clean,
    clean_address,
    decoded_text,
    header_text,
    is_ours,
    is_text,
    notification_text,
    report_parts,
)
from mailgate.bounceparse.paragraphs import address_pattern, coded_paragraph, paragraph_about, remote_mta
from mailgate.bounceparse.report import BouncedRecipient, BounceReport
from mailgate.bounceparse.returned import returned_recipient

all_failures: Callable[[Message], tuple[frozenset[bytes], frozenset[bytes]]] | None
try:
    from flufl.bounce import all_failures as _flufl_all_failures
    all_failures = _flufl_all_failures
except ImportError:  # a dependency; without it only our own patterns read non-DSN reports
    all_failures = None

logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())

# Header lines of a returned message quoted as text. Delivered-To and its kin name where the
# message went on earlier hops (a list, a forwarder), never the address that failed.
_QUOTED_HEADER_RE = re.compile(
    r"^[ \t>]*(?:message-id|references|in-reply-to|from|reply-to|sender|return-path|received|"
    r"dkim-signature|list-[\w-]+|delivered-to|x-original-to|envelope-to)[ \t]*:", re.I)


def from_text(msg: Message, original_id: str | None, bounce_alias: str) -> BounceReport:
    """flufl.bounce's detectors, then our own recipient patterns for reports flufl does not know.

    Only for mail that looks like a report (a daemon sender, Exim's X-Failed-Recipients, or a
    report subject or type with failure wording): some flufl detectors match any comma-separated
    address list, which a person writing to the bounce address would trip. Our own patterns
    also need failure wording, even from a daemon.
    """
    temporary, permanent = _flufl_failures(msg)
    text = notification_text(msg)
    if not (msg.get("x-failed-recipients") or _looks_like_report(msg, text)):
        return BounceReport(False, "none", (), None, original_id)
    exclude = _not_recipients(msg)
    addressed = returned_recipient(msg)
    failed = [a for a in _usable(sorted(permanent), bounce_alias, addressed) if a not in exclude]
    delayed = [a for a in _usable(sorted(temporary), bounce_alias, addressed) if a not in failed and a not in exclude]
    if not failed and not delayed and _says_failed(msg, text):
        failed = [a for a in _usable(_named_in_text(text), bounce_alias, addressed) if a not in exclude]
    if not failed and not delayed and _says_failed(msg, text):
        named = _header_named(msg) or [returned_recipient(msg) or ""]
        failed = _usable([a.encode() for a in named], bounce_alias, addressed)
    if not failed and not delayed:
        return _unnamed(msg, text, original_id)
    intro = _intro(text, failed + delayed)
    if failed and not msg.get("x-failed-recipients") and _delay_only(msg, intro):
        delayed, failed = failed + delayed, []
    recipients = tuple(_text_recipient(a, text, intro, "failed", failed + delayed) for a in failed)
    waiting = tuple(_text_recipient(a, text, intro, "delayed", failed + delayed) for a in delayed)
    reporting_mta = next((m.group(1) for r in bt.REPORTING_MTA_RES for m in [r.search(intro)] if m), None)
    kind = "flufl" if recipients else "delay"
    return BounceReport(bool(recipients), kind, recipients, clean(reporting_mta), original_id, waiting)


def _header_named(msg: Message) -> list[str]:
    """Exim's X-Failed-Recipients: the failed addresses when its text names only a local part
    or a pipe ("save to xxxx")."""
    return [a for v in msg.get_all("x-failed-recipients") or [] for a in ADDRESS_RE.findall(header_text(v))]


def _unnamed(msg: Message, text: str, original_id: str | None) -> BounceReport:
    """A failure report that names no recipient we can read is still a bounce (kind
    "unnamed", nobody recorded): sent by a mailer daemon or typed as a delivery report, saying
    something failed and not only delayed. Anything less is not a report."""
    typed = report_type(msg) == "delivery-status" or bool(msg.get("x-failed-recipients"))
    if ((typed or bt.is_daemon_sender(header_text(msg.get("from", "")))) and _says_failed(msg, text)
            and not _delay_only(msg, text[:2000])):
        return BounceReport(True, "unnamed", (), None, original_id)
    return BounceReport(False, "none", (), None, original_id)


def _flufl_failures(msg: Message) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """flufl.bounce's (temporary, permanent) sets. Its detectors call str methods on headers,
    which the email package returns as Header objects when they hold raw 8-bit bytes; such a
    message is retried once with those bytes replaced, then read as "found nothing"."""
    if all_failures is None:
        return frozenset(), frozenset()
    try:
        return all_failures(msg)
    except Exception:  # flufl re-raises whatever a detector raised
        pass
    try:
        return all_failures(email.message_from_string(msg.as_bytes().decode("utf-8", "replace")))
    except Exception:  # still unreadable for flufl: our own patterns may yet read it
        return frozenset(), frozenset()


def _looks_like_report(msg: Message, text: str) -> bool:
    """Sent by a mailer daemon, or titled or typed like a report and saying something failed."""
    if bt.is_daemon_sender(header_text(msg.get("from", ""))) or bt.REPORT_BODY_RE.search(text):
        return True
    return _says_failed(msg, text) and (bt.BOUNCE_SUBJECT_RE.search(header_text(msg.get("subject", "")))
                                        is not None or msg.get_content_type() == "multipart/report")


def _says_failed(msg: Message, text: str) -> bool:
    return bool(bt.FAILURE_RE.search(header_text(msg.get("subject", "")) + "\n" + text))


def _named_in_text(text: str) -> list[bytes]:
    found = []
    for pattern in bt.RECIPIENT_LINE_RES:
        found += [m.group("a").encode("utf-8", "replace") for m in pattern.finditer(text)]
    return found


def _not_recipients(msg: Message) -> set[str]:
    """Address-shaped strings a heuristic may pick up that are never the failed recipient: the
    report's own sender, Message-IDs, and addresses quoted only in header lines of the returned
    message (its From, Reply-To...) and nowhere in the report's own words."""
    excluded: set[str] = set()
    for name in ("from", "reply-to", "sender", "return-path"):
        for value in msg.get_all(name) or []:
            excluded.update(a.lower() for a in ADDRESS_RE.findall(header_text(value)))
    header_only: set[str] = set()
    elsewhere: set[str] = set()
    for part in report_parts(msg):
        if part.get_content_type() in ORIGINAL_TYPES:
            headers = attached_headers(part)
            for name in ("message-id", "references", "in-reply-to"):
                for value in (headers.get_all(name) if headers is not None else None) or []:
                    excluded.update(a.lower() for a in ADDRESS_RE.findall(header_text(value)))
        elif is_text(part):
            for line in decoded_text(part)[:MAX_INPUT].splitlines():
                found = {a.lower() for a in ADDRESS_RE.findall(line)}
                if found:
                    (header_only if _QUOTED_HEADER_RE.match(line) else elsewhere).update(found)
    return excluded | (header_only - elsewhere)


def _usable(found: list[bytes], bounce_alias: str, addressed: str | None = None) -> list[str]:
    """Candidate addresses that are plain addresses, not ours, not a daemon's unless the
    returned message was sent to it (`addressed`: mail to a postmaster bounces too); first
    seen first."""
    addresses = []
    for item in found:
        text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
        address = clean_address(text)
        if address is None or address != text.strip().strip("<>").strip().lower():
            continue  # flufl's looser detectors return whole phrases, not addresses
        daemon = bt.is_daemon_address(address) and address != addressed
        if not is_ours(address, bounce_alias) and not daemon and address not in addresses:
            addresses.append(address)
    return addresses


def _text_recipient(address: str, text: str, intro: str, action: str, everyone: list[str]) -> BouncedRecipient:
    reason = paragraph_about(address, text, [a for a in everyone if a != address])
    if reason is None and len(everyone) == 1:
        reason = coded_paragraph(text)
    return judged(address, bt.find_status(reason), action, reason, remote_mta(reason),
                  context=intro if action == "failed" else None)


def _delay_only(msg: Message, intro: str) -> bool:
    return bool(bt.DELAY_RE.search(header_text(msg.get("subject", "")) + "\n" + intro))


def _intro(text: str, addresses: list[str]) -> str:
    """The report text before the first failed address: where MTAs say "permanent error"."""
    positions = [m.start() for a in addresses for m in [address_pattern(a).search(text)] if m]
    return text[:min(positions)] if positions else text[:2000]



# --- auto-replies ------------------------------------------------------------------------------

def is_autoreply(msg: Message) -> bool:
    """An RFC 3834 auto-response (vacation, out of office), unless it plainly is a failure report.

    A delivery report may carry `Auto-Submitted: auto-replied` too (Postfix and Exim add it), so
    that header alone decides only for mail that is neither from a mailer daemon nor titled like
    a report; the vendor headers and the usual subjects decide on their own.
    """
    if bt.is_daemon_sender(header_text(msg.get("from", ""))) or msg.get("x-failed-recipients"):
        return False
    subject = header_text(msg.get("subject", ""))
    for name, pattern in bt.AUTOREPLY_HEADERS.items():
        if any(pattern.search(header_text(v)) for v in msg.get_all(name) or []):
            return True
    if bt.AUTOREPLY_SUBJECT_RE.search(subject):
        return True
    return bool(bt.AUTO_REPLIED_RE.search(header_text(msg.get("auto-submitted", "")))
                and not bt.BOUNCE_SUBJECT_RE.search(subject))


def report_type(msg: Message) -> str:
    if msg.get_content_type() != "multipart/report":
        return ""
    return str(msg.get_param("report-type", "") or "").strip().lower()
