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
_LOCAL_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


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
    value = _CONTROL.sub(" ", clean_text(value)).strip()
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
            return boxes
    except Exception:  # the registry raises many types on hostile input; the fallback decides
        pass
    pairs = getaddresses([value])
    boxes = tuple(Mailbox(clean_text(decode_words(n)), clean_text(a)) for n, a in pairs if a)
    if not boxes or not all("@" in b.address and b.local_part and b.domain for b in boxes):
        return None
    return boxes


def format_mailbox(name: str, address: str) -> str:
    """`"Name" <address>`, Odoo's `formataddr`: the name always quoted, non-ASCII encoded.

    A non-ASCII name becomes UTF-8 base64 encoded words (an encoded word may not stand inside
    a quoted string); control characters are dropped so a name can never inject a header line.
    """
    name = _CONTROL.sub(" ", clean_text(name)).strip()
    address = to_wire(address)
    if not name:
        return address
    if name.isascii():
        quoted = _QUOTE_SPECIALS.sub(r"\\\1", name)
        return f'"{quoted}" <{address}>'
    return f"{_encoded_words(name)} <{address}>"


def _encoded_words(text: str) -> str:
    """UTF-8 base64 encoded words of at most 75 characters each, never splitting a character."""
    words: list[str] = []
    chunk = ""
    for char in text:
        candidate = chunk + char
        if len(candidate.encode("utf-8")) > 45:
            words.append(chunk)
            chunk = char
        else:
            chunk = candidate
    if chunk:
        words.append(chunk)
    return " ".join(f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words)
