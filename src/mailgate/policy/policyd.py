"""Postfix SMTP access policy delegation server (SMTPD_POLICY_README): ``name=value`` lines
ending with an empty line in, ``action=<access(5) action>`` and an empty line out.

Postfix asks once per recipient at RCPT time and reuses the connection, so, as in the
socketmap server, per-request overhead is the whole cost: a ``BufferedProtocol`` answers
every complete request from ``buffer_updated`` (no task, no await), or, for a handler that
answers requests together (``answer_all``), at the end of the event loop's turn, with every
other request that arrived in it: under load several at a time, alone otherwise. The wire format
is LF-only like Postfix's own; a request is everything up to the first empty line, so a stray
empty line is an (empty, malformed) request of its own and every complete request gets
exactly one reply, which keeps a confused client's replies in step with its requests.

Failures never reach Postfix as silence (which would cost every SMTP client a policy timeout):
a handler error is answered with a temporary ``DEFER_IF_PERMIT`` and the connection kept. What
is not a policy request (broken lines, a NUL, the wrong request type, a stray empty line, more
than the size limit) is answered once with the configured ``on_malformed`` action and the
connection closed, as the socketmap server does with broken netstrings: Postfix never sends one,
so the client is not Postfix, and nothing after it can be trusted to be in step. An unfinished
request is judged as it arrives, so garbage without an empty line gets its answer at once
instead of holding the connection until the idle timeout.

A handler with ``connection_closed(connection)`` hears of every client connection that ends
while the server runs (the gateway's policy gives back the quota of a transaction that did
not reach its end); requests carry their connection's number.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence

from mailgate.infra.socketspec import SocketSpec
from mailgate.policy.attributes import (
    DEFAULT_MAX_ATTRIBUTES,
    LOG_SNIPPET,
    MalformedRequest,
    PolicyRequest,
    encode_action,
    parse_request,
)
from mailgate.policy.service import ServiceConnection, StreamService
from mailgate.rules.replies import POLICY

MALFORMED_DUNNO = POLICY["malformed_dunno"]
MALFORMED_DEFER = POLICY["malformed_defer"]
INTERNAL_ERROR_ACTION = POLICY["internal_error"]
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024

_REPLY_CACHE_SIZE = 256


Handler = Callable[[PolicyRequest], str]
BatchHandler = Callable[[Sequence[PolicyRequest]], Sequence[str]]
CloseHandler = Callable[[int], None]


def unfinished_request_fault(data: bytes | bytearray, start: int, new: int, max_attributes: int) -> str | None:
    """Why the unfinished request at ``data[start:]`` can no longer become a valid one, or None;
    ``data[new:]`` arrived with this read, the rest was judged before.

    Only what no further byte can repair counts (a NUL, a finished line that breaks the
    protocol, too many finished lines), so the verdict never depends on how the client's bytes
    were cut into reads. Each byte is looked at about once, however the client trickles them."""
    new = max(new, start)
    if data.find(b"\0", new) >= 0:
        return "NUL byte"
    last = data.rfind(b"\n", new)
    if last < 0:
        return None
    if data.count(b"\n", start, last + 1) > max_attributes:
        return f"more than {max_attributes} attributes"
    first = data.rfind(b"\n", start, new) + 1 or start  # the line the new bytes continue
    for line in bytes(data[max(first, start):last]).split(b"\n"):
        if not line.partition(b"=")[0] or b"=" not in line:
            return f"no attribute name or '=' in line {line[:LOG_SNIPPET]!r}"
    return None


class _Connection(ServiceConnection):
    """One Postfix client connection. Complete requests are queued in arrival order, with the
    replies already known (malformed requests) in between; the server answers the queue right
    away, or, for a batching handler, together with every other connection's at the end of the
    loop iteration. Either way each connection gets one write per read, replies in order."""

    def __init__(self, server: PolicyServer) -> None:
        super().__init__(server)
        self._server = server
        self._logger = server.logger
        self._max_bytes = server.max_request_bytes
        self._max_attributes = server.max_attributes
        self._malformed = server._malformed_reply
        self._pending = bytearray()
        self.queue: list[bytes | PolicyRequest] = []
        self.closing = False
        self.number = next(server.connection_numbers)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._pending:
            self._logger.debug("policyd: dropped %d bytes of an unfinished request at close",
                               len(self._pending))
        self._server.connection_ended(self.number)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        self._last_activity = self._loop.time()
        pending = self._pending
        if pending:
            # The terminator may straddle the old and new data: search from its last byte.
            scan = len(pending) - 1
            pending += self._view[:nbytes]
            data: bytes | bytearray = pending
        else:
            scan = 0
            data = bytes(self._view[:nbytes])
        queue = self.queue
        queued = len(queue)
        start = 0
        while not self.closing:
            if data.startswith(b"\n", start):
                queue.append(self._reject(MalformedRequest("empty request")))
                break
            end = data.find(b"\n\n", scan if scan > start else start)
            if end < 0:
                break
            if end + 2 - start > self._max_bytes:
                self._oversize()
                return
            queue.append(self._request(data[start:end]))
            start = end + 2
        if self.closing:  # answered as malformed: what follows is not read
            self._pending = bytearray()
            self._server.dispatch(self)
            return
        if len(data) - start >= self._max_bytes:
            self._oversize()
            return
        if start < len(data):
            fault = unfinished_request_fault(data, start, scan, self._max_attributes)
            if fault is not None:
                queue.append(self._reject(MalformedRequest(fault)))
                self._pending = bytearray()
                self._server.dispatch(self)
                return
        if data is pending:
            del pending[:start]
        elif start < len(data):
            pending += data[start:]
        if len(queue) > queued:
            self._server.dispatch(self)

    def deliver(self, replies: list[bytes]) -> None:
        """Write the replies for everything queued (``replies`` in queue order); close the
        connection if an oversize request asked for it."""
        self.queue = []
        transport = self._transport
        assert transport is not None  # only a connected connection queues requests
        if transport.is_closing():  # the client left while its batch was answered
            return
        if replies:
            transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
        if self.closing:
            transport.close()

    def _oversize(self) -> None:
        self._logger.warning(
            "policyd: request over %d bytes; answering %r and closing the connection",
            self._max_bytes, self._server.on_malformed)
        self._pending = bytearray()
        self.queue.append(self._malformed)
        self.closing = True
        self._server.dispatch(self)

    def _reject(self, exc: MalformedRequest) -> bytes:
        self._logger.warning("policyd: malformed request (%s); answering %r and closing the connection",
                             exc, self._server.on_malformed)
        self.closing = True
        return self._malformed

    def _request(self, block: bytes | bytearray) -> bytes | PolicyRequest:
        try:
            return PolicyRequest(parse_request(block, self._max_attributes), self.number)
        except MalformedRequest as exc:
            return self._reject(exc)


class PolicyServer(StreamService):
    """Serves ``handler(request) -> action`` over the policy delegation protocol on ``spec``.

    A handler that also has ``answer_all(requests) -> actions`` is given, once per turn of the
    event loop, every request that arrived in that turn over all connections: a handler that
    writes per request (the daily quota) can then commit them in one transaction instead of
    one each. Should ``answer_all`` fail for several requests, each is answered alone, so that
    one bad request never costs the others their answer.

    Runs inside an existing event loop (``start``/``close``) or, next to a blocking main
    program such as libmilter, in its own daemon thread (``start_in_thread``/``stop_thread``).
    """

    name = "policy"

    def __init__(
        self,
        handler: Handler,
        spec: SocketSpec,
        *,
        on_malformed: str = MALFORMED_DUNNO,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
        idle_timeout: float = 300.0,
        mode: int = 0o660,
        group: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if not on_malformed.strip():
            raise ValueError("on_malformed must be an access(5) action, e.g. DUNNO")
        if max_request_bytes < 2 or max_attributes < 1:
            raise ValueError("max_request_bytes must be >= 2 and max_attributes >= 1")
        super().__init__(spec, idle_timeout=idle_timeout, mode=mode, group=group, logger=logger)
        self.handler = handler
        self.answer_all: BatchHandler | None = getattr(handler, "answer_all", None)
        self.connection_closed: CloseHandler | None = getattr(handler, "connection_closed", None)
        self.connection_numbers = itertools.count(1)
        self._stopping = False
        self.on_malformed = on_malformed
        self.max_request_bytes = max_request_bytes
        self.max_attributes = max_attributes
        self._malformed_reply = encode_action(on_malformed)
        self._internal_error_reply = encode_action(INTERNAL_ERROR_ACTION)
        self._reply_cache: dict[str, bytes] = {}
        self._waiting: list[_Connection] = []

    def connection(self) -> _Connection:
        return _Connection(self)

    async def close(self) -> None:
        """Stop serving. The connections closed on the way out are not ends the handler hears
        of: Postfix finishes their transactions with whoever serves next."""
        self._stopping = True
        try:
            await super().close()
        finally:
            self._stopping = False

    def connection_ended(self, number: int) -> None:
        """Tell the handler that a client connection ended (never while stopping)."""
        if self.connection_closed is None or self._stopping:
            return
        try:
            self.connection_closed(number)
        except Exception:
            self.logger.exception("policyd: handler failed at the close of connection %d", number)

    def dispatch(self, connection: _Connection) -> None:
        """Answer a connection's queue now, or at the end of this loop turn when batching."""
        if self.answer_all is None:
            self._answer([connection])
            return
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self._answer_waiting)
        if connection not in self._waiting:
            self._waiting.append(connection)

    def _answer_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        self._answer(waiting)

    def _answer(self, connections: list[_Connection]) -> None:
        requests = [item for connection in connections for item in connection.queue
                    if isinstance(item, PolicyRequest)]
        replies = iter(self._replies(requests)) if requests else iter(())
        for connection in connections:
            connection.deliver([item if isinstance(item, bytes) else next(replies) for item in connection.queue])

    def _replies(self, requests: list[PolicyRequest]) -> list[bytes]:
        if self.answer_all is not None:
            try:
                actions = self.answer_all(requests)
                if len(actions) != len(requests):
                    raise TypeError(f"answer_all gave {len(actions)} actions for {len(requests)} requests")
            except Exception:
                if len(requests) == 1:
                    self._log_failure(requests[0])
                    return [self._internal_error_reply]
                self.logger.exception("policyd: answering %d requests together failed; answering each alone",
                                      len(requests))
            else:
                return [self._reply(request, action) for request, action in zip(requests, actions, strict=True)]
        return [self._reply_alone(request) for request in requests]

    def _reply_alone(self, request: PolicyRequest) -> bytes:
        try:
            action = self.handler(request)
        except Exception:
            self._log_failure(request)
            return self._internal_error_reply
        return self._reply(request, action)

    def _reply(self, request: PolicyRequest, action: str) -> bytes:
        try:
            reply = self._reply_cache.get(action)
            if reply is not None:
                return reply
            if not isinstance(action, str) or not action.strip():
                raise TypeError(f"policy handler returned {action!r}, not an action")
        except TypeError:  # not an action, or not even hashable
            self._log_failure(request)
            return self._internal_error_reply
        reply = encode_action(action)
        if len(self._reply_cache) >= _REPLY_CACHE_SIZE:
            self._reply_cache.clear()
        self._reply_cache[action] = reply
        return reply

    def _log_failure(self, request: PolicyRequest) -> None:
        self.logger.exception(
            "policyd: handler failed for instance=%s recipient=%r; answering %r",
            request.instance, request.recipient[:LOG_SNIPPET], INTERNAL_ERROR_ACTION)
