"""Servers bound to socket specs (`mailgate.infra.socketspec`), and the socket files they own.

Every listener of mailgate, the milter (libmilter binds its own) included, goes through these
helpers: unix sockets get the mode and group Postfix needs to
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
from pathlib import Path
from typing import Any

from mailgate.infra.socketspec import SocketSpec

StreamCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class SocketInUseError(OSError):
    """Another process is listening on the unix socket we were asked to bind."""


def socket_is_listening(spec: SocketSpec, timeout: float = 1.0) -> bool:
    """True if something accepts connections at ``spec`` right now."""
    addresses: list[tuple[socket.AddressFamily, str | tuple[Any, ...]]]
    if spec.family == "unix":
        assert spec.path is not None  # a unix spec always has a path
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


def remove_stale_socket(spec: SocketSpec) -> None:
    """Make way for a new unix socket: a file left by a crash goes, a live socket is never stolen."""
    assert spec.path is not None  # a unix spec
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


def secure_socket_file(spec: SocketSpec, mode: int, group: str | None) -> None:
    """Give a freshly bound unix socket the mode and group Postfix connects with (a group that
    does not exist on this host is skipped: the lab and the tests run without one)."""
    if spec.path is None:
        return
    os.chmod(spec.path, mode)
    if group is not None:
        try:
            os.chown(spec.path, -1, grp.getgrnam(group).gr_gid)
        except KeyError:
            pass


def _bind_unix(spec: SocketSpec, mode: int, group: str | None) -> socket.socket:
    assert spec.path is not None  # a unix spec
    remove_stale_socket(spec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(spec.path)
        secure_socket_file(spec, mode, group)
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
) -> asyncio.Server:
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
    assert spec.port is not None  # an inet spec always has a port
    return await loop.create_server(
        protocol_factory, spec.host, spec.port, family=family, reuse_address=True
    )


async def start_stream_server(
    spec: SocketSpec,
    client_connected_cb: StreamCallback,
    *,
    mode: int = 0o660,
    group: str | None = None,
) -> asyncio.Server:
    """``asyncio.start_server``/``start_unix_server`` for a spec, with stale-socket handling and
    the unix socket's ``mode`` and ``group`` (skipped if the group does not exist) set."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), client_connected_cb)

    return await start_protocol_server(spec, factory, mode=mode, group=group)


def bound_spec(spec: SocketSpec, server: asyncio.Server) -> SocketSpec:
    """``spec`` with the port actually bound (differs when ``spec.port`` was 0)."""
    if spec.family == "unix" or spec.port:
        return spec
    port = server.sockets[0].getsockname()[1]
    return SocketSpec(spec.family, host=spec.host, port=port)


def socket_file_identity(spec: SocketSpec) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a unix socket file, to recognise our own file at shutdown."""
    if spec.family != "unix":
        return None
    assert spec.path is not None  # a unix spec
    try:
        st = os.lstat(spec.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def remove_socket_file(spec: SocketSpec, identity: tuple[int, int] | None) -> None:
    """Unlink the socket file if it is still the one we created (a successor may own the path)."""
    if identity is not None and socket_file_identity(spec) == identity:
        assert spec.path is not None  # only a unix spec has a file identity
        try:
            os.unlink(spec.path)
        except FileNotFoundError:
            pass
