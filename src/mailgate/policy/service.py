"""What the socketmap and policy servers share: the listener's life and the connection's.

Both are asyncio servers next to a main thread that owns the process signals (`mailgate serve`):
`start_in_thread` runs each loop in a daemon thread of its own with those signals blocked, so
that a policy request waiting on the store (the GIL released) never holds up a lookup. Both protocols
read into a preallocated buffer (`asyncio.BufferedProtocol`), close idle connections, and stop
reading from a client that pipelines without reading its replies.

The loop is uvloop's when it is installed: a lookup's own work is a few microseconds, and the
loop's machinery per request (wake up, read, write) is as much again; uvloop (libuv, in C) does
it for less than asyncio's selector loop (bench/RESULTS-services.md has the figures).
`MAILGATE_EVENT_LOOP=asyncio` keeps the standard loop, to compare or to rule uvloop out.

File descriptors: Postfix keeps one connection per smtpd, cleanup and qmgr process, so a busy
gateway holds thousands. `serve` raises the soft limit to the hard one (`raise_descriptor_limit`;
the unit sets LimitNOFILE). When they run out anyway, neither loop tells: libuv accepts and at
once closes each new connection (its reserved-descriptor trick), asyncio logs a traceback per
attempt and retries a second later. Both keep serving the connections they have, and so does
mailgate; `DescriptorWatch` makes it one `event=descriptors` line per streak instead of silence
or a flood.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import threading
from typing import Any, cast

from mailgate.infra import sockets
from mailgate.infra.logfmt import kv_line
from mailgate.infra.socketspec import SocketSpec

BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
READ_BUFFER = 16 * 1024
EVENT_LOOP_VARIABLE = "MAILGATE_EVENT_LOOP"
DESCRIPTOR_CHECK_SECONDS = 2.0
DESCRIPTOR_MARGIN = 8
"""Within this many of the limit, new connections are (or are about to be) refused."""
OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE}


def raise_descriptor_limit(logger: logging.Logger | None = None) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's LimitNOFILE), log the limit
    once, and return it: the default soft limit (1024) is far below what Postfix's connections
    to a busy gateway need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. above the kernel's nr_open: keep the soft limit
            pass
    if logger is not None:
        logger.info(kv_line(None, event="descriptors", limit=soft))
    return soft


def open_descriptors() -> int:
    """How many descriptors the process has open (Linux: /proc/self/fd)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError as exc:  # none left even to look: at the limit
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0] if exc.errno in OUT_OF_DESCRIPTORS else 0


class DescriptorWatch:
    """One log line when a service runs out of descriptors, one when it has them again.

    Seen two ways: asyncio's accept loop reports EMFILE/ENFILE to the loop's exception handler
    (which would otherwise log a traceback per attempt); libuv reports nothing, so a timer
    compares the open descriptors with the limit every few seconds."""

    def __init__(self, service: str, logger: logging.Logger) -> None:
        self.service = service
        self.logger = logger
        self.exhausted = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        default = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in OUT_OF_DESCRIPTORS:
                self.out_of_descriptors(exc.strerror or str(exc))
            elif default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        self._schedule(loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_later(DESCRIPTOR_CHECK_SECONDS, self._check, loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        used = open_descriptors()
        if used >= soft - DESCRIPTOR_MARGIN:
            self.out_of_descriptors("near the limit", used, soft)
        elif self.exhausted:
            self.exhausted = False
            self.logger.info(kv_line(None, event="descriptors", service=self.service, state="recovered",
                                     open=used, limit=soft))
        self._schedule(loop)

    def out_of_descriptors(self, detail: str, used: int | None = None, soft: int | None = None) -> None:
        """The start of a streak is logged; the rest of it is not."""
        if self.exhausted:
            return
        self.exhausted = True
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if soft is None else soft
        self.logger.error(kv_line(None, event="descriptors", service=self.service, state="exhausted",
                                  open=open_descriptors() if used is None else used, limit=soft, detail=detail,
                                  effect="new connections refused, open ones served"))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A loop for a service thread: uvloop's when importable, unless the environment asks for
    the standard one."""
    if os.environ.get(EVENT_LOOP_VARIABLE, "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class StreamService:
    """A listener on `spec` whose connections are made by `connection()`."""

    name = "service"

    def __init__(self, spec: SocketSpec, *, idle_timeout: float = 300.0, mode: int = 0o660,
                 group: str | None = None, logger: logging.Logger | None = None) -> None:
        self.spec = spec
        self.idle_timeout = idle_timeout
        self.mode = mode
        self.group = group
        self.logger = logger or logging.getLogger(__name__)
        self.connections: set[asyncio.BaseTransport] = set()
        self._server: asyncio.Server | None = None
        self._file_identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    @property
    def address(self) -> SocketSpec:
        """The spec actually bound (with the real port if ``spec.port`` was 0)."""
        if self._server is None:
            raise RuntimeError(f"{self.name} server is not started")
        return sockets.bound_spec(self.spec, self._server)

    async def start(self) -> None:
        """Bind and start accepting; raises if the socket is unusable (e.g. in use)."""
        DescriptorWatch(self.name, self.logger).install(asyncio.get_running_loop())
        self._server = await sockets.start_protocol_server(
            self.spec, self.connection, mode=self.mode, group=self.group)
        self._file_identity = sockets.socket_file_identity(self.spec)
        self.logger.info("NOQUEUE: event=listening service=%s socket=%s", self.name, self.address)

    async def close(self) -> None:
        """Stop listening, close live connections, remove our socket file."""
        if self._server is None:
            return
        self._server.close()
        for transport in list(self.connections):
            transport.close()
        await asyncio.sleep(0)
        await self._server.wait_closed()
        self._server = None
        sockets.remove_socket_file(self.spec, self._file_identity)

    def start_in_thread(self, timeout: float = 10.0) -> None:
        """Serve from a daemon thread with its own loop; returns once listening (or raises the
        startup error). The thread blocks the process signals so they reach libmilter."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} server thread already running")
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_SIGNALS)
            loop = new_event_loop()
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

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"{self.name} server thread did not start")
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
            raise TimeoutError(f"{self.name} server thread did not stop")
        self._thread = self._loop = None


class ServiceConnection(asyncio.BufferedProtocol):
    """One client connection: registration, idle timeout, back-pressure, the read buffer."""

    def __init__(self, service: StreamService) -> None:
        self._service = service
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._last_activity = 0.0
        self._view = memoryview(bytearray(READ_BUFFER))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._service.connections.add(transport)
        self._last_activity = self._loop.time()
        self._timer = self._loop.call_later(self._service.idle_timeout, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self._service.connections.discard(self._transport)
        if self._timer is not None:
            self._timer.cancel()

    def pause_writing(self) -> None:
        """A client pipelining without reading replies: stop reading until it catches up."""
        assert self._transport is not None  # the transport calls this only once connected
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        assert self._transport is not None
        self._transport.resume_reading()

    def _check_idle(self) -> None:
        remaining = self._last_activity + self._service.idle_timeout - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check_idle)
        else:
            self._timer = None
            assert self._transport is not None  # the idle timer starts in connection_made
            self._transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view
