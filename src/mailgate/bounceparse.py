"""Delivery failure reports that come back to `bounce+TOKEN@...`: who failed, hard or soft, why.

The rows this produces feed Odoo's bounce counter, and five hard bounces in 91 days blacklist an
address, so a wrong "hard" costs a customer. Hence the order of trust:

1. RFC 3464 delivery status notifications (a message/delivery-status part): Postfix, Sendmail,
   Exchange/Office 365, Gmail, Amazon SES and most modern MTAs. Each recipient group says what
   happened (Action) and why (Status, Diagnostic-Code); nothing is guessed.
2. Auto-replies and vacation notices are screened out next, before any heuristic runs: they
   arrive at the same address and flufl.bounce's looser patterns would read them as failures.
3. Reports without a DSN part (kind "flufl"), only when they look like reports (a daemon
   sender, or a report subject and failure wording): flufl.bounce's detectors (Exim, qmail,
   Yahoo, Exchange 5.5, SimpleMatch...), then `bouncetext.RECIPIENT_LINE_RES` for the formats
   flufl does not know (OpenSMTPD, DragonFly, old Sendmail...). Both only name addresses, so the
   status and reason of each are read from the report text around that address.

Hard or soft always comes from `bouncetext.is_permanent`; its docstring holds the rules,
including why a full mailbox counts as soft.

`parse_bounce` and `find_token` never raise: this runs in Postfix's pipe, where an exception
would bounce the bounce. Input is capped (1 MiB, 998-byte lines) so no pattern meets a
pathological line.
"""

from __future__ import annotations

import base64
import binascii
import email
import logging
import quopri
import re
from dataclasses import dataclass, replace
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser
from typing import Iterator

try:
    from flufl.bounce import all_failures
except ImportError:  # a dependency; without it only our own patterns read non-DSN reports
    all_failures = None

from mailgate import bouncetext as bt

logging.getLogger("flufl.bounce").addHandler(logging.NullHandler())

MAX_INPUT = 1 << 20
MAX_LINE = 998
MAX_PARTS = 200
MAX_TEXT = 64 * 1024
_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_HEADER_PART_TYPES = ("text/rfc822-headers", "message/rfc822-headers", "text/rfc822-header")
_ORIGINAL_TYPES = ("message/rfc822", "message/global")
_GROUP_FIELDS = ("final-recipient", "original-recipient", "action", "status", "diagnostic-code")
_TOKEN_HEADERS = ("delivered-to", "x-original-to", "envelope-to", "to", "cc")
_MSGID_RE = re.compile(r"<[^<>\s]{1,900}>")
_QUOTED_MSGID_RE = re.compile(r"^[ \t>]*message-id:[ \t]*(<[^<>\s]{1,900}>)", re.I | re.M)
_ADDRESS_RE = re.compile(r"[^\s<>\"'(),;:\[\]@]{1,64}@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)+", re.I)
_QUOTED_HEADER_RE = re.compile(
    r"^[ \t>]*(?:message-id|references|in-reply-to|from|reply-to|sender|return-path|received|"
    r"dkim-signature|list-[\w-]+)[ \t]*:", re.I)
_FINAL_RE = re.compile(r"^final-recipient:", re.I | re.M)
_ACTION_RE = re.compile(r"^(?:action|status):", re.I | re.M)
_TAG_RE = re.compile(r"<[^>]{0,2000}>")


@dataclass(frozen=True)
class BouncedRecipient:
    address: str                 # normalised: lower-cased, no angle brackets, no "rfc822;" prefix
    permanent: bool | None       # True hard, False soft, None unknown
    status: str | None           # enhanced status "5.1.1"
    action: str | None           # "failed" | "delayed" | ... (DSN Action), "failed" for non-DSN
    reason: str | None           # diagnostic text, one line, capped
    remote_mta: str | None


@dataclass(frozen=True)
class BounceReport:
    is_bounce: bool              # at least one FAILED recipient (delayed-only reports: False)
    kind: str                    # "dsn", "flufl", "delay", "autoreply", "none"
    recipients: tuple[BouncedRecipient, ...]   # failed ones only
    reporting_mta: str | None
    original_message_id: str | None
    delayed: tuple[BouncedRecipient, ...] = ()


NOT_A_BOUNCE = BounceReport(False, "none", (), None, None)


def parse_bounce(raw: bytes, *, bounce_alias: str = "bounce") -> BounceReport:
    """Read a delivery report. Never raises: unreadable input is "none", not an error.

    `bounce_alias` keeps our own `bounce+TOKEN@` address out of the failed recipients, where a
    heuristic could pick it up from the quoted original.
    """
    try:
        msg = _with_boundary_repaired(email.message_from_bytes(_capped(raw)))
    except Exception:  # the parser is lenient, but hostile input must not reach Postfix as a crash
        return NOT_A_BOUNCE
    try:
        return _parse(msg, bounce_alias)
    except Exception:  # last resort: what was read is lost, the message is still handled
        return BounceReport(False, "none", (), None, _safe(lambda: _original_message_id(msg)))


def find_token(raw: bytes, bounce_alias: str = "bounce") -> str | None:
    """The TOKEN of the first `<bounce_alias>+TOKEN@domain` among the report's addressees.

    The envelope headers (Delivered-To, X-Original-To, Envelope-To) come before To and Cc: they
    are written by our own MTA from the envelope recipient, which is the address the remote
    server bounced to, while To is whatever the remote server chose to write. The local part is
    matched case-insensitively and the token lower-cased, as `inbound.bounce_token_of` does,
    because some servers fold the case of the address they bounce to.
    """
    try:
        if not bounce_alias:
            return None
        headers = BytesHeaderParser().parsebytes(_capped(raw), headersonly=True)
        pattern = re.compile(r"(?<![\w.+=-])" + re.escape(bounce_alias)
                             + r"\+([^\s@<>\"'(),;:\[\]\\]+)@[a-z0-9-]+(?:\.[a-z0-9-]+)+", re.I)
        for name in _TOKEN_HEADERS:
            for value in headers.get_all(name) or []:
                found = pattern.search(_header_text(value))
                if found:
                    return _clean(found.group(1)).lower()
    except Exception:  # never raises: a token we cannot read is a token we do not have
        return None
    return None


def report_json(report: BounceReport, token: str | None) -> dict:
    """The summary handed to Odoo and the logs: exactly these keys, JSON-serialisable."""
    return {
        "is_bounce": report.is_bounce,
        "recipients": [{"address": r.address, "permanent": r.permanent, "status": r.status,
                        "reason": r.reason} for r in report.recipients],
        "token": token,
    }


def _parse(msg: Message, bounce_alias: str) -> BounceReport:
    original_id = _safe(lambda: _original_message_id(msg))
    report = _safe(lambda: _from_dsn(msg, original_id, bounce_alias))
    if report is None and _is_autoreply(msg):
        return BounceReport(False, "autoreply", (), None, original_id)
    if report is None and _report_type(msg) == "feedback-report":
        return BounceReport(False, "none", (), None, original_id)
    if report is None:
        report = _from_text(msg, original_id, bounce_alias)
    if report.original_message_id is None and report.kind in ("dsn", "flufl", "delay"):
        # Reports that return no copy often still answer the message: Gmail, Exchange.
        report = replace(report, original_message_id=_message_id(msg.get("in-reply-to")))
    return report


# --- RFC 3464 -----------------------------------------------------------------------------

def _from_dsn(msg: Message, original_id: str | None, bounce_alias: str) -> BounceReport | None:
    """The report from its delivery-status part(s), or None when it has no recipient group."""
    groups: list[Message] = []
    reporting_mta = None
    for part in _report_parts(msg):
        if part.get_content_type() not in _DSN_TYPES:
            continue
        for block in _dsn_blocks(part):
            reporting_mta = reporting_mta or _host(_field(block, "reporting-mta"))
            groups += [g for g in _split_groups(block)
                       if _field(g, "final-recipient") or _field(g, "original-recipient")]
    if not groups:
        groups = _dsn_groups_in_text(msg)
    if not groups:
        return None
    human = _notification_text(msg)
    named = [a for g in groups for a in [_group_address(g)] if a]
    failed: dict[str, BouncedRecipient] = {}
    delayed: dict[str, BouncedRecipient] = {}
    for block in groups:
        recipient = _dsn_recipient(block, human, named)
        if recipient is None or _is_ours(recipient.address, bounce_alias):
            continue
        if recipient.action == "failed":
            failed.setdefault(recipient.address, recipient)
        elif recipient.action == "delayed":
            delayed.setdefault(recipient.address, recipient)
    kind = "dsn" if failed else "delay" if delayed else "none"
    return BounceReport(bool(failed), kind, tuple(failed.values()), _clean(reporting_mta),
                        original_id, tuple(delayed.values()))


def _split_groups(block: Message) -> list[Message]:
    """One block per recipient: some MTAs (AOL) write several groups without the blank line
    between them, so a recipient field seen twice starts a new group."""
    groups: list[Message] = [Message()]
    for name, value in block.items():
        if name.lower() in _GROUP_FIELDS and groups[-1].get(name) is not None:
            groups.append(Message())
        groups[-1][name] = _header_text(value)
    return groups if len(groups) > 1 else [block]


def _group_address(block: Message) -> str | None:
    """Original-Recipient first: it is the address we sent to, before the remote side's
    aliasing or forwarding produced the Final-Recipient, and the one Odoo knows the partner by."""
    return (_dsn_address(_field(block, "original-recipient"))
            or _dsn_address(_field(block, "final-recipient")))


def _dsn_recipient(block: Message, human: str, named: list[str]) -> BouncedRecipient | None:
    address = _group_address(block)
    if address is None:
        return None
    diagnostic = _typed_value(_field(block, "diagnostic-code"))
    reason = bt.one_line(diagnostic) or _paragraph_about(address, human, [a for a in named if a != address])
    status = bt.find_status(_field(block, "status"))
    said = bt.find_status(reason)
    if status is None or (said and status.endswith(".0.0") and said[0] == status[0]):
        status = said or status
    action = _action(_field(block, "action"), status)
    permanent = bt.is_permanent(status, reason, smtp_code=bt.find_smtp_code(diagnostic))
    remote = _host(_field(block, "remote-mta")) or _remote_mta(reason)
    return BouncedRecipient(address, permanent, status, action, _clean(reason), _clean(remote))


def _action(value: str, status: str | None) -> str | None:
    """The DSN Action, with the non-standard spellings seen in the wild mapped to the RFC's."""
    word = value.strip().split(" ", 1)[0].split("(", 1)[0].lower() if value.strip() else ""
    if word.startswith(("fail", "error")):
        return "failed"
    if word.startswith("delay"):
        return "delayed"
    if word:
        return word
    return {"5": "failed", "4": "delayed"}.get((status or "")[:1])


def _dsn_blocks(part: Message) -> list[Message]:
    """The header blocks of a delivery-status part, decoding it first when it was encoded."""
    payload = part.get_payload()
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    if isinstance(payload, list) and encoding not in ("base64", "quoted-printable"):
        return [b for b in payload if isinstance(b, Message)]
    if isinstance(payload, list):
        text = "\n".join(_block_source(b) for b in payload if isinstance(b, Message))
        data = text.encode("ascii", "replace")
        text = _decode_transfer(data, encoding).decode("utf-8", "replace")
    else:
        text = _decoded_text(part)
    return _blocks_of(text)


def _block_source(block: Message) -> str:
    head = "\n".join(f"{k}: {v}" for k, v in block.items())
    body = block.get_payload()
    return head + ("\n" + body if isinstance(body, str) else "")


def _blocks_of(text: str) -> list[Message]:
    parser = HeaderParser()
    return [parser.parsestr(chunk.strip("\r\n") + "\n", headersonly=True)
            for chunk in re.split(r"\r?\n[ \t]*\r?\n", text[:MAX_TEXT]) if chunk.strip()]


def _dsn_groups_in_text(msg: Message) -> list[Message]:
    """Recipient groups written into a text part: reports that mislabel the DSN part or paste
    it into the notification (Amazon WorkMail), or whose MIME boundary could not be found."""
    groups: list[Message] = []
    for part in _report_parts(msg):
        if part.get_content_maintype() == "text" and not part.is_multipart():
            text = _decoded_text(part)
            if _FINAL_RE.search(text) and _ACTION_RE.search(text):
                groups += [b for b in _blocks_of(text) if _field(b, "final-recipient")]
    return groups


def _dsn_address(value: str) -> str | None:
    """`rfc822; <User@Example.com>` -> `user@example.com`; None for non-Internet addresses."""
    if not value:
        return None
    kind, semicolon, rest = value.partition(";")
    return _clean_address(rest if semicolon else value)


def _typed_value(value: str) -> str | None:
    """`dns; mx.example.com` -> `mx.example.com`, `smtp; 550 ...` -> `550 ...`."""
    value = " ".join(value.split())
    kind, semicolon, rest = value.partition(";")
    if semicolon and kind.strip() and " " not in kind.strip() and len(kind) < 20:
        value = rest.strip()
    return value or None


def _host(value: str) -> str | None:
    """`dns; mx.example.com. (2001:db8::1, the server for ...)` -> `mx.example.com`."""
    typed = _typed_value(value)
    return typed.split()[0].rstrip(".").lower() or None if typed else None


# --- reports without a DSN part --------------------------------------------------------------

def _from_text(msg: Message, original_id: str | None, bounce_alias: str) -> BounceReport:
    """flufl.bounce's detectors, then our own recipient patterns for reports flufl does not know.

    Only for mail that looks like a report (a daemon sender, Exim's X-Failed-Recipients, or a
    report subject or type with failure wording): some flufl detectors match any comma-separated
    address list, which a person writing to the bounce address would trip. Our own patterns
    also need failure wording, even from a daemon.
    """
    temporary, permanent = _flufl_failures(msg)
    text = _notification_text(msg)
    if not (msg.get("x-failed-recipients") or _looks_like_report(msg, text)):
        return BounceReport(False, "none", (), None, original_id)
    exclude = _not_recipients(msg)
    failed = [a for a in _usable(sorted(permanent), bounce_alias) if a not in exclude]
    delayed = [a for a in _usable(sorted(temporary), bounce_alias) if a not in failed and a not in exclude]
    if not failed and not delayed and _says_failed(msg, text):
        failed = [a for a in _usable(_named_in_text(text), bounce_alias) if a not in exclude]
    if not failed and not delayed:
        return BounceReport(False, "none", (), None, original_id)
    intro = _intro(text, failed + delayed)
    if failed and not msg.get("x-failed-recipients") and _delay_only(msg, intro):
        delayed, failed = failed + delayed, []
    recipients = tuple(_text_recipient(a, text, intro, "failed", failed + delayed) for a in failed)
    waiting = tuple(_text_recipient(a, text, intro, "delayed", failed + delayed) for a in delayed)
    reporting_mta = next((m.group(1) for r in bt.REPORTING_MTA_RES for m in [r.search(intro)] if m), None)
    kind = "flufl" if recipients else "delay"
    return BounceReport(bool(recipients), kind, recipients, _clean(reporting_mta), original_id, waiting)


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
    if bt.is_daemon_sender(_header_text(msg.get("from", ""))):
        return True
    return _says_failed(msg, text) and (bt.BOUNCE_SUBJECT_RE.search(_header_text(msg.get("subject", "")))
                                        is not None or msg.get_content_type() == "multipart/report")


def _says_failed(msg: Message, text: str) -> bool:
    return bool(bt.FAILURE_RE.search(_header_text(msg.get("subject", "")) + "\n" + text))


def _named_in_text(text: str) -> list[bytes]:
    found = []
    for pattern in bt.RECIPIENT_LINE_RES:
        found += [m.group("a").encode("utf-8", "replace") for m in pattern.finditer(text)]
    return found


def _not_recipients(msg: Message) -> set[str]:
    """Address-shaped strings a heuristic may pick up that are never the failed recipient: the
    report's own sender, Message-IDs, and addresses quoted only in header lines of the returned
    message (its From, Reply-To...) and nowhere in the report's own words."""
    excluded = set()
    for name in ("from", "reply-to", "sender", "return-path"):
        for value in msg.get_all(name) or []:
            excluded.update(a.lower() for a in _ADDRESS_RE.findall(_header_text(value)))
    header_only: set[str] = set()
    elsewhere: set[str] = set()
    for part in _report_parts(msg):
        if part.get_content_type() in _ORIGINAL_TYPES:
            headers = _attached_headers(part)
            for name in ("message-id", "references", "in-reply-to"):
                for value in (headers.get_all(name) if headers is not None else None) or []:
                    excluded.update(a.lower() for a in _ADDRESS_RE.findall(_header_text(value)))
        elif part.get_content_maintype() == "text" and not part.is_multipart():
            for line in _decoded_text(part)[:MAX_INPUT].splitlines():
                found = {a.lower() for a in _ADDRESS_RE.findall(line)}
                if found:
                    (header_only if _QUOTED_HEADER_RE.match(line) else elsewhere).update(found)
    return excluded | (header_only - elsewhere)


def _usable(found: list[bytes], bounce_alias: str) -> list[str]:
    """Candidate addresses that are plain addresses, not ours, not a daemon's; first seen first."""
    addresses = []
    for item in found:
        text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
        address = _clean_address(text)
        if address is None or address != text.strip().strip("<>").strip().lower():
            continue  # flufl's looser detectors return whole phrases, not addresses
        if not _is_ours(address, bounce_alias) and not bt.is_daemon_address(address) and address not in addresses:
            addresses.append(address)
    return addresses


def _text_recipient(address: str, text: str, intro: str, action: str, everyone: list[str]) -> BouncedRecipient:
    reason = _paragraph_about(address, text, [a for a in everyone if a != address])
    status = bt.find_status(reason)
    permanent = bt.is_permanent(status, reason)
    if permanent is None and action == "failed":
        permanent = bt.is_permanent(None, intro)
    return BouncedRecipient(address, permanent, status, action, _clean(reason), _clean(_remote_mta(reason)))


def _delay_only(msg: Message, intro: str) -> bool:
    return bool(bt.DELAY_RE.search(_header_text(msg.get("subject", "")) + "\n" + intro))


def _intro(text: str, addresses: list[str]) -> str:
    """The report text before the first failed address: where MTAs say "permanent error"."""
    positions = [m.start() for a in addresses for m in [_address_pattern(a).search(text)] if m]
    return text[:min(positions)] if positions else text[:2000]


def _paragraph_about(address: str, text: str, others: tuple[str, ...] | list[str] = ()) -> str | None:
    """The lines about `address`: from its first mention until the next recipient, a blank
    line once a reply code has been read (Gmail's old reports put it two paragraphs down), or
    twelve lines; the bare address line itself left out."""
    found = _address_pattern(address).search(text)
    if not found:
        return None
    start = text.rfind("\n", 0, found.start()) + 1
    lines: list[str] = []
    for number, line in enumerate(text[start:start + 8000].splitlines()[:40]):
        if number and any(_address_pattern(o).search(line) for o in others) and not _mentions(address, line):
            break
        if not line.strip():
            if len(lines) >= 2 and _has_code("\n".join(lines)):
                break
            continue
        bare = _ADDRESS_RE.sub("", line).strip(" \t<>:;,.()[]*-")
        if number == 0 and not bare:
            continue
        lines.append(line)
        if len(lines) >= 12:
            break
    return bt.one_line("\n".join(lines))


def _has_code(text: str) -> bool:
    return bool(bt.find_status(text) or bt.find_smtp_code(text))


def _mentions(address: str, line: str) -> bool:
    return bool(_address_pattern(address).search(line))


def _address_pattern(address: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w.+-])" + re.escape(address) + r"(?![\w-]|\.[\w-])", re.I)


def _remote_mta(reason: str | None) -> str | None:
    for pattern in bt.REMOTE_MTA_RES:
        found = pattern.search(reason or "")
        if found:
            return found.group(1).lower()
    return None


# --- auto-replies ------------------------------------------------------------------------------

def _is_autoreply(msg: Message) -> bool:
    """An RFC 3834 auto-response (vacation, out of office), unless it plainly is a failure report.

    A delivery report may carry `Auto-Submitted: auto-replied` too (Postfix and Exim add it), so
    that header alone decides only for mail that is neither from a mailer daemon nor titled like
    a report; the vendor headers and the usual subjects decide on their own.
    """
    if bt.is_daemon_sender(_header_text(msg.get("from", ""))) or msg.get("x-failed-recipients"):
        return False
    subject = _header_text(msg.get("subject", ""))
    for name, pattern in bt.AUTOREPLY_HEADERS.items():
        if any(pattern.search(_header_text(v)) for v in msg.get_all(name) or []):
            return True
    if bt.AUTOREPLY_SUBJECT_RE.search(subject):
        return True
    return bool(bt.AUTO_REPLIED_RE.search(_header_text(msg.get("auto-submitted", "")))
                and not bt.BOUNCE_SUBJECT_RE.search(subject))


def _report_type(msg: Message) -> str:
    if msg.get_content_type() != "multipart/report":
        return ""
    return str(msg.get_param("report-type", "") or "").strip().lower()


# --- the returned message ----------------------------------------------------------------------

def _original_message_id(msg: Message) -> str | None:
    """The Message-ID of the message that bounced: from the attached original or its headers,
    else from a `Message-ID:` line of the headers quoted in a text body (qmail, Exim, Yahoo)."""
    quoted = []
    for part in _report_parts(msg):
        ctype = part.get_content_type()
        headers = None
        if ctype in _ORIGINAL_TYPES:
            headers = _attached_headers(part)
        elif ctype in _HEADER_PART_TYPES:
            headers = HeaderParser().parsestr(_decoded_text(part)[:MAX_TEXT], headersonly=True)
        elif part.get_content_maintype() == "text" and not part.is_multipart():
            quoted.append(_decoded_text(part))
        if headers is not None:
            found = _message_id(headers.get("message-id"))
            if found:
                return found
    for text in quoted:
        found = _QUOTED_MSGID_RE.search(text)
        if found:
            return found.group(1)
    return None


def _attached_headers(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        inner = payload[0]
        if len(inner.keys()) or not isinstance(inner.get_payload(), str):
            return inner
        payload = inner.get_payload()
    if isinstance(payload, str):
        encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
        data = _decode_transfer(payload.encode("ascii", "replace"), encoding)
        return HeaderParser().parsestr(data.decode("utf-8", "replace")[:MAX_TEXT], headersonly=True)
    return None


def _message_id(value: object) -> str | None:
    text = _header_text(value).strip()
    found = _MSGID_RE.search(text)
    if found:
        return _clean(found.group(0))
    return _clean(text) if text and " " not in text and len(text) < 900 else None


# --- MIME helpers --------------------------------------------------------------------------------

def _capped(raw: bytes) -> bytes:
    """At most 1 MiB, lines at most 998 bytes (RFC 5322): the report and the returned headers
    always fit, and no regular expression downstream ever sees a megabyte-long line."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    data = bytes(raw[:MAX_INPUT])
    lines = data.split(b"\n")
    if any(len(line) > MAX_LINE for line in lines):
        data = b"\n".join(line[:MAX_LINE] for line in lines)
    return data


def _with_boundary_repaired(msg: Message) -> Message:
    """A multipart whose declared boundary never occurs, re-read with the delimiter its body
    does use (seen in the wild after relays rewrote the header but not the body)."""
    if msg.get_content_maintype() != "multipart" or msg.is_multipart():
        return msg
    body = msg.get_payload()
    if not isinstance(body, str):
        return msg
    delimiters = re.findall(r"^--([\w'()+,./:=?-]{1,70}?)(?:--)?[ \t]*\r?$", body[:MAX_INPUT], re.M)
    counts = {d: delimiters.count(d) for d in set(delimiters)}
    best = max(counts, key=lambda d: (counts[d], len(d)), default=None)
    if best is None or counts[best] < 2:
        return msg
    try:
        msg.set_boundary(best)
        return email.message_from_bytes(msg.as_bytes())
    except Exception:  # the repair is best effort; the unsplit message is still readable as text
        return msg


def _report_parts(msg: Message) -> Iterator[Message]:
    """The parts of the report itself, depth first, never those of an attached message."""
    pending = [msg]
    seen = 0
    while pending and seen < MAX_PARTS:
        part = pending.pop(0)
        seen += 1
        yield part
        if part.get_content_maintype() != "message" and part.is_multipart():
            pending[0:0] = [p for p in part.get_payload() if isinstance(p, Message)]


def _notification_text(msg: Message) -> str:
    """The human-readable report: its text/plain parts (text/html only without them), cut
    before the quoted copy of the returned message."""
    plain, html = [], []
    for part in _report_parts(msg):
        ctype = part.get_content_type()
        if part.is_multipart() or ctype in _HEADER_PART_TYPES:
            continue
        if ctype == "text/plain" or (part is msg and part.get_content_maintype() == "text" and ctype != "text/html"):
            plain.append(_decoded_text(part))
        elif ctype == "text/html":
            html.append(_TAG_RE.sub(" ", _decoded_text(part)).replace("&nbsp;", " "))
        if sum(map(len, plain + html)) > MAX_TEXT:
            break
    text = "\n\n".join(plain or html)[:MAX_TEXT]
    cut = bt.ORIGINAL_MARKER_RE.search(text)
    return text[:cut.start()] if cut and cut.start() > 0 else text


def _decoded_text(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # broken base64 or quoted-printable: read what is there
        payload = None
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    payload = payload[:MAX_INPUT]
    try:
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    except Exception:  # unknown or broken charset name
        return payload.decode("latin-1")


def _decode_transfer(data: bytes, encoding: str) -> bytes:
    try:
        if encoding == "base64":
            return base64.b64decode(data, validate=False)
        if encoding == "quoted-printable":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data
    return data


def _field(block: Message, name: str) -> str:
    values = block.get_all(name) or []
    return " ".join(_header_text(values[0]).split()) if values else ""


def _header_text(value: object) -> str:
    """A header as text, RFC 2047 words decoded when they decode, whatever the value's type."""
    try:
        text = str(value)
    except Exception:  # a Header object with an unknown charset
        return ""
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:  # malformed encoded words: keep them as they are
            pass
    return text


def _clean_address(text: str) -> str | None:
    """One address as the blacklist keys it: lower-case, no brackets, or None if not one."""
    text = text.strip()
    if "<" in text and ">" in text:
        text = text[text.find("<") + 1:text.find(">", text.find("<"))]
    found = _ADDRESS_RE.search(text)
    if not found or any(c == "\ufffd" or "\udc80" <= c <= "\udcff" for c in found.group(0)):
        return None  # undecodable bytes: not an address anyone can be blacklisted under
    address = found.group(0).strip(".").lower()
    return address if address.rpartition("@")[0] and len(address) <= 254 else None


def _is_ours(address: str, bounce_alias: str) -> bool:
    """Our own tokenised return path, which heuristics can pick up from a quoted original."""
    return bool(bounce_alias) and address.rpartition("@")[0].startswith(bounce_alias.lower() + "+")


def _clean(text: str | None) -> str | None:
    """Text safe to store and to encode: lone surrogates (undecodable bytes) become "?"."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8")


def _safe(read):
    """Run one independent reading step; a failure there loses only what that step reads."""
    try:
        return read()
    except Exception:  # each step is optional: the others still produce a report
        return None
