"""Netstring framing (``<len>:<payload>,``) as used by Postfix's socketmap protocol.

The decoder is incremental because a socket delivers bytes in arbitrary chunks: one read may
hold half a request or several pipelined ones. It is strict on purpose: once framing is wrong
there is no way to find the next request boundary, so every malformed input raises
``NetstringError`` (and only that) and the caller drops the connection.
"""

from __future__ import annotations

from collections.abc import Iterator

DEFAULT_MAX_LENGTH = 100_000
"""Postfix's default ``socketmap_max_reply``; also a sane bound for requests."""


class NetstringError(ValueError):
    """The byte stream is not a well-formed netstring; framing is lost."""


class NetstringTooLongError(NetstringError):
    """The announced length exceeds the decoder's maximum."""


def encode(payload: bytes) -> bytes:
    """Frame ``payload`` as a netstring."""
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder:
    """Incremental netstring decoder: ``feed`` bytes, iterate complete payloads.

    ``feed`` parses eagerly and returns an iterator over the payloads completed by this chunk.
    A malformed frame is raised by that iterator after the good payloads before it, so a server
    can still answer those first. Errors are detected as early as the bytes allow (a bad length
    prefix is refused before its colon arrives) and are sticky: every later ``feed`` raises the
    same error.

    It sits on the lookup hot path, hence the shape: a chunk that arrives whole is parsed
    straight from one ``bytes`` copy, and a frame arriving in pieces is only re-parsed once the
    announced length is there, so a client dribbling bytes costs linear time, not quadratic.
    """

    __slots__ = ("max_length", "_max_digits", "_buf", "_need", "_error")

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        if max_length < 0:
            raise ValueError("max_length must be >= 0")
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._buf = bytearray()
        self._need = 0
        self._error: NetstringError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not form a complete netstring yet (non-zero at EOF = truncated)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """Buffer ``data`` (copied); return an iterator over the payloads now complete."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return iter(())
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(data)
        payloads: list[bytes] = []
        pos, size, need = 0, len(data), 0
        max_digits, limit = self._max_digits, self.max_length
        while pos < size:
            colon = data.find(b":", pos, pos + max_digits + 1)
            digits = data[pos:colon] if colon >= 0 else data[pos : pos + max_digits + 1]
            # max_digits + 1 digits always exceed the limit, so int() only sees short strings.
            if (
                not digits.isdigit()
                or (digits[0] == 0x30 and len(digits) > 1)
                or int(digits) > limit
            ):
                return self._fail(payloads, self._length_error(digits, colon))
            if colon < 0:
                break
            end = colon + 1 + int(digits)
            if end >= size:
                need = end + 1 - pos
                break
            if data[end] != 0x2C:
                return self._fail(payloads, NetstringError("netstring not terminated by a comma"))
            payloads.append(data[colon + 1 : end])
            pos = end + 1
        if pos < size:
            buf += memoryview(data)[pos:]
            self._need = need
        return iter(payloads)

    def _fail(self, payloads: list[bytes], error: NetstringError) -> Iterator[bytes]:
        self._error = error
        self._buf.clear()
        return _then_raise(payloads, error)

    def _length_error(self, digits: bytes, colon: int) -> NetstringError:
        if not digits:
            return NetstringError("empty netstring length")
        if not digits.isdigit():
            return NetstringError(f"non-digit in netstring length: {digits[:12]!r}")
        if digits[0] == 0x30:
            return NetstringError("leading zero in netstring length")
        return NetstringTooLongError(f"netstring longer than {self.max_length} bytes")


def _then_raise(payloads: list[bytes], error: NetstringError) -> Iterator[bytes]:
    yield from payloads
    raise error
