"""`mailgate serve`: the milter, the lookup service and the policy service in one process.

libmilter treats SIGHUP like SIGTERM (it stops), so it runs in its own thread and the main
thread keeps the signals: SIGTERM/SIGINT stop everything cleanly (smfi_stop, then the other
listeners, then the store), SIGHUP reloads the configuration in place. A new file that does not
load is reported and the running configuration stays. The socket servers run in threads with
those signals blocked; the kernel hands a process signal to the main thread first.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import milter

from mailgate.config import Config
from mailgate.configfile import ConfigError, load_config
from mailgate.logfmt import kv_line
from mailgate.milter.app import serve_milter
from mailgate.policy.lookup import LookupService
from mailgate.policy.policyd import MALFORMED_DEFER, MALFORMED_DUNNO, PolicyServer
from mailgate.policy.recipients import GatewayPolicy
from mailgate.policy.socketmap import SocketmapServer
from mailgate.runtime import Runtime, read_passwords
from mailgate.sockets import parse_socket_spec

# What a reload can change in place; the rest is read once at start (a restart applies it).
RESTART_ONLY = ("listen", "database", "secret_file")


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


def reload(runtime: Runtime, path: Path, logger: logging.Logger) -> bool:
    """Swap in the configuration at `path`; on any problem keep the running one and say why."""
    notify_systemd("RELOADING=1")
    try:
        loaded = load_config(path)
        passwords = read_passwords(loaded.config)
    except ConfigError as exc:
        for problem in exc.problems:
            logger.error(kv_line(None, event="reload", result="refused", problem=str(problem)))
        notify_systemd("READY=1")
        return False
    except OSError as exc:
        logger.error(kv_line(None, event="reload", result="refused", problem=str(exc)))
        notify_systemd("READY=1")
        return False
    new = loaded.config
    for key in RESTART_ONLY:
        if getattr(new, key) != getattr(runtime.config, key):
            logger.warning(kv_line(None, event="reload", key=key, note="changed: applied at the next restart"))
    runtime.config, runtime.passwords = _keep_restart_only(new, runtime.config), passwords
    logger.info(kv_line(None, event="reload", result="ok", servers=len(new.servers), aliases=len(new.aliases)))
    notify_systemd("READY=1")
    return True


def _keep_restart_only(new: Config, old: Config) -> Config:
    return replace(new, **{key: getattr(old, key) for key in RESTART_ONLY})


def _stop_milter(spec: str) -> None:
    """smfi_stop waits for libmilter's accept poll to wake (up to 5 s, holding its lock), so it
    runs in a thread while the listener is woken with connections: a stop takes milliseconds."""
    stopper = threading.Thread(target=milter.stop, name="milter-stop", daemon=True)
    stopper.start()
    deadline = time.monotonic() + 10
    while stopper.is_alive() and time.monotonic() < deadline:
        _wake_listener(spec)
        stopper.join(0.05)


def _wake_listener(spec: str) -> None:
    parsed = parse_socket_spec(spec)
    family = socket.AF_UNIX if parsed.family == "unix" else (socket.AF_INET6 if parsed.family == "inet6"
                                                            else socket.AF_INET)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(parsed.path if parsed.family == "unix" else (parsed.host, parsed.port))
    except OSError:
        pass


def serve(runtime: Runtime, config_path: Path | None = None) -> int:
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
    stop = threading.Event()
    hangups: list[int] = []

    def on_signal(number: int, frame: object) -> None:
        if number == signal.SIGHUP:
            hangups.append(number)
        else:
            stop.set()
        wake.set()

    wake = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    lookup.start_in_thread()
    policy.start_in_thread()
    ready = threading.Event()
    failure: list[BaseException] = []

    def run_milter() -> None:
        try:
            serve_milter(runtime, config.listen.milter, group=config.listen.socket_group, on_ready=ready.set)
        except BaseException as exc:
            failure.append(exc)
        finally:
            ready.set()
            wake.set()

    thread = threading.Thread(target=run_milter, name="libmilter", daemon=True)
    thread.start()
    ready.wait(30)
    if not failure:
        notify_systemd("READY=1")
    try:
        while not stop.is_set() and thread.is_alive():
            wake.wait(1.0)
            wake.clear()
            while hangups:
                hangups.pop()
                if config_path is not None:
                    reload(runtime, config_path, logger)
    finally:
        notify_systemd("STOPPING=1")
        _stop_milter(config.listen.milter)
        thread.join(30)
        policy.stop_thread()
        lookup.stop_thread()
        runtime.store.close()
        logger.info(kv_line(None, event="stopped"))
    if failure:
        logger.error(kv_line(None, event="milter", error=type(failure[0]).__name__, detail=str(failure[0])))
        return 1
    if not stop.is_set():
        # libmilter's own signal thread took a signal meant for us: exit non-zero, so that
        # systemd (Restart=on-failure) brings the gateway back.
        logger.error(kv_line(None, event="milter", error="stopped", detail="libmilter stopped unexpectedly"))
        return 1
    return 0
