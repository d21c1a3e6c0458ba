"""Signed bounce tokens (docs/rules.md T1): `bounce+TOKEN@alias-domain` names the message row and its server.

The lookup service routes on the token alone, without a database read, and the bounce path
trusts only tokens it signed itself. The token is lower-case base32 so that it survives remote
servers that fold the case of local parts, and short enough (32 characters) to keep the local
part far below the 64-character limit. Twenty bytes make exactly 32 base32 characters, so no
character carries unused bits and every change to a token is caught by the MAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from mailgate.rules.addresses import normalize

_VERSION = 2          # MAC keyed with the secret and the store's identity
_LEGACY_VERSION = 1   # MAC keyed with the secret alone
_EPOCH = 1_577_836_800  # 2020-01-01: issue days fit two bytes for 179 years
_LAYOUT = struct.Struct(">B5sHI")  # version, row id (40 bits), issue day, server tag
_ROW_BYTES = 5
_MAC_BYTES = 8
_TOKEN_CHARS = 32  # (_LAYOUT.size + _MAC_BYTES) * 8 / 5
_TOKEN = re.compile(r"[a-z2-7]{32}", re.IGNORECASE)
_BASE32_AS_DIGITS = str.maketrans("abcdefghijklmnopqrstuvwxyz234567", "0123456789abcdefghijklmnopqrstuv")
_RECIPIENT_DIGEST_BYTES = 16
# Odoo's own suffix (Odoo 16 and older, `mail.mail._send`): `<mail.mail id>`, or
# `<mail.mail id>-<model>-<res_id>` for a message posted on a record. At most 18 digits and
# always a `-` or digits only: never 32 base32 characters, so it cannot be taken for our token.
_ODOO_SUFFIX = re.compile(r"\d{1,18}(?:-[a-z0-9_.]+-\d{1,18})?", re.IGNORECASE)


class Sha256Mac:
    """HMAC-SHA256 under one key, keyed once: the same bytes as `hmac.digest(key, message, "sha256")`.

    `hmac.digest` has OpenSSL 3 fetch the digest and key a new context on every call; a copy of an
    HMAC object keyed once costs 0.94 µs against 1.57, and the lookup service verifies a token per
    message. Copying the shared keyed object is safe from several threads (hashlib locks it)."""

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def digest(self, message: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(message)
        return mac.digest()


@dataclass(frozen=True)
class BounceToken:
    row_id: int
    server_tag: int
    issued_day: int

    def issued_at(self) -> float:
        return _EPOCH + self.issued_day * 86400


def server_tag(name: str | None) -> int:
    """A 32-bit tag for a server name (0: no server, Postfix's default route)."""
    if not name:
        return 0
    return int.from_bytes(hashlib.blake2s(name.encode("utf-8"), digest_size=4).digest(), "big") or 1


class TokenSigner:
    """Signs and verifies tokens with the installation's secret and the store's identity.

    The token names a row id, and row ids start again at 1 when a store is lost and made anew:
    a late report on a token of the old store would name a new, unrelated message. The store's
    random identity (made with its schema) is therefore part of what the MAC covers, so such a
    token no longer verifies. Tokens of version 1 (issued before the identity existed) are still
    accepted with the secret alone until they age out."""

    def __init__(self, secret: bytes, store_id: str = ""):
        if len(secret) < 16:
            raise ValueError("the bounce-token secret must hold at least 16 bytes")
        self._legacy_mac = Sha256Mac(secret)
        self._store_mac = Sha256Mac(self._legacy_mac.digest(b"mailgate store " + store_id.encode("ascii"))) \
            if store_id else self._legacy_mac
        self._version = _VERSION if store_id else _LEGACY_VERSION
        self._recipient_mac = Sha256Mac(self._legacy_mac.digest(b"mailgate recipients"))

    def recipient_digest(self, address: str) -> str:
        """The keyed hash a message's recipient is kept as (docs/rules.md B1): enough to know that
        a delivery report names a real recipient, without the store holding recipient lists. The
        key comes from the secret alone (not the store's identity), so that gateways sharing a
        store, and a store copied by `migrate-store`, compute the same digests. The address is
        normalised first, as every address is compared."""
        return self._recipient_mac.digest(
            normalize(address).encode("utf-8", "surrogateescape"))[:_RECIPIENT_DIGEST_BYTES].hex()

    def recipient_digests(self, addresses: Iterable[str]) -> tuple[str, ...]:
        """The digests of a message's recipients, each once, in order."""
        return tuple(dict.fromkeys(self.recipient_digest(address) for address in addresses))


    def make(self, row_id: int, server_name: str | None, now: float) -> str:
        day = max(0, int((now - _EPOCH) // 86400)) & 0xFFFF
        payload = _LAYOUT.pack(self._version, row_id.to_bytes(_ROW_BYTES, "big"), day, server_tag(server_name))
        raw = payload + self._store_mac.digest(payload)[:_MAC_BYTES]
        return base64.b32encode(raw).decode("ascii").rstrip("=").lower()

    def verify(self, token: str) -> BounceToken | None:
        """The token's content when we signed it, else None (forged, truncated, foreign).

        Decoded through an integer rather than base64.b32decode: the lookup service verifies a
        token per message, and this is half the cost."""
        if len(token) != _TOKEN_CHARS or not _TOKEN.fullmatch(token):
            return None
        raw = int(token.lower().translate(_BASE32_AS_DIGITS), 32).to_bytes(_LAYOUT.size + _MAC_BYTES, "big")
        payload, mac = raw[:_LAYOUT.size], raw[_LAYOUT.size:]
        version, row, day, tag = _LAYOUT.unpack(payload)
        if version == _VERSION:
            signer = self._store_mac
        elif version == _LEGACY_VERSION:
            signer = self._legacy_mac
        else:
            return None
        if not hmac.compare_digest(mac, signer.digest(payload)[:_MAC_BYTES]):
            return None
        return BounceToken(int.from_bytes(row, "big"), tag, day)


def split_tokenised(address: str, bounce_alias: str) -> tuple[str, str] | None:
    """(token, domain) when the address is `<bounce_alias>+<token>@<domain>`, else None."""
    local, at, domain = address.rpartition("@")
    alias, plus, token = local.partition("+")
    if not (at and plus and token) or alias.lower() != bounce_alias.lower():
        return None
    return token, domain


def is_odoo_bounce_suffix(suffix: str) -> bool:
    """Whether the part after `<bounce_alias>+` is Odoo's own (`991`, `991-mail.mail-17`,
    `37-res.partner-9`): the bounce address Odoo 16 and older put in mail it sent itself, before
    mailgate tokenised the envelope (docs/rules.md T1)."""
    return _ODOO_SUFFIX.fullmatch(suffix) is not None
