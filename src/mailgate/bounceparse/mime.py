"""The MIME plumbing of a report: input capped before any parsing, a lost boundary repaired,
the report's own parts walked (never those of an attached message) and decoded, the Message-ID
of the message that bounced, and the small normalisers every reading step shares."""

from __future__ import annotations

import base64
import binascii
import email
import quopri
import re
from collections.abc import Iterator
from email.header import Header, decode_header, make_header
from email.message import Message
from email.parser import HeaderParser
from typing import overload

from mailgate.bounceparse import phrases as bt

MAX_INPUT = 1 << 20
MAX_LINE = 998
MAX_PARTS = 200
MAX_TEXT = 64 * 1024
_HEADER_PART_TYPES = ("text/rfc822-headers", "message/rfc822-headers", "text/rfc822-header")
ORIGINAL_TYPES = ("message/rfc822", "message/global")
_MSGID_RE = re.compile(r"<[^<>\s]{1,900}>")
_QUOTED_MSGID_RE = re.compile(r"^[ \t>]*message-id:[ \t]*(<[^<>\s]{1,900}>)", re.I | re.M)
ADDRESS_RE = re.compile(r"[^\s<>\"'(),;:\[\]@]{1,64}@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)+", re.I)
_TAG_RE = re.compile(r"<[^>]{0,2000}>")
_SEVEN_BIT_CHARSETS = ("iso-2022-", "us-ascii", "ascii")


# --- the returned message ----------------------------------------------------------------------

def returned_parts(msg: Message) -> Iterator[tuple[Message | None, str | None]]:
    """What a report shows of the returned message, part by part: its headers (an attached
    original, a returned-headers part) as (headers, None), a text part as (None, its text)."""
    for part in report_parts(msg):
        ctype = part.get_content_type()
        if ctype in ORIGINAL_TYPES:
            yield attached_headers(part), None
        elif ctype in _HEADER_PART_TYPES:
            yield HeaderParser().parsestr(decoded_text(part)[:MAX_TEXT], headersonly=True), None
        elif is_text(part):
            yield None, decoded_text(part)


def original_message_id(msg: Message) -> str | None:
    """The Message-ID of the message that bounced: from the attached original or its headers,
    else from a `Message-ID:` line of the headers quoted in a text body (qmail, Exim, Yahoo)."""
    quoted = []
    for headers, text in returned_parts(msg):
        if text is not None:
            quoted.append(text)
        if headers is not None:
            found = message_id(headers.get("message-id"))
            if found:
                return found
    for text in quoted:
        match = _QUOTED_MSGID_RE.search(text)
        if match:
            return match.group(1)
    return None


def attached_headers(part: Message) -> Message | None:
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], Message):
        inner = payload[0]
        if len(inner.keys()) or not isinstance(inner.get_payload(), str):
            return inner
        payload = inner.get_payload()
    if isinstance(payload, str):
        encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
        data = decode_transfer(payload.encode("ascii", "replace"), encoding)
        return HeaderParser().parsestr(data.decode("utf-8", "replace")[:MAX_TEXT], headersonly=True)
    return None


def message_id(value: object) -> str | None:
    text = header_text(value).strip()
    found = _MSGID_RE.search(text)
    if found:
        return clean(found.group(0))
    return clean(text) if text and " " not in text and len(text) < 900 else None


# --- MIME helpers --------------------------------------------------------------------------------

SPLIT_MARK = b"!\n "


def capped(raw: bytes) -> bytes:
    """At most 1 MiB, lines at most 998 bytes (RFC 5322): the report and the returned headers
    always fit, and no regular expression downstream ever sees a megabyte-long line. A longer
    line is split the way Sendmail splits one ("!", a newline, a space: a folded header stays
    one header), so that a reader of long lines (an SES notification's JSON) can join it. Line
    ends are made LF (a report saved with CRLF or bare CR reads like one with LF)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    data = bytes(raw[:MAX_INPUT]).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines = data.split(b"\n")
    if any(len(line) > MAX_LINE for line in lines):
        step = MAX_LINE - len(SPLIT_MARK)
        data = b"\n".join(SPLIT_MARK.join(line[i:i + step] for i in range(0, len(line), step)) or line
                          for line in lines)
    return data[:MAX_INPUT]


def with_boundary_repaired(msg: Message) -> Message:
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


def report_parts(msg: Message) -> Iterator[Message]:
    """The parts of the report itself, depth first, never those of an attached message."""
    pending = [msg]
    seen = 0
    while pending and seen < MAX_PARTS:
        part = pending.pop(0)
        seen += 1
        yield part
        if part.get_content_maintype() != "message" and part.is_multipart():
            pending[0:0] = [p for p in part.get_payload() if isinstance(p, Message)]


def is_text(part: Message) -> bool:
    """A single text part, or a multipart whose body never split into parts (its boundary lines
    lost in transit, or a boundary parameter a relay folded away): that body is all there is."""
    if part.get_content_maintype() == "text":
        return not part.is_multipart()
    return part.get_content_maintype() == "multipart" and isinstance(part.get_payload(), str)


def content_type(part: Message) -> str:
    """The part's type, also when its parameters lost their semicolon ("text/plain charset=...",
    which the email package reads as one unknown type)."""
    ctype = part.get_content_type()
    return ctype.split()[0] if " " in ctype or "\t" in ctype else ctype


def notification_text(msg: Message) -> str:
    """The human-readable report: its text/plain parts (text/html only without them), cut
    before the quoted copy of the returned message."""
    plain, html = [], []
    for part in report_parts(msg):
        ctype = content_type(part)
        if part.is_multipart() or ctype in _HEADER_PART_TYPES:
            continue
        unsplit = part.get_content_maintype() == "multipart" or part is msg
        if ctype == "text/plain" or (unsplit and is_text(part) and ctype != "text/html"):
            plain.append(decoded_text(part))
        elif ctype == "text/html":
            html.append(_TAG_RE.sub(" ", decoded_text(part)).replace("&nbsp;", " "))
        if sum(map(len, plain + html)) > MAX_TEXT:
            break
    text = "\n\n".join(plain or html)[:MAX_TEXT]
    cut = bt.ORIGINAL_MARKER_RE.search(text)
    return text[:cut.start()] if cut and cut.start() > 0 else text


def decoded_text(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # broken base64 or quoted-printable: read what is there
        payload = None
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    payload = payload[:MAX_INPUT]
    charset = part.get_content_charset() or "utf-8"
    if charset.startswith(_SEVEN_BIT_CHARSETS) and any(byte > 0x7F for byte in payload):
        charset = "utf-8"  # 8-bit text labelled with a 7-bit charset: relabelled on the way (UTF-8)
    try:
        return payload.decode(charset, "replace")
    except Exception:  # unknown or broken charset name
        return payload.decode("latin-1")


def decode_transfer(data: bytes, encoding: str) -> bytes:
    try:
        if encoding == "base64":
            return base64.b64decode(data, validate=False)
        if encoding == "quoted-printable":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data
    return data


def field(block: Message, name: str) -> str:
    values = block.get_all(name) or []
    return " ".join(header_text(values[0]).split()) if values else ""


def header_text(value: object) -> str:
    """A header as text, RFC 2047 words decoded when they decode, whatever the value's type;
    raw 8-bit bytes (kept by the email package as surrogates or an "unknown-8bit" Header) read
    as UTF-8."""
    if isinstance(value, Header):
        return _eight_bit_header(value)
    try:
        text = str(value)
    except Exception:  # a Header object with an unknown charset
        return ""
    if any("\udc80" <= c <= "\udcff" for c in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:  # malformed encoded words: keep them as they are
            pass
    return _iso_2022_jp_decoded(text)


def _iso_2022_jp_decoded(text: str) -> str:
    """ISO-2022-JP written raw into a field (a Japanese Domino's Diagnostic-Code): its escape
    sequences switch to Japanese, which the words of a reason are read in."""
    if "\x1b$" not in text or not text.isascii():
        return text
    return text.encode("ascii").decode("iso-2022-jp", "replace")


def _eight_bit_header(value: Header) -> str:
    try:
        chunks = decode_header(value)
    except Exception:  # a Header the email package cannot take apart: as little as before
        return ""
    return "".join(chunk.decode("utf-8" if charset in (None, "unknown-8bit") else charset, "replace")
                   if isinstance(chunk, bytes) else chunk for chunk, charset in chunks)


def clean_address(text: str) -> str | None:
    """One address as the blacklist keys it: lower-case, no brackets, or None if not one."""
    text = text.strip()
    if "<" in text and ">" in text:
        text = text[text.find("<") + 1:text.find(">", text.find("<"))]
    found = ADDRESS_RE.search(text)
    if not found or any(c == "\ufffd" or "\udc80" <= c <= "\udcff" for c in found.group(0)):
        return None  # undecodable bytes: not an address anyone can be blacklisted under
    address = found.group(0).strip(".").lower()
    return address if address.rpartition("@")[0] and len(address) <= 254 else None


def is_ours(address: str, bounce_alias: str) -> bool:
    """Our own tokenised return path, which heuristics can pick up from a quoted original."""
    return bool(bounce_alias) and address.rpartition("@")[0].startswith(bounce_alias.lower() + "+")


@overload
def clean(text: str) -> str: ...
@overload
def clean(text: None) -> None: ...
@overload
def clean(text: str | None) -> str | None: ...


def clean(text: str | None) -> str | None:
    """Text safe to store and to encode: lone surrogates (undecodable bytes) become "?"."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8")
