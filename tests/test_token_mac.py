"""The bounce tokens' MAC (docs/rules.md T1) from an HMAC object keyed once and copied: the same bytes as
the standard library's HMAC, so every token and recipient digest issued before still verifies."""

from __future__ import annotations

import base64
import hmac
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailgate.rules.tokens import Sha256Mac, TokenSigner

SECRET = b"0123456789abcdef-the-installation-secret"
STORE_ID = "5b0e6c1e-store-identity"


@pytest.mark.parametrize("key_length", [0, 16, 32, 63, 64, 65, 100, 200])
def test_the_mac_is_hmac_sha256(key_length):
    key = bytes(range(256))[:key_length] if key_length <= 256 else b"k" * key_length
    mac = Sha256Mac(key)
    for message in (b"", b"x", b"\x02" * 12, b"mailgate store " + STORE_ID.encode(), b"m" * 1000):
        assert mac.digest(message) == hmac.digest(key, message, "sha256")
        assert mac.digest(message) == mac.digest(message)  # the keyed object is left as it was


def hmac_token(key: bytes, version: int, row_id: int, day: int, tag: int) -> str:
    """A token as TokenSigner made it with `hmac.digest` (20 bytes, base32, lower case)."""
    payload = struct.pack(">B5sHI", version, row_id.to_bytes(5, "big"), day, tag)
    return base64.b32encode(payload + hmac.digest(key, payload, "sha256")[:8]).decode().rstrip("=").lower()


def test_tokens_and_digests_are_those_of_the_standard_hmac():
    store_key = hmac.digest(SECRET, b"mailgate store " + STORE_ID.encode(), "sha256")
    signer = TokenSigner(SECRET, STORE_ID)
    made = signer.make(4242, None, 1_700_000_000)
    verified = signer.verify(made)
    assert verified is not None
    assert made == hmac_token(store_key, 2, 4242, verified.issued_day, 0)
    legacy = hmac_token(SECRET, 1, 77, 1500, 9)
    assert signer.verify(legacy) is not None and signer.verify(legacy).row_id == 77
    assert TokenSigner(SECRET).verify(legacy) is not None
    assert signer.verify(hmac_token(b"another secret, 16+ bytes", 2, 4242, 1500, 0)) is None
    recipient_key = hmac.digest(SECRET, b"mailgate recipients", "sha256")
    assert signer.recipient_digest(" Lee@Example.COM ") == \
        hmac.digest(recipient_key, b"lee@example.com", "sha256")[:16].hex()


def test_threads_verifying_at_once_all_get_the_right_answer():
    signer = TokenSigner(SECRET, STORE_ID)
    tokens = [signer.make(n, "transactional", 1_700_000_000) for n in range(1, 201)]

    def rows() -> list[int | None]:
        return [found.row_id if (found := signer.verify(token)) else None for token in tokens]

    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(rows) for _ in range(8)]
    assert all(answer.result() == list(range(1, 201)) for answer in answers)
