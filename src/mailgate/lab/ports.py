"""Free loopback TCP ports for the private Postfix listeners.

Postfix's master binds its listeners itself, so the port has to be known before it starts:
ask the kernel for an unused port by binding port 0, then release it. The window between
release and master's bind is tiny on a test box; nothing better exists without socket
passing.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
