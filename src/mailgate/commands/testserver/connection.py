"""The probe's own connection: a socket to the first address that accepts, and smtplib over it."""

from __future__ import annotations

import smtplib
import socket


class Session(smtplib.SMTP):
    """smtplib over a socket connected (and maybe TLS-wrapped) by the probe itself, so that
    connect, TLS and the greeting are separate steps with their own diagnosis."""

    def __init__(self, sock: socket.socket, host: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._ready = sock
        self._host = host  # what smtplib's starttls() verifies the certificate against

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._ready


def connect(infos: list[tuple], timeout: float) -> socket.socket:
    """The first address that accepts, like Postfix trying each A/AAAA record in turn."""
    error: OSError = OSError("no address to connect to")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error
