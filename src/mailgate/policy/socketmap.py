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

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

from mailgate import sockets
from mailgate.policy.netstring import (
    DEFAULT_MAX_LENGTH,
    NetstringDecoder,
    NetstringError,
    NetstringTooLongError,
    encode,
)
from mailgate.sockets import SocketSpec

_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}


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
_MALFORMED_REQUEST = encode(b"PERM malformed request")
_MALFORMED_NETSTRING = encode(b"PERM malformed netstring")
_TOO_LONG = encode(b"PERM request too long")
_INTERNAL_ERROR = encode(b"TEMP internal error")


_READ_BUFFER = 16 * 1024


class _Connection(asyncio.BufferedProtocol):
    """One Postfix client connection; answers every complete request as soon as it arrives."""

    def __init__(self, server: SocketmapServer) -> None:
        self._server = server
        self._handler = server.handler
        self._max_reply = server.max_reply
        self._decoder = NetstringDecoder(server.max_request)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._last_activity = 0.0
        self._view = memoryview(bytearray(_READ_BUFFER))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(transport)
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_later(self._server.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self._transport)
        if self._timer is not None:
            self._timer.cancel()

    def pause_writing(self) -> None:
        """A client pipelining without reading replies: stop reading until it catches up."""
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._transport.resume_reading()

    def _check_idle(self) -> None:
        remaining = self._last_activity + self._server.idle_timeout - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check_idle)
        else:
            self._timer = None
            self._transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._last_activity = self._loop.time()
        replies = []
        try:
            for payload in self._decoder.feed(self._view[:nbytes]):
                replies.append(self._answer(payload))
        except NetstringError as exc:
            reply = _TOO_LONG if isinstance(exc, NetstringTooLongError) else _MALFORMED_NETSTRING
            self._server.logger.warning("socketmap: closing connection: %s", exc)
            replies.append(reply)
            self._transport.write(b"".join(replies))
            self._transport.close()
            return
        if replies:
            self._transport.write(replies[0] if len(replies) == 1 else b"".join(replies))

    def _answer(self, payload: bytes) -> bytes:
        mapname, sep, key = payload.partition(b" ")
        if not sep or not mapname:
            return _MALFORMED_REQUEST
        if not key:
            return _NOTFOUND
        name = mapname.decode("utf-8", "surrogateescape")
        text = key.decode("utf-8", "surrogateescape")
        try:
            return encode(self._handler(name, text).to_bytes(self._max_reply))
        except Exception:
            self._server.logger.exception("socketmap handler failed for %s %r", name, text[:200])
            return _INTERNAL_ERROR


class SocketmapServer:
    """Serves ``handler(mapname, key)`` over the socketmap protocol on ``spec``.

    Runs inside an existing event loop (``start``/``close``) or, next to a blocking main
    program such as libmilter, in its own daemon thread (``start_in_thread``/``stop_thread``).
    """

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
        self.handler = handler
        self.spec = spec
        self.max_request = max_request
        self.max_reply = max_reply
        self.idle_timeout = idle_timeout
        self.mode = mode
        self.group = group
        self.logger = logger or logging.getLogger(__name__)
        self._connections: set[asyncio.BaseTransport] = set()
        self._server: asyncio.AbstractServer | None = None
        self._file_identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> SocketSpec:
        """The spec actually bound (with the real port if ``spec.port`` was 0)."""
        if self._server is None:
            raise RuntimeError("socketmap server is not started")
        return sockets.bound_spec(self.spec, self._server)

    async def start(self) -> None:
        """Bind and start accepting; raises if the socket is unusable (e.g. in use)."""
        self._server = await sockets.start_protocol_server(
            self.spec, lambda: _Connection(self), mode=self.mode, group=self.group
        )
        self._file_identity = sockets.socket_file_identity(self.spec)
        self.logger.info("socketmap server listening on %s", self.address)

    async def close(self) -> None:
        """Stop listening, close live connections, remove our socket file."""
        if self._server is None:
            return
        self._server.close()
        for transport in list(self._connections):
            transport.close()
        await asyncio.sleep(0)
        await self._server.wait_closed()
        self._server = None
        sockets.remove_socket_file(self.spec, self._file_identity)

    def start_in_thread(self, timeout: float = 10.0) -> None:
        """Serve from a daemon thread with its own loop; returns once listening (or raises the
        startup error). The thread blocks the process signals so they reach the main thread,
        where libmilter waits for them."""
        if self._thread is not None:
            raise RuntimeError("socketmap server thread already running")
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                loop.close()
                started.set()
                return
            self._loop = loop
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.close())
                loop.close()

        self._thread = threading.Thread(target=run, name="socketmap", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError("socketmap server thread did not start")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop the thread started by ``start_in_thread`` and wait for it to finish."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError("socketmap server thread did not stop")
        self._thread = self._loop = None
