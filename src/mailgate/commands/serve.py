"""`mailgate serve`: the milter, the lookup service and the policy service in one process.

libmilter treats SIGHUP like SIGTERM (it stops), so it runs in a child process of its own
(`mailgate.milter.worker`) and this process keeps the signals: SIGTERM/SIGINT stop everything
cleanly (the milter first, then the other listeners, then the store), SIGHUP reloads the
configuration in place and hands it to the milter. A new file that does not load is reported and
the running configuration stays. A milter process that dies is started again.

With `listen.metrics` set, an HTTP listener answers `/metrics` and `/healthz`
(`mailgate.commands.servemetrics`); the milter process counts into files of its own there.
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

from mailgate.commands.servemetrics import ServeMetrics
from mailgate.config import Config
from mailgate.configfile import ConfigError, load_config
from mailgate.infra.logfmt import TracebackStreak, kv_line
from mailgate.infra.runtime import Runtime, read_passwords
from mailgate.infra.sockets import SocketInUseError, blocked_directory, socket_is_listening
from mailgate.infra.socketspec import SocketSpec
from mailgate.milter.worker import MilterProcess, MilterStartError
from mailgate.oauth.keeper import TokenKeeper
from mailgate.policy.lookup import LookupService
from mailgate.policy.policyd import MALFORMED_DEFER, MALFORMED_DUNNO, PolicyServer
from mailgate.policy.recipients import GatewayPolicy
from mailgate.policy.service import raise_descriptor_limit
from mailgate.policy.socketmap import SocketmapServer
from mailgate.rules.blacklist import reevaluate_blacklist
from mailgate.rules.replies import EXIT
from mailgate.rules.retention import purge_expired
from mailgate.store.interface import PENDING_REEVALUATION

CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
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


def _warn_if_unreachable(logger: logging.Logger, path: str, group: str | None) -> None:
    blocked = blocked_directory(path, group) if group else None
    if blocked:
        logger.warning(kv_line(None, event="socket", socket=path, group=group, blocked=blocked,
                               warning=f"group {group} cannot pass through {blocked}: Postfix will not reach "
                                       f"the socket (make the directory searchable, e.g. chmod o+x)"))


def _refuse_sockets_in_use(specs: tuple[SocketSpec, ...]) -> None:
    """A second `serve` on the same sockets stops here, before anything starts: the milter's
    socket is bound in the child process, whose failure the parent would only see as an exit
    status."""
    for spec in specs:
        if socket_is_listening(spec):
            raise SocketInUseError(f"another process is already listening on {spec}")


def _start_listeners(listeners: tuple[SocketmapServer, PolicyServer]) -> None:
    """Start each listener's thread; when one cannot listen, stop those already started."""
    started: list[SocketmapServer | PolicyServer] = []
    try:
        for listener in listeners:
            listener.start_in_thread()
            started.append(listener)
    except BaseException:
        for listener in reversed(started):
            listener.stop_thread()
        raise


def reevaluate_once(runtime: Runtime, logger: logging.Logger) -> None:
    """The blacklist judged once more after the migration that gave bounces their reasons
    (docs/rules.md B3): an address listed for bounces that no longer count comes off, each
    one logged. The task is taken first, so that one gateway of several does it."""
    if not runtime.store.take_pending_task(PENDING_REEVALUATION):
        return
    removed = reevaluate_blacklist(runtime.store, runtime.config.bounces, runtime.clock())
    for entry in removed:
        logger.info(kv_line(None, role="blacklist", rcpt=entry.address, action="remove",
                            reason="re-evaluated", verdict=entry.verdict))
    logger.info(kv_line(None, event="blacklist-reevaluation", count=runtime.config.bounces.count,
                        removed=len(removed)))


def serve(runtime: Runtime, config_path: Path | None = None) -> int:
    """Serve until SIGTERM/SIGINT. A socket that cannot be made, or that another process (a
    second `serve`) already listens on, is one log line and exit status 1, not a traceback."""
    config = runtime.config
    logger = logging.getLogger("mailgate")
    raise_descriptor_limit(logger)
    tokens = TokenKeeper(lambda: runtime.config, runtime.clock, logger)
    runtime.tokens = tokens
    lookup = SocketmapServer(LookupService(runtime), config.listen.lookup,
                             group=config.listen.socket_group, logger=logger)
    malformed = MALFORMED_DEFER if config.policy.on_malformed == "defer" else MALFORMED_DUNNO
    policy = PolicyServer(GatewayPolicy(runtime), config.listen.policy,
                          on_malformed=malformed, group=config.listen.socket_group, logger=logger)
    # No signal handlers: the signals stay blocked in every thread (the listeners' threads inherit
    # the mask) and the main loop takes them with sigtimedwait, one at a time. A handler that
    # takes a lock (an Event) re-enters itself under a burst of SIGHUPs.
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
    specs = (config.listen.milter, config.listen.lookup, config.listen.policy)
    metrics: ServeMetrics | None = None
    try:
        _refuse_sockets_in_use(specs)
        for spec in specs:
            if spec.path:
                os.makedirs(os.path.dirname(spec.path), exist_ok=True)
                _warn_if_unreachable(logger, spec.path, config.listen.socket_group)
        metrics = ServeMetrics(runtime)
        _start_listeners((lookup, policy))
    except OSError as exc:  # SocketInUseError, an address in use, a directory it may not make
        logger.error(kv_line(None, event="listen", error=type(exc).__name__, detail=str(exc)))
        if metrics is not None:
            metrics.stop()
        runtime.store.close()
        return EXIT["failure"]
    reevaluate_once(runtime, logger)
    retention = RetentionPass(runtime, logger)
    checkpoints = Checkpoints(runtime, logger)
    milter = MilterProcess(runtime.config, metrics.files)
    restarts = RestartBudget()
    status = EXIT["ok"]
    try:
        metrics.start()
        milter.start()
        tokens.start()
        metrics.milter = milter
        notify_systemd("READY=1")
        retention.start()
        checkpoints.start()
        while True:
            taken = signal.sigtimedwait(CONTROL_SIGNALS, 1.0)
            # Python 3.11 hands back a meaningless siginfo when the wait is interrupted (a
            # debugger's SIGSTOP/SIGCONT) past its deadline: only our signals count.
            number = taken.si_signo if taken is not None and taken.si_signo in CONTROL_SIGNALS else None
            if number in (signal.SIGTERM, signal.SIGINT):
                break
            if number == signal.SIGHUP and config_path is not None:
                reloaded = reload(runtime, config_path, logger)
                metrics.reloaded(reloaded)
                if reloaded:
                    milter.reload(runtime.config)
            if not milter.alive():
                logger.error(kv_line(None, event="milter", error="exited", status=milter.exit_status))
                metrics.milter_died(milter.pid)
                if not restarts.allow(time.monotonic()):
                    logger.error(kv_line(None, event="milter", error="restarting too often", detail="giving up"))
                    status = EXIT["failure"]
                    break
                milter.stop(timeout=5)
                milter = MilterProcess(runtime.config, metrics.files)
                milter.start()
                metrics.milter = milter  # up for /healthz once its socket listens
                metrics.milter_restarted()
                logger.info(kv_line(None, event="milter", result="restarted"))
    except MilterStartError as exc:
        logger.error(kv_line(None, event="milter", error=type(exc).__name__, detail=str(exc)))
        status = EXIT["failure"]
    finally:
        notify_systemd("STOPPING=1")
        milter.stop()
        metrics.stop()
        retention.stop()
        checkpoints.stop()
        tokens.stop()
        policy.stop_thread()
        lookup.stop_thread()
        runtime.store.close()
        logger.info(kv_line(None, event="stopped"))
    return status


class RetentionPass(threading.Thread):
    """Rows older than every window that reads them are deleted soon after start and then every
    hour, in small batches (mailgate.rules.retention): without it the store grows by ~370 bytes a message
    for ever. It runs here, in one place, not in the milter process."""

    def __init__(self, runtime: Runtime, logger: logging.Logger, every: float = 3600.0, first: float = 5.0):
        super().__init__(name="retention", daemon=True)
        self.runtime, self.logger, self.every, self.first = runtime, logger, every, first
        self.stopped = threading.Event()

    def run(self) -> None:
        delay = self.first
        while not self.stopped.wait(delay):
            delay = self.every
            try:
                deleted = purge_expired(self.runtime.store, self.runtime.config, self.runtime.clock())
            except Exception as exc:  # the next pass tries again; serving goes on
                self.logger.error(kv_line(None, event="retention", error=type(exc).__name__, detail=str(exc)))
                continue
            self.logger.info(kv_line(None, event="retention", **deleted))

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(30)


class Checkpoints(threading.Thread):
    """The SQLite WAL checkpointed every second, off every commit's path (`SQLiteStore`'s
    `background_checkpoints`): the milter's and the policy service's commits never wait for a
    disk flush. A failure is logged at the start of a streak; the next pass tries again."""

    def __init__(self, runtime: Runtime, logger: logging.Logger, every: float = 1.0):
        super().__init__(name="checkpoints", daemon=True)
        self.runtime, self.logger, self.every = runtime, logger, every
        self.stopped = threading.Event()
        self.failures = TracebackStreak()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.runtime.store.checkpoint()
            except Exception as exc:
                if self.failures.first(exc):
                    self.logger.error(kv_line(None, event="checkpoint", error=type(exc).__name__, detail=str(exc)))
                continue
            self.failures.succeeded()

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(30)


class RestartBudget:
    """A milter process that dies is started again, but not in a loop: after `limit` restarts
    within `window` seconds `serve` exits non-zero and systemd's own restart policy decides."""

    def __init__(self, limit: int = 5, window: float = 60.0):
        self.limit, self.window = limit, window
        self.times: list[float] = []

    def allow(self, now: float) -> bool:
        self.times = [t for t in self.times if now - t < self.window] + [now]
        return len(self.times) <= self.limit
