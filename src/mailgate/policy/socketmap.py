"""Postfix socketmap server (socketmap_table(5)): netstring requests ``"<map> <key>"`` in,
``OK value`` / ``NOTFOUND `` / ``TEMP reason`` / ``PERM reason`` out.

Built on ``asyncio.BufferedProtocol`` rather than streams: Postfix sends one request at a time
per connection and waits, so per-request overhead is the whole cost. ``buffer_updated`` answers
without a future, a task or an await, and reading into a preallocated buffer avoids the 256 KiB
allocation that plain protocols pay on every ``recv`` (measured: about 3x the server's CPU per
lookup). Every failure is confined to its connection: a handler
error answers ``TEMP`` and keeps the connection, broken framing answers ``PERM`` and closes it
(the next request boundary is unknowable), the listener itself never stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from mailgate.infra.socketspec import SocketSpec
from mailgate.policy.netstring import (
    DEFAULT_MAX_LENGTH,
    NetstringDecoder,
    NetstringError,
    NetstringTooLongError,
    encode,
)
from mailgate.policy.service import ServiceConnection, StreamService
from mailgate.rules.replies import LOOKUP


@dataclass(frozen=True)
class SocketmapReply:
    """One answer; ``to_bytes`` gives the netstring content Postfix expects."""

    status: str
    text: str = ""

    STATUSES: ClassVar[frozenset[str]] = frozenset({"OK", "NOTFOUND", "TEMP", "PERM"})

    def __post_init__(self) -> None:
        if self.status not in self.STATUSES:
            raise ValueError(f"socketmap status must be one of {sorted(self.STATUSES)}")
        if not isinstance(self.text, str):
            raise TypeError("socketmap reply text must be a str")

    @classmethod
    def ok(cls, value: str) -> SocketmapReply:
        return cls("OK", value)

    @classmethod
    def notfound(cls) -> SocketmapReply:
        return cls("NOTFOUND")

    @classmethod
    def temp(cls, reason: str) -> SocketmapReply:
        return cls("TEMP", reason)

    @classmethod
    def perm(cls, reason: str) -> SocketmapReply:
        return cls("PERM", reason)

    def to_bytes(self, max_reply: int = DEFAULT_MAX_LENGTH) -> bytes:
        """Wire content. Line breaks and NULs become spaces (Postfix would cut the value there);
        the text is cut at a UTF-8 character boundary so the content fits ``max_reply``."""
        if self.status == "NOTFOUND":
            return b"NOTFOUND "
        text = self.text
        if "\n" in text or "\r" in text or "\0" in text:
            text = text.replace("\r", " ").replace("\n", " ").replace("\0", " ")
        line = f"{self.status} {text}"
        try:
            data = line.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = line.encode("utf-8", "replace")
        if len(data) > max_reply:
            cut = max(max_reply, len(self.status) + 1)
            while cut < len(data) and data[cut] & 0xC0 == 0x80:
                cut -= 1
            data = data[:cut]
        return data


Handler = Callable[[str, str], SocketmapReply]

_NOTFOUND = encode(b"NOTFOUND ")
_MALFORMED_REQUEST = encode(LOOKUP["malformed_request"].encode())
_MALFORMED_NETSTRING = encode(LOOKUP["malformed_netstring"].encode())
_TOO_LONG = encode(LOOKUP["too_long"].encode())
_INTERNAL_ERROR = encode(LOOKUP["internal_error"].encode())
_WIRE_CACHE_SIZE = 256


class _Connection(ServiceConnection):
    """One Postfix client connection; answers every complete request as soon as it arrives."""

    def __init__(self, server: SocketmapServer) -> None:
        super().__init__(server)
        self._server = server
        self._handler = server.handler
        self._max_reply = server.max_reply
        self._decoder = NetstringDecoder(server.max_request)
        self._wire = server.wire_cache

    def buffer_updated(self, nbytes: int) -> None:
        transport = self._transport
        assert transport is not None  # set by connection_made, before any data arrives
        self._last_activity = self._loop.time()
        replies = []
        try:
            for payload in self._decoder.feed(self._view[:nbytes]):
                replies.append(self._answer(payload))
        except NetstringError as exc:
            reply = _TOO_LONG if isinstance(exc, NetstringTooLongError) else _MALFORMED_NETSTRING
            self._server.logger.warning("socketmap: closing connection: %s", exc)
            replies.append(reply)
            transport.write(b"".join(replies))
            transport.close()
            return
        if replies:
            transport.write(replies[0] if len(replies) == 1 else b"".join(replies))

    def _answer(self, payload: bytes) -> bytes:
        mapname, sep, key = payload.partition(b" ")
        if not sep or not mapname:
            return _MALFORMED_REQUEST
        if not key:
            return _NOTFOUND
        name = mapname.decode("utf-8", "surrogateescape")
        text = key.decode("utf-8", "surrogateescape")
        try:
            reply = self._handler(name, text)
            wire = self._wire.get(reply)
            if wire is None:
                wire = encode(reply.to_bytes(self._max_reply))
                if len(self._wire) >= _WIRE_CACHE_SIZE:
                    self._wire.clear()
                self._wire[reply] = wire
            return wire
        except Exception:
            self._server.logger.exception("socketmap handler failed for %s %r", name, text[:200])
            return _INTERNAL_ERROR


class SocketmapServer(StreamService):
    """Serves ``handler(mapname, key)`` over the socketmap protocol on ``spec``.

    Runs inside an existing event loop (``start``/``close``) or, next to a blocking main
    program such as libmilter, in its own daemon thread (``start_in_thread``/``stop_thread``).
    """

    name = "socketmap"

    def __init__(
        self,
        handler: Handler,
        spec: SocketSpec,
        *,
        max_request: int = DEFAULT_MAX_LENGTH,
        max_reply: int = DEFAULT_MAX_LENGTH,
        idle_timeout: float = 300.0,
        mode: int = 0o660,
        group: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(spec, idle_timeout=idle_timeout, mode=mode, group=group, logger=logger)
        self.handler = handler
        self.max_request = max_request
        self.max_reply = max_reply
        self.wire_cache: dict[SocketmapReply, bytes] = {}
        """Replies already framed: a handler answers from a few shared replies (one route per
        server), so each is encoded once, not once per lookup."""

    def connection(self) -> _Connection:
        return _Connection(self)
