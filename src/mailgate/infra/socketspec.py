"""Socket specs in the milter convention: `unix:/path`, `inet:PORT@HOST`, `inet6:PORT@HOST`.

Admins already write these for postsrsd and OpenDKIM, so every mailgate listener takes the same
syntax. The configuration loader parses each spec once into a `SocketSpec`; everything after it
(the listeners, `postfix-config`, the lab) carries that value, never the string.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

SocketFamily = Literal["unix", "inet", "inet6"]

UNIX_PATH_MAX = 108
"""``sizeof(sun_path)`` on Linux, including the terminating NUL."""

@dataclass(frozen=True)
class SocketSpec:
    """Where a service listens. ``port`` 0 (only when built directly) means any free port."""

    family: SocketFamily
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


_NET_FAMILIES: dict[str, Literal["inet", "inet6"]] = {"inet": "inet", "inet6": "inet6"}


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
    net_family = _NET_FAMILIES.get(family)
    if net_family is None:
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
    return SocketSpec(net_family, host=_parse_host(host, family, text), port=_parse_port(port, text))
