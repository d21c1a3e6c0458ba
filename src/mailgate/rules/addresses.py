"""Address handling: parsing From headers, normalising, encapsulating, IDNA on the wire.

Odoo compares addresses lower-cased and exactly; it reads only the address part of a header,
never its display name. These helpers keep that in one place, on top of the `email` package.
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses

_registry = HeaderRegistry()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_FOLD = re.compile(r"\r?\n(?=[ \t])")  # RFC 5322 2.2.3: unfolding removes the line break, keeps the space
# RFC 2047: white space between adjacent encoded words is not part of the text; the header
# registry keeps it, so it is removed before parsing.
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t]+(?==\?)")
# The header registry's address-list parser is quadratic on runs of empty elements (",,,,"): they
# are folded into one, and a header longer than any real one is not parsed at all.
_EMPTY_ELEMENTS = re.compile(r",(?:\s*,)+")
MAX_ADDRESS_HEADER = 64 * 1024
REGISTRY_LIMIT = 4 * 1024  # longer lists (a big Cc) go to getaddresses, which is not quadratic
CACHED_HEADER_LIMIT = 1024  # bounds the parse cache's memory (4096 entries) against hostile headers
_QUOTE_SPECIALS = re.compile(r'([\\"])')
_SPACED_WORDS = re.compile(r" *[^ ]+")  # a name cut before its spaces: each piece ends in a word
MAX_FOLDED_LINE = 78  # RFC 5322 2.1.1: SHOULD be no more than 78 characters
ENCODED_WORD_BYTES = 45  # base64 of 45 bytes is 60 characters: a 72-character encoded word
_LOCAL_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# What `readable_addresses` takes for either side of an `@`: anything up to a delimiter.
_SCANNED_DOMAIN = re.compile(r'[^\s<>()\[\]@,;:"\\]{1,255}')
_SCANNED_LOCAL = re.compile(r'[^\s<>()\[\]@,;:"\\]{1,64}\Z')


@dataclass(frozen=True)
class Mailbox:
    """One address of a header with its decoded display name."""

    name: str
    address: str

    @property
    def local_part(self) -> str:
        return self.address.rpartition("@")[0] if "@" in self.address else self.address

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2] if "@" in self.address else ""


def clean_text(value: str) -> str:
    """Text as the rules may use it: pymilter and the email package hand undecodable bytes on as
    lone surrogates (errors='surrogateescape'), which nothing can encode later (not SQLite, not an
    encoded word). They are read back as UTF-8, anything still invalid becoming U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def normalize(address: str | None) -> str:
    """Odoo's `email_normalize` for one address: stripped and lower-cased."""
    return (address or "").strip().lower()


def domain_of(address: str | None) -> str:
    """The lower-cased domain of an address, or '' when it has none."""
    address = normalize(address)
    return address.rpartition("@")[2] if "@" in address else ""


def is_valid_address(address: str) -> bool:
    """A plain `local@domain` address with a plausible domain (IDN allowed)."""
    local, at, domain = address.rpartition("@")
    return bool(at and local and _LOCAL_ATOM.match(local) and is_valid_domain(domain)
                and not local.startswith(".") and not local.endswith(".") and ".." not in local)


def is_valid_domain(domain: str) -> bool:
    """A host name made of letters, digits and hyphens (after IDNA), at least two labels."""
    try:
        ascii_domain = idna_domain(domain).lower()
    except UnicodeError:
        return False
    labels = ascii_domain.split(".")
    return len(labels) >= 2 and len(ascii_domain) <= 253 and all(_DOMAIN_LABEL.match(label) for label in labels)


def domain_spellings(domain: str) -> frozenset[str]:
    """A domain lower-cased in both its spellings, Unicode and ASCII (punycode): the file may
    name an alias domain either way, and mail comes back addressed in the form it left with
    (MAIL FROM is always the ASCII form, headers may carry either)."""
    lowered = domain.strip().lower()
    spellings = {lowered}
    try:
        spellings.add(idna_domain(lowered).lower())
        spellings.add(lowered.encode("ascii").decode("idna").lower() if lowered.isascii() else lowered)
    except UnicodeError:
        pass
    return frozenset(spellings)


def idna_domain(domain: str) -> str:
    """The ASCII (punycode) form of a domain; ASCII domains come back unchanged."""
    if domain.isascii():
        return domain
    return domain.encode("idna").decode("ascii")


def to_wire(address: str) -> str:
    """The address as it goes into MAIL FROM: the domain IDNA-encoded, the local part as is."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    try:
        return f"{local}@{idna_domain(domain)}"
    except UnicodeError:
        return address


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; undecodable input is returned as it came."""
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError, AssertionError):
        return value


def parse_mailboxes(value: str | None) -> list[Mailbox] | None:
    """The mailboxes of an address header, or None when the header cannot be parsed.

    The `email` package's header registry is tried first because it decodes RFC 2047 display
    names and understands quoting; `getaddresses` is the fallback for headers it refuses. A
    header with no address at all (a bare group, an empty value) gives an empty list.
    """
    if value is None:
        return []
    if len(value) <= CACHED_HEADER_LIMIT:
        boxes = _parse_mailboxes_cached(value)
    else:
        boxes = _parse_mailboxes(value)
    return None if boxes is None else list(boxes)


@functools.lru_cache(maxsize=4096)
def _parse_mailboxes_cached(value: str) -> tuple[Mailbox, ...] | None:
    """The same few From headers come back all day (Odoo's notification address, a user's
    name): parsing one with the header registry costs ~100 µs, a third of a message's work."""
    return _parse_mailboxes(value)


def _parse_mailboxes(value: str) -> tuple[Mailbox, ...] | None:
    value = _CONTROL.sub(" ", _FOLD.sub("", clean_text(value))).strip()
    if len(value) > MAX_ADDRESS_HEADER:
        return None
    value = _EMPTY_ELEMENTS.sub(",", value)
    if not value:
        return ()
    try:
        if len(value) > REGISTRY_LIMIT:
            raise ValueError("long header: the linear parser reads it")
        header = _registry("from", _BETWEEN_WORDS.sub(r"\1", value))
        addresses = header.addresses  # type: ignore[attr-defined]  # an AddressHeader; typeshed types BaseHeader
        boxes = tuple(Mailbox(clean_text(a.display_name or ""), clean_text(a.addr_spec)) for a in addresses)
        if all("@" in b.address and b.local_part and b.domain for b in boxes):
            return _names_from_comments(value, boxes)
    except Exception:  # the registry raises many types on hostile input; the fallback decides
        pass
    pairs = getaddresses([value])
    boxes = tuple(Mailbox(clean_text(decode_words(n)), clean_text(a)) for n, a in pairs if a)
    if not boxes or not all("@" in b.address and b.local_part and b.domain for b in boxes):
        return None
    return boxes


def _names_from_comments(value: str, boxes: tuple[Mailbox, ...]) -> tuple[Mailbox, ...]:
    """A mailbox without a display name takes its comment as the name: `a@b (Admin Person)` is
    "Admin Person", as Odoo reads it (its `getaddresses`; the header registry drops comments)."""
    if all(box.name for box in boxes) or "(" not in value:
        return boxes
    pairs = getaddresses([value])
    if len(pairs) != len(boxes):
        return boxes
    named = list(zip(pairs, boxes, strict=True))
    if any(normalize(address) != normalize(box.address) for (_, address), box in named):
        return boxes
    return tuple(box if box.name or not comment else Mailbox(clean_text(decode_words(comment)), box.address)
                 for (comment, _), box in named)


def readable_addresses(value: str | None) -> tuple[str, ...]:
    """Every address a reader could take out of a header value, well formed or not (docs/rules.md O5).

    Used where the value cannot be parsed: each `@` with text on its right is an address, with as
    much of its left as is not a delimiter (`@domain` alone counts: its domain is what a filter
    judges), in the raw value and again in its decoded encoded words. Linear in the value's length:
    the scan starts only at `@` and looks a bounded distance either way.
    """
    if not value:
        return ()
    raw = _CONTROL.sub(" ", _FOLD.sub("", clean_text(value)))
    found: dict[str, None] = {}
    for text in (raw, _CONTROL.sub(" ", clean_text(decode_words(raw)))):
        at = text.find("@")
        while at != -1:
            domain = _SCANNED_DOMAIN.match(text, at + 1)
            if domain:
                local = _SCANNED_LOCAL.search(text, max(0, at - 64), at)
                found[(local.group() if local else "") + "@" + domain.group()] = None
            at = text.find("@", at + 1)
    return tuple(found)


def format_mailbox(name: str, address: str) -> str:
    """`"Name" <address>`, Odoo's `formataddr`, on one line (logs, the store, `explain`).

    It is `folded_mailbox` unfolded: the same text, without the line breaks.
    """
    return "".join(_mailbox_pieces(name, address))


def folded_mailbox(name: str, address: str, header_name: str = "From") -> str:
    """The value of a `header_name:` header holding `"Name" <address>`, folded (RFC 5322 2.2.3)
    with LF + space, the line end libmilter and Postfix's cleanup take inside a header value.

    Lines stay within 78 characters, "From: " included, except one that holds only an address
    longer than that (never 998: an address has at most 254). Folds are made only where the
    format itself puts white space (before a space of a quoted name, between two encoded words,
    before `<address>`), so unfolding (removing the line breaks) gives `format_mailbox`
    exactly: a quoted name keeps its spaces, encoded words decode to the same name. Postfix would
    otherwise break a line over 998 octets wherever it reaches the limit, inside a word or an
    encoded word.
    """
    prefix = f"{header_name}: "
    lines: list[str] = []
    line = prefix
    for piece in _mailbox_pieces(name, address):
        if line != prefix and len(line) + len(piece) > MAX_FOLDED_LINE:
            lines.append(line)
            line = ""
        line += piece
    lines.append(line)
    return "\n".join(lines)[len(prefix):]


def _mailbox_pieces(name: str, address: str) -> list[str]:
    """`"Name" <address>` cut where a line may be folded: every piece after the first starts with
    the white space a fold goes before, and every piece holds more than white space.

    The name is always quoted when ASCII, `"` and `\\` escaped; a non-ASCII name, or an ASCII
    name with a word too long for a folded line, becomes UTF-8 base64 encoded words (an encoded
    word may not stand inside a quoted string, and encoded words can be cut anywhere between
    characters). Control characters become spaces, so a name can never inject a header line.
    """
    name = _CONTROL.sub(" ", clean_text(name)).strip()
    address = to_wire(address)
    if not name:
        return [address]
    tail = f" <{address}>"
    if name.isascii():
        words = _SPACED_WORDS.findall(name)
        pieces = [_QUOTE_SPECIALS.sub(r"\\\1", word) for word in words]
        pieces[0] = '"' + pieces[0]
        pieces[-1] += '"'
        if all(len(piece) < MAX_FOLDED_LINE - len("From: ") for piece in pieces):
            return [*pieces, tail]
    words = _encoded_words(name)
    return [words[0], *(" " + word for word in words[1:]), tail]


def _encoded_words(text: str) -> list[str]:
    """UTF-8 base64 encoded words of at most 72 characters each ("From: " and one fit a 78
    character line), never splitting a character, and cut after a space where the name has one:
    a reader that wrongly keeps the white space between encoded words (Python's header registry
    does) then shows a doubled space, not a word broken in two."""
    chunks: list[str] = []
    chunk = ""
    for char in text:
        candidate = chunk + char
        if len(candidate.encode("utf-8")) <= ENCODED_WORD_BYTES:
            chunk = candidate
            continue
        cut = chunk.rfind(" ") + 1
        if 0 < cut < len(chunk):
            chunks.append(chunk[:cut])
            chunk = chunk[cut:] + char
        else:
            chunks.append(chunk)
            chunk = char
    if chunk:
        chunks.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(c.encode('utf-8')).decode('ascii')}?=" for c in chunks]
