"""TCP_NODELAY on the TCP listening sockets libmilter opened in this process.

libmilter (smfi_opensocket) does not expose its listening socket, so it is found among this
process's descriptors. Linux copies TCP_NODELAY from a listening socket to every connection it
accepts, so one setsockopt here covers every Postfix connection. Used by bench/trivial_milter.py
`--nodelay` (bench/throughput.py configuration g): half of the "inet: stall" fix, which mailgate's
own milter has built in (mailgate.milter.app._no_delay); unix sockets are left alone.
"""

from __future__ import annotations

import os
import socket


def set_nodelay_on_listeners() -> list[int]:
    """Set TCP_NODELAY on every listening TCP socket of this process; returns their fds."""
    done = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done.append(fd)
        except OSError:
            pass
        finally:
            sock.close()
    return done
