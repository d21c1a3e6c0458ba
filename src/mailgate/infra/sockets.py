"""Listening socket specs in the milter convention, and servers bound to them.

Admins already write ``unix:/path`` or ``inet:PORT@HOST`` for postsrsd and OpenDKIM, so every
mailgate listener takes the same syntax. Unix sockets get the mode and group Postfix needs to
connect (its daemons run as ``postfix``, not as us) before ``listen()``, so no client ever sees
a socket with the wrong permissions; a stale file left by a crash is replaced, but a socket a
live process still serves is never stolen.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

UNIX_PATH_MAX = 108
"""``sizeof(sun_path)`` on Linux, including the terminating NUL."""

StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class SocketInUseError(OSError):
    """Another process is listening on the unix socket we were asked to bind."""


@dataclass(frozen=True)
class SocketSpec:
    """Where a service listens. ``port`` 0 (only when built directly) means any free port."""

    family: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if self.family == "unix":
            if not self.path or self.host is not None or self.port is not None:
                raise ValueError("a unix socket spec has a path and no host/port")
        elif self.family in ("inet", "inet6"):
            if not self.host or self.port is None or self.path is not None:
                raise ValueError(f"an {self.family} socket spec has a host and a port, no path")
            if not 0 <= self.port <= 65535:
                raise ValueError(f"port {self.port} out of range 1-65535")
        else:
            raise ValueError(f"unknown socket family {self.family!r}")

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"{self.family}:{self.port}@{self.host}"

    def postfix_address(self) -> str:
        """The form Postfix map and service addresses use, e.g. ``socketmap:<this>:name``."""
        if self.family == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.family == "inet6" else self.host
        return f"inet:{host}:{self.port}"


def _parse_port(text: str, spec: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"invalid port {text!r} in socket spec {spec!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535 in socket spec {spec!r}")
    return port


def _parse_host(text: str, family: str, spec: str) -> str:
    if family == "inet6" and text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or any(c.isspace() or c in "[]@/" for c in text):
        raise ValueError(f"invalid host {text!r} in socket spec {spec!r}")
    return text


def _parse_unix(path: str, spec: str) -> SocketSpec:
    if not path.startswith("/"):
        raise ValueError(f"unix socket path must be absolute in socket spec {spec!r}")
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        raise ValueError(
            f"unix socket path is {len(os.fsencode(path))} bytes, must be under {UNIX_PATH_MAX}: {spec!r}"
        )
    if "\0" in path:
        raise ValueError(f"NUL byte in unix socket path {spec!r}")
    return SocketSpec("unix", path=path)


def parse_socket_spec(text: str) -> SocketSpec:
    """Parse ``unix:/p``, ``local:/p``, ``/p``, ``inet:PORT@HOST``, ``inet:PORT``, ``inet:HOST:PORT``,
    ``inet6:PORT@HOST`` (``inet6:PORT`` = ``::1``, ``inet6:[ADDR]:PORT`` also accepted)."""
    spec = text.strip()
    if spec.startswith("/"):
        return _parse_unix(spec, text)
    family, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"socket spec {text!r} has no family (unix:, local:, inet:, inet6:)")
    family = family.lower()
    if family in ("unix", "local"):
        return _parse_unix(rest, text)
    if family not in ("inet", "inet6"):
        raise ValueError(f"unknown socket family {family!r} in socket spec {text!r}")
    default_host = "127.0.0.1" if family == "inet" else "::1"
    if "@" in rest:
        port, _, host = rest.partition("@")
    elif family == "inet6" and rest.startswith("["):
        host, sep, port = rest.rpartition("]:")
        if not sep:
            raise ValueError(f"expected inet6:[ADDR]:PORT in socket spec {text!r}")
        host += "]"
    elif family == "inet" and ":" in rest:
        host, _, port = rest.rpartition(":")
    else:
        port, host = rest, default_host
    return SocketSpec(family, host=_parse_host(host, family, text), port=_parse_port(port, text))


def socket_is_listening(spec: SocketSpec, timeout: float = 1.0) -> bool:
    """True if something accepts connections at ``spec`` right now."""
    if spec.family == "unix":
        addresses = [(socket.AF_UNIX, spec.path)]
    else:
        family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
        try:
            infos = socket.getaddrinfo(spec.host, spec.port, family, socket.SOCK_STREAM)
        except OSError:
            return False
        addresses = [(info[0], info[4]) for info in infos]
    for family, address in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except OSError:
                continue
            return True
    return False


def _remove_stale_socket(spec: SocketSpec) -> None:
    try:
        st = os.lstat(spec.path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{spec.path} exists and is not a socket; refusing to replace it")
    if socket_is_listening(spec):
        raise SocketInUseError(f"another process is already listening on {spec}")
    os.unlink(spec.path)


def blocked_directory(path: str, group: str) -> str | None:
    """The first directory above the socket `path` that a process of `group` cannot pass through
    (by "others" or by that group; an owner's rights serve only its owner), or None. Postfix
    reaches the sockets as user postfix: a socket 0660 group postfix in a directory 0750 of
    another group tempfails every message (a directory made by hand, or a unit with a too tight
    RuntimeDirectoryMode), and Postfix's log says only "Permission denied"."""
    try:
        wanted = grp.getgrnam(group)
    except KeyError:
        return None
    for directory in reversed(Path(os.path.abspath(path)).parents):  # from / down
        st = os.stat(directory)
        if not (st.st_mode & stat.S_IXOTH or (st.st_gid == wanted.gr_gid and st.st_mode & stat.S_IXGRP)):
            return str(directory)
    return None


def _bind_unix(spec: SocketSpec, mode: int, group: str | None) -> socket.socket:
    _remove_stale_socket(spec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(spec.path)
        os.chmod(spec.path, mode)
        if group is not None:
            try:
                os.chown(spec.path, -1, grp.getgrnam(group).gr_gid)
            except KeyError:
                pass
    except BaseException:
        sock.close()
        raise
    return sock


async def start_protocol_server(
    spec: SocketSpec,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    *,
    mode: int = 0o660,
    group: str | None = None,
) -> asyncio.AbstractServer:
    """Like ``start_stream_server`` for a bare ``asyncio.Protocol``: the lean path for hot servers."""
    loop = asyncio.get_running_loop()
    if spec.family == "unix":
        sock = _bind_unix(spec, mode, group)
        try:
            return await loop.create_unix_server(protocol_factory, sock=sock)
        except BaseException:
            sock.close()
            raise
    family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
    return await loop.create_server(
        protocol_factory, spec.host, spec.port, family=family, reuse_address=True
    )


async def start_stream_server(
    spec: SocketSpec,
    client_connected_cb: StreamCallback,
    *,
    mode: int = 0o660,
    group: str | None = None,
) -> asyncio.AbstractServer:
    """``asyncio.start_server``/``start_unix_server`` for a spec, with stale-socket handling and
    the unix socket's ``mode`` and ``group`` (skipped if the group does not exist) set."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), client_connected_cb)

    return await start_protocol_server(spec, factory, mode=mode, group=group)


def bound_spec(spec: SocketSpec, server: asyncio.AbstractServer) -> SocketSpec:
    """``spec`` with the port actually bound (differs when ``spec.port`` was 0)."""
    if spec.family == "unix" or spec.port:
        return spec
    port = server.sockets[0].getsockname()[1]
    return SocketSpec(spec.family, host=spec.host, port=port)


def socket_file_identity(spec: SocketSpec) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a unix socket file, to recognise our own file at shutdown."""
    if spec.family != "unix":
        return None
    try:
        st = os.lstat(spec.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def remove_socket_file(spec: SocketSpec, identity: tuple[int, int] | None) -> None:
    """Unlink the socket file if it is still the one we created (a successor may own the path)."""
    if identity is not None and socket_file_identity(spec) == identity:
        try:
            os.unlink(spec.path)
        except FileNotFoundError:
            pass
