"""RFC 3464 delivery status notifications, the report read first and trusted most: each
recipient group says what happened (Action) and why (Status, Diagnostic-Code); nothing is guessed."""

from __future__ import annotations

import re
from email.message import Message
from email.parser import HeaderParser

from mailgate.bounceparse import phrases as bt
from mailgate.bounceparse.judge import judged
from mailgate.bounceparse.mime import (
    MAX_TEXT,
    clean,
    clean_address,
    decode_transfer,
    decoded_text,
    field,
    header_text,
    is_ours,
    is_text,
    notification_text,
    report_parts,
)
from mailgate.bounceparse.paragraphs import paragraph_about, remote_mta
from mailgate.bounceparse.report import BouncedRecipient, BounceReport

_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_GROUP_FIELDS = ("final-recipient", "original-recipient", "action", "status", "diagnostic-code")
_FINAL_RE = re.compile(r"^final-recipient:", re.I | re.M)
_ACTION_RE = re.compile(r"^(?:action|status):", re.I | re.M)


def from_dsn(msg: Message, original_id: str | None, bounce_alias: str) -> BounceReport | None:
    """The report from its delivery-status part(s), or None when it has no recipient group."""
    groups: list[Message] = []
    reporting_mta = None
    for part in report_parts(msg):
        if part.get_content_type() not in _DSN_TYPES:
            continue
        for block in _dsn_blocks(part):
            reporting_mta = reporting_mta or _host(field(block, "reporting-mta"))
            groups += [g for g in _split_groups(block)
                       if field(g, "final-recipient") or field(g, "original-recipient")]
    if not groups:
        groups = _dsn_groups_in_text(msg)
    if not groups:
        return None
    human = notification_text(msg)
    named = [a for g in groups for a in [_group_address(g)] if a]
    failed: dict[str, BouncedRecipient] = {}
    delayed: dict[str, BouncedRecipient] = {}
    for block in groups:
        recipient = _dsn_recipient(block, human, named)
        if recipient is None or is_ours(recipient.address, bounce_alias):
            continue
        if recipient.action == "failed":
            failed.setdefault(recipient.address, recipient)
        elif recipient.action == "delayed":
            delayed.setdefault(recipient.address, recipient)
    if not failed and not delayed and any(_says_failed(g) for g in groups):
        return None  # a failure with no usable address ("@host"): let the text path name it
    kind = "dsn" if failed else "delay" if delayed else "none"
    return BounceReport(bool(failed), kind, tuple(failed.values()), clean(reporting_mta),
                        original_id, tuple(delayed.values()))


def _split_groups(block: Message) -> list[Message]:
    """One block per recipient: some MTAs (AOL) write several groups without the blank line
    between them, so a recipient field seen twice starts a new group."""
    groups: list[Message] = [Message()]
    for name, value in block.items():
        if name.lower() in _GROUP_FIELDS and groups[-1].get(name) is not None:
            groups.append(Message())
        groups[-1][name] = header_text(value)
    return groups if len(groups) > 1 else [block]


def _group_address(block: Message) -> str | None:
    """Original-Recipient first: it is the address we sent to, before the remote side's
    aliasing or forwarding produced the Final-Recipient, and the one Odoo knows the partner by."""
    return (_dsn_address(field(block, "original-recipient"))
            or _dsn_address(field(block, "final-recipient")))


def _dsn_recipient(block: Message, human: str, named: list[str]) -> BouncedRecipient | None:
    """One recipient group. Its Status stands, except where the remote server's own code in the
    diagnostic says more: a detail for a bare "5.0.0", or a 5.x.x where the group says both
    "failed" and 4.x.x (the MTA gave up on a permanent refusal but wrote a retry status)."""
    address = _group_address(block)
    if address is None:
        return None
    diagnostic = _typed_value(field(block, "diagnostic-code"))
    about = paragraph_about(address, human, [a for a in named if a != address])
    reason = bt.one_line(diagnostic) or about
    status = bt.find_status(field(block, "status"))
    said = bt.find_status(reason)
    stated = _action(field(block, "action"), None)
    if (status is None or (said and status.endswith(".0.0") and said[0] == status[0])
            or (said and said[0] == "5" and status[0] == "4" and stated == "failed")):
        status = said or status
    action = stated or _action("", status)
    remote = _host(field(block, "remote-mta")) or remote_mta(reason)
    program = field(block, "diagnostic-code").split(";", 1)[0].strip().lower() == "x-unix"
    return judged(address, status, action, reason, remote, transcript=about, program=program)


def _action(value: str, status: str | None) -> str | None:
    """The DSN Action, with the non-standard spellings seen in the wild mapped to the RFC's."""
    word = value.strip().split(" ", 1)[0].split("(", 1)[0].lower() if value.strip() else ""
    if word.startswith(("fail", "error", "expired")):  # "expired": given up after retries
        return "failed"
    if word.startswith("delay"):
        return "delayed"
    if word:
        return word
    return {"5": "failed", "4": "delayed"}.get((status or "")[:1])


def _says_failed(block: Message) -> bool:
    return _action(field(block, "action"), bt.find_status(field(block, "status"))) == "failed"


def _dsn_blocks(part: Message) -> list[Message]:
    """The header blocks of a delivery-status part, decoding it first when it was encoded."""
    payload = part.get_payload()
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    if isinstance(payload, list) and encoding not in ("base64", "quoted-printable"):
        return [b for b in payload if isinstance(b, Message)]
    if isinstance(payload, list):
        text = "\n".join(_block_source(b) for b in payload if isinstance(b, Message))
        data = text.encode("ascii", "replace")
        text = decode_transfer(data, encoding).decode("utf-8", "replace")
    else:
        text = decoded_text(part)
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
    for part in report_parts(msg):
        if is_text(part):
            text = decoded_text(part)
            if _FINAL_RE.search(text) and _ACTION_RE.search(text):
                groups += [b for b in _blocks_of(text) if field(b, "final-recipient")]
    return groups


def _dsn_address(value: str) -> str | None:
    """`rfc822; <User@Example.com>` -> `user@example.com`; None for non-Internet addresses."""
    if not value:
        return None
    kind, semicolon, rest = value.partition(";")
    return clean_address(rest if semicolon else value)


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
