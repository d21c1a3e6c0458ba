"""Shared pieces of the benchmarks: smtp-sink, `mailgate serve` as a subprocess, the realistic
bench configuration, the Postfix log follower, and /proc readings (RSS, CPU time).

Everything runs on loopback, under one short base directory per benchmark (see
mailgate.lab.postfix.make_basedir), and every process started here is stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from mailgate.infra.sockets import socket_is_listening
from mailgate.infra.socketspec import parse_socket_spec
from mailgate.lab.ports import free_port

BENCH_DIR = Path(__file__).resolve().parent
PYTHON = sys.executable
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SENDER = "odoo@mycompany.com"      # header From = envelope sender (smtp-source writes both)
SUBMISSION_ROLE = "ORIGINATING"


# -- /proc ---------------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """A process and its descendants: `mailgate serve` runs its milter in a child process."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                pending += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return tree


def rss_kib(pid: int) -> int:
    """Resident set size in KiB (VmRSS) of a process and its descendants together."""
    total = 0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    if not total:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by a process and its descendants (all their threads)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def system_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    postfix = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True).stdout.strip()
    return {"nproc": str(os.cpu_count()), "cpu": model, "python": sys.version.split()[0],
            "postfix": postfix or "?"}


# -- processes -----------------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop one process we started (by its pid); escalate to SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class SmtpSink:
    """`smtp-sink -u postfix 127.0.0.1:PORT 256` with its own output file (never a pipe)."""

    def __init__(self, base: Path, name: str = "sink") -> None:
        self.port = free_port()
        self.log = base / f"{name}.out"
        self.proc: subprocess.Popen | None = None

    def start(self) -> SmtpSink:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([SMTP_SINK, "-u", "postfix", f"127.0.0.1:{self.port}", "256"],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not socket_is_listening(parse_socket_spec(f"inet:{self.port}@127.0.0.1")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def bench_config(base: Path, name: str, sink_port: int, *, milter: str | None = None,
                 quota_daily: int | None = 10_000_000) -> Path:
    """A realistic gateway configuration whose three upstream servers are plain (security: none)
    relays into one smtp-sink, each with its own Postfix transport, like a typical Odoo set-up.

    The quota stays on (every outgoing RCPT is counted in SQLite by the policy service) with a
    limit high enough that a benchmark never hits it.
    """
    milter = milter or f"unix:{base}/{name}-milter.sock"
    path = base / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        alias_domain: mycompany.com
        default_from: notifications
        servers:
          - {{name: transactional, host: 127.0.0.1, port: {sink_port}, security: none,
              from_filter: mycompany.com, priority: 10}}
          - {{name: partner, host: 127.0.0.1, port: {sink_port}, security: none,
              from_filter: partner.example, priority: 5}}
          - {{name: mass, host: 127.0.0.1, port: {sink_port}, security: none, from_filter: null, priority: 20}}
        mass_mail: {{server: mass, listeners: [mass]}}
        allowed_alias_domains: [mycompany.com, othercompany.example]
        aliases:
          sales: {{target: "odoo:crm.lead"}}
          support: {{target: "odoo:helpdesk.ticket"}}
        quota: {{daily: {quota_daily if quota_daily is not None else "null"}, scope: sender_domain}}
        listen:
          milter: "{milter}"
          lookup: "unix:{base}/{name}-lookup.sock"
          policy: "unix:{base}/{name}-policy.sock"
          socket_group: postfix
        database: {name}-state/mailgate.sqlite3
        secret_file: {name}-secret
        """))
    return path


@dataclass
class Serve:
    """`mailgate serve --config PATH` as a subprocess (optionally through bench/_serve.py, which
    can apply an experimental patch first). Output goes to a log file next to the config."""

    config_path: Path
    wrapper_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.config_path.with_suffix(".log")

    def start(self) -> Serve:
        from mailgate.configfile import load_config
        config = load_config(self.config_path).config
        if self.wrapper_args:
            argv = [PYTHON, str(BENCH_DIR / "_serve.py"), *self.wrapper_args, "serve", "--config",
                    str(self.config_path)]
        else:
            argv = [PYTHON, "-m", "mailgate", "serve", "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        specs = [config.listen.milter, config.listen.lookup, config.listen.policy]
        deadline = time.monotonic() + 30
        while not all(socket_is_listening(spec) for spec in specs):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mailgate serve did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


class TrivialMilter:
    """bench/trivial_milter.py on `spec`: pymilter's Milter.Base, every default callback."""

    def __init__(self, base: Path, spec: str, *, nodelay: bool = False, name: str = "trivial",
                 data_reply: bool = False, like_mailgate: bool = False) -> None:
        self.spec = spec
        self.nodelay = nodelay
        self.data_reply = data_reply
        self.like_mailgate = like_mailgate
        self.log = base / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> TrivialMilter:
        argv = [PYTHON, str(BENCH_DIR / "trivial_milter.py"), self.spec] + (["--nodelay"] if self.nodelay else []) \
            + (["--data-reply"] if self.data_reply else []) + (["--like-mailgate"] if self.like_mailgate else [])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not socket_is_listening(parse_socket_spec(self.spec)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"trivial milter did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


# -- the Postfix log -----------------------------------------------------------------------------

class LogFollower:
    """Reads only what was appended to the maillog since the last call (cheap to poll)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [line.decode(errors="replace") for line in lines]


def smtp_source(port: int, count: int, recipient: str, output: Path, *, sessions: int = 10, size: int = 2000,
                sender: str = SENDER) -> subprocess.Popen:
    """The load generator of postfix-testing.md: `smtp-source -s 10 -m N -l 2000 -f FROM -t TO`.
    Its output goes to a file: a pipe nobody reads would stall it once errors fill the pipe."""
    with open(output, "ab") as out:
        return subprocess.Popen([SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size), "-f",
                                 sender, "-t", recipient, f"127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * (len(sorted_values) - 1)))))
    return sorted_values[index]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def start_pyspy(pid: int, output: Path, flags: list[str]) -> subprocess.Popen:
    """`py-spy record` of a process into `output` (raw stacks for pyspy_summary.py, 250 samples a
    second, `flags` added). The caller gives it a second to attach before the load starts."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([pyspy, "record", "-p", str(pid), "-r", "250", *flags, "-f", "raw", "-o", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_pyspy(spy: subprocess.Popen) -> None:
    """Stop py-spy the way its Ctrl-C does, so that it writes its file."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
