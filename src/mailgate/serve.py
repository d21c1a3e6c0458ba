"""`mailgate serve`: the milter, the lookup service and the policy service in one process.

libmilter owns the main thread and the process signals (SIGTERM/SIGINT stop it); the socketmap
server runs in its own thread with those signals blocked. When libmilter returns, the other
listeners are closed, so a stop is clean and the sockets disappear.
"""

from __future__ import annotations

import logging
import os
import signal
import socket

from mailgate.logfmt import kv_line
from mailgate.milter.app import serve_milter
from mailgate.policy.lookup import LookupService
from mailgate.policy.policyd import MALFORMED_DEFER, MALFORMED_DUNNO, PolicyServer
from mailgate.policy.recipients import GatewayPolicy
from mailgate.policy.socketmap import SocketmapServer
from mailgate.runtime import Runtime
from mailgate.sockets import parse_socket_spec


def notify_systemd(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, when systemd gave one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def serve(runtime: Runtime) -> int:
    # Blocked before any thread starts, so that every thread inherits the mask and only
    # libmilter's signal thread (which waits for exactly these) receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    config = runtime.config
    logger = logging.getLogger("mailgate")
    for spec in (config.listen.milter, config.listen.lookup, config.listen.policy):
        path = parse_socket_spec(spec).path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
    lookup = SocketmapServer(LookupService(runtime), parse_socket_spec(config.listen.lookup),
                             group=config.listen.socket_group, logger=logger)
    malformed = MALFORMED_DEFER if config.policy.on_malformed == "defer" else MALFORMED_DUNNO
    policy = PolicyServer(GatewayPolicy(runtime), parse_socket_spec(config.listen.policy),
                          on_malformed=malformed, group=config.listen.socket_group, logger=logger)
    lookup.start_in_thread()
    policy.start_in_thread()
    try:
        serve_milter(runtime, config.listen.milter, group=config.listen.socket_group,
                     on_ready=lambda: notify_systemd("READY=1"))
    finally:
        notify_systemd("STOPPING=1")
        policy.stop_thread()
        lookup.stop_thread()
        runtime.store.close()
        logger.info(kv_line(None, event="stopped"))
    return 0
