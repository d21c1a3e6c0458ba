"""The milter in a process of its own, started and fed by `mailgate serve`.

libmilter starts a thread that `sigwait()`s for SIGHUP, SIGTERM and SIGINT and stops the milter
on any of them. In the process that systemd signals, a reload (SIGHUP) would then stop the milter
whenever the kernel hands the signal to that thread rather than to ours, which it does as soon
as our thread has a signal still pending (two reloads in quick succession). So libmilter runs
here, in a child that no reload signal is sent to: the parent reloads and passes the new
configuration down a pipe. A second gain: the milter's callbacks no longer share a GIL with the
lookup and policy services.

The pipe carries frames (4-byte length, then a pickled `Config`), parent to child only; the
child answers `ready` on its standard output once its socket listens. The child never outlives
the parent (PR_SET_PDEATHSIG), so a killed gateway leaves no milter behind to serve with a
configuration nobody can reload. Its metrics go to the files `PROMETHEUS_MULTIPROC_DIR` names
(set by the parent when it exports metrics: `mailgate.infra.metrics`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, BinaryIO

from mailgate.config import Config
from mailgate.infra.logfmt import kv_line, setup_logging
from mailgate.infra.socketspec import SocketSpec

_LENGTH = struct.Struct(">I")
READY = b"ready\n"
PR_SET_PDEATHSIG = 1
PARENT_VARIABLE = "MAILGATE_SERVE_PID"
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode, read at its import
LIBMILTER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


class MilterStartError(RuntimeError):
    """The child exited or stayed silent before its socket listened."""


def write_frame(stream: IO[bytes], config: Config) -> None:
    payload = pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def read_frame(stream: BinaryIO) -> Config | None:
    """The next configuration, or None at the end of the pipe (the parent is gone or stopping)."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(head)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return pickle.loads(payload)


class MilterProcess:
    """The parent's handle on the child: start it, reload it, stop it, see whether it died."""

    def __init__(self, config: Config, metrics_files: Path | None = None):
        """`metrics_files`: the directory where the child keeps its metrics (mailgate.infra.metrics);
        None: it counts in memory only, nobody reads them."""
        self.config = config
        self.metrics_files = metrics_files
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        """Start the child and return once its socket listens (MilterStartError otherwise)."""
        env = {key: value for key, value in os.environ.items() if key != METRICS_VARIABLE}
        env[PARENT_VARIABLE] = str(os.getpid())
        if self.metrics_files is not None:
            env[METRICS_VARIABLE] = str(self.metrics_files)
        self.process = subprocess.Popen([sys.executable, "-m", "mailgate.milter.worker"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env)
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            write_frame(self.process.stdin, self.config)
        except OSError:
            pass  # the child already exited: reported below with its status
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if line != READY:
            status = self.stop(timeout=5)
            raise MilterStartError(f"the milter process did not start (exit status {status})")

    def reload(self, config: Config) -> None:
        self.config = config
        if self.alive():
            # alive() saw the process; start() opened its stdin as a pipe
            assert self.process is not None and self.process.stdin is not None
            try:
                write_frame(self.process.stdin, config)
            except OSError:
                pass  # it died just now: the supervisor restarts it with this configuration

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 30) -> int | None:
        """The end of the pipe first: the child stops libmilter and wakes its listener, which
        takes milliseconds (sessions under way finish). SIGTERM, libmilter's own way, waits for
        its accept poll (up to 5 s) and is the fallback; SIGKILL the last resort."""
        process = self.process
        if process is None:
            return None
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        for last_resort in (process.terminate, process.kill):
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                last_resort()
        return process.wait(10)


def stop_libmilter(spec: SocketSpec) -> None:
    """smfi_stop waits for libmilter's accept poll to wake (up to 5 s, holding its lock), so it
    runs in a thread while the listener is woken with connections: a stop takes milliseconds."""
    import milter

    stopper = threading.Thread(target=milter.stop, name="milter-stop", daemon=True)  # type: ignore[attr-defined]
    stopper.start()
    deadline = time.monotonic() + 10
    while stopper.is_alive() and time.monotonic() < deadline:
        _wake_listener(spec)
        stopper.join(0.05)


def _wake_listener(spec: SocketSpec) -> None:
    family = socket.AF_UNIX if spec.family == "unix" else (socket.AF_INET6 if spec.family == "inet6"
                                                          else socket.AF_INET)
    address = spec.path if spec.family == "unix" else (spec.host, spec.port)
    assert address is not None  # a unix spec always has a path
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(address)
    except OSError:
        pass


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if str(os.getppid()) != os.environ.get(PARENT_VARIABLE):  # it died before the line above took effect
        os._exit(1)


def _follow_parent(runtime: object, control: BinaryIO, spec: SocketSpec) -> None:
    """New configurations replace the running one whole; the end of the pipe stops the milter."""
    while (config := read_frame(control)) is not None:
        runtime.config = config  # type: ignore[attr-defined]
    stop_libmilter(spec)


def main() -> int:
    _die_with_parent()
    # Before any thread exists: every thread but libmilter's signal thread blocks these, so a
    # SIGTERM always reaches libmilter (a clean stop) and never Python's default action.
    signal.pthread_sigmask(signal.SIG_BLOCK, LIBMILTER_SIGNALS)
    control = sys.stdin.buffer
    config = read_frame(control)
    if config is None:
        return 1
    logger = setup_logging()
    from mailgate.infra.runtime import Runtime
    from mailgate.milter.app import serve_milter

    try:
        runtime = Runtime.from_config(config)
    except Exception as exc:  # reported in the log; the parent sees the exit status
        logger.error(kv_line(None, event="milter", error=type(exc).__name__, detail=str(exc)))
        return 1
    spec = config.listen.milter
    threading.Thread(target=_follow_parent, args=(runtime, control, spec), name="milter-control",
                     daemon=True).start()

    def ready() -> None:
        os.write(sys.stdout.fileno(), READY)

    try:
        serve_milter(runtime, spec, group=config.listen.socket_group, on_ready=ready)
    except OSError as exc:  # the socket taken or unusable: one line, and the parent sees the status
        logger.error(kv_line(None, event="milter", error=type(exc).__name__, detail=str(exc)))
        return 1
    finally:
        runtime.store.close()
    return 0


if __name__ == "__main__":
    code = main()
    # The control thread is blocked reading the pipe: an interpreter shutdown would abort on
    # its stdin lock ("could not acquire lock for <stdin>"), so the milter process ends here.
    logging.shutdown()
    os._exit(code)
