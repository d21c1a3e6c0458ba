"""A private, loopback-only Postfix instance for tests and the demo.

Debian's Postfix is installed without a system instance, so everything here names its
configuration directory explicitly (``-c DIR`` / ``-C DIR``) and keeps config, queue, data
and log under one short base directory. The instance listens only on free 127.0.0.1
ports, relays everything to local sinks, retries quickly, and logs to a plain file so
tests can read delivery results.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from mailgate.lab.ports import LOOPBACK, free_port
from mailgate.lab.processes import alive, kill, wait_gone

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
POSTSUPER = "/usr/sbin/postsuper"
SENDMAIL = "/usr/sbin/sendmail"

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
# Unix socket paths (sun_path) are limited to 108 bytes; the longest one Postfix makes
# under the queue directory is private/<longest service name>.
_SOCKET_LIMIT = 107
_LONGEST_SOCKET = "/private/proxywrite"

# Debian's standard services, unchrooted: a chroot would need copies of /etc files and
# libraries inside the temp dir, and buys nothing on a throwaway instance.
_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
  -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def make_basedir(prefix: str = "mg") -> Path:
    """A fresh, short temp dir under /tmp that user ``postfix`` may traverse.

    ``tempfile.mkdtemp`` makes mode 0700 directories, which lock out Postfix daemons (and
    master, which takes its lock file as ``postfix``); /tmp keeps socket paths short.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def check_reachable(path: Path, user: pwd.struct_passwd, who: str = "Postfix") -> None:
    """Fail early, with a useful message, if ``user`` cannot search every parent of path (the
    daemons of Postfix and PostgreSQL run as their own users, not as root)."""
    for parent in path.parents:
        info = parent.stat()
        if info.st_uid == user.pw_uid:
            ok = info.st_mode & stat.S_IXUSR
        elif info.st_gid == user.pw_gid:
            ok = info.st_mode & stat.S_IXGRP
        else:
            ok = info.st_mode & stat.S_IXOTH
        if not ok:
            raise PermissionError(
                f"user {user.pw_name} cannot traverse {parent} (mode "
                f"{stat.filemode(info.st_mode)}); {who} needs it. chmod 755 it, "
                "or create the base with mailgate.lab.postfix.make_basedir()"
            )


class PostfixError(RuntimeError):
    """A postfix command failed or the instance did not come up; carries the log tail."""


class PrivatePostfix:
    """One Postfix instance under ``basedir``, with one smtpd listener per entry in
    ``listeners`` (name -> ``-o`` overrides) on its own free loopback port."""

    def __init__(
        self,
        basedir: Path,
        listeners: dict[str, dict[str, str]],
        main_cf: dict[str, str] | None = None,
    ) -> None:
        self.basedir = Path(basedir).absolute()
        self.config_dir = self.basedir / "etc"
        self.queue_dir = self.basedir / "spool"
        self.data_dir = self.basedir / "data"
        self.maillog = self.basedir / "maillog"
        if len(str(self.queue_dir) + _LONGEST_SOCKET) > _SOCKET_LIMIT:
            raise ValueError(f"basedir {self.basedir} is too long for unix socket paths")
        self._listeners = {name: dict(opts) for name, opts in listeners.items()}
        self._ports = {name: free_port() for name in self._listeners}
        self._main_cf = dict(main_cf or {})
        self._extra_services: list[str] = []
        self._running = False

    # -- configuration -------------------------------------------------------------

    def default_main_cf(self) -> dict[str, str]:
        """The settings every lab instance starts from (``main_cf`` overrides them)."""
        return {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "mailgate-lab.localdomain",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "smtp_dns_support_level": "disabled",
            "relayhost": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks reject_unauth_destination",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.basedir),
            "queue_run_delay": "10s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "30s",
            "smtputf8_enable": "no",
            "biff": "no",
        }

    def _render_main_cf(self) -> str:
        settings = self.default_main_cf() | self._main_cf
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _render_master_cf(self) -> str:
        lines = [_MASTER_CF]
        for name, opts in self._listeners.items():
            lines.append(f"{LOOPBACK}:{self._ports[name]} inet n - n - - smtpd\n")
            lines.append(f"  -o syslog_name=postfix/{name}\n")
            lines.extend(f"  -o {key}={value}\n" for key, value in opts.items())
        lines.extend(service.rstrip("\n") + "\n" for service in self._extra_services)
        return "".join(lines)

    def _prepare_dirs(self) -> None:
        # Postfix daemons run as user postfix and must traverse every parent directory.
        postfix_user = pwd.getpwnam("postfix")
        self.basedir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.basedir, 0o755)
        check_reachable(self.basedir, postfix_user)
        for directory in (self.config_dir, self.queue_dir):
            directory.mkdir(exist_ok=True)
            os.chown(directory, 0, 0)
            os.chmod(directory, 0o755)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        os.chmod(self.data_dir, 0o700)

    def add_master_service(self, line: str) -> None:
        """Append a raw master.cf entry (continuation lines included).

        Before start() it is rendered with the rest; afterwards it is appended to the live
        master.cf and takes effect on the next reload().
        """
        self._extra_services.append(line)
        if (self.config_dir / "master.cf").exists():
            (self.config_dir / "master.cf").write_text(self._render_master_cf())

    def postconf(self, settings: dict[str, str]) -> None:
        """Edit main.cf in place (``postconf -e``); call reload() for a running instance."""
        self._main_cf.update(settings)
        if not (self.config_dir / "main.cf").exists():
            return
        self._run([POSTCONF, "-c", str(self.config_dir), "-e"]
                  + [f"{k}={v}" for k, v in settings.items()])

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, check it, start master and wait for every listener."""
        if self._running:
            return
        self._prepare_dirs()
        (self.config_dir / "main.cf").write_text(self._render_main_cf())
        (self.config_dir / "master.cf").write_text(self._render_master_cf())
        # `check` also creates the queue subdirectories with the right owners.
        self._run([POSTFIX, "-c", str(self.config_dir), "check"])
        self._run([POSTFIX, "-c", str(self.config_dir), "start"])
        self._running = True
        atexit.register(self.stop)
        try:
            for name in self._listeners:
                self._wait_greeting(name, timeout=20.0)
        except BaseException:
            self.stop()
            raise

    def _wait_greeting(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | str = "no attempt"
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((LOOPBACK, self._ports[name]), timeout=2) as sock:
                    greeting = sock.makefile("rb").readline()
                    if greeting.startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        return
                    last = repr(greeting)
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        raise PostfixError(
            f"listener {name} on port {self._ports[name]} gave no 220 in {timeout}s "
            f"({last})\n{self.log_tail()}"
        )

    def master_pid(self) -> int | None:
        """The pid of this instance's master, if its pid file names a live process."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def processes(self) -> list[int]:
        """Pids of every process of this instance (master exports MAIL_CONFIG=config_dir)."""
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env and alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def stop(self, timeout: float = 10.0) -> None:
        """Stop master and all its children; escalate to ``abort`` and SIGKILL. Idempotent."""
        if not self._running:
            return
        self._running = False
        atexit.unregister(self.stop)
        pid = self.master_pid()
        subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"], capture_output=True)
        if pid is not None and not wait_gone([pid], timeout):
            subprocess.run([POSTFIX, "-c", str(self.config_dir), "abort"], capture_output=True)
            wait_gone([pid], timeout)
        leftovers = self.processes()
        if leftovers and not wait_gone(leftovers, 2.0):
            for stray in self.processes():
                kill(stray)
            wait_gone(leftovers, 2.0)

    def __enter__(self) -> PrivatePostfix:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload(self) -> None:
        """``postfix reload`` and wait until master has logged that it re-read its config."""
        before = self.log_text().count("reload -- version")
        self._run([POSTFIX, "-c", str(self.config_dir), "reload"])
        deadline = time.monotonic() + 10
        while self.log_text().count("reload -- version") <= before:
            if time.monotonic() > deadline:
                raise PostfixError(f"no reload logged\n{self.log_tail()}")
            time.sleep(0.05)

    # -- mail and queue ------------------------------------------------------------

    def port(self, name: str) -> int:
        """The loopback port of listener ``name``."""
        return self._ports[name]

    def sendmail(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Submit through the sendmail command (maildrop -> pickup -> cleanup), not SMTP.

        ``-i`` keeps a line holding a single dot from ending the message early.
        """
        self._run([SENDMAIL, "-C", str(self.config_dir), "-i", "-f", sender, "--",
                   *recipients], input=message)

    def flush(self) -> None:
        """Ask qmgr to retry deferred mail now (``postqueue -f``)."""
        self._run([POSTQUEUE, "-c", str(self.config_dir), "-f"])

    def delete_queue(self) -> None:
        """Drop every queued message (``postsuper -d ALL``): cleanup after a deferral test."""
        self._run([POSTSUPER, "-c", str(self.config_dir), "-d", "ALL"])

    def queue_files(self) -> list[str]:
        """Queue ids of messages not yet delivered, read straight from the queue dirs.

        Read twice: qmgr moves a message from deferred back to active, and one pass that
        reads active before deferred misses a message moved in between; the second pass
        finds it in active."""
        ids: set[str] = set()
        for _ in range(2):
            for queue in QUEUES:
                for _, _, files in os.walk(self.queue_dir / queue):
                    ids.update(files)
        return sorted(ids)

    def wait_queue_empty(self, timeout: float) -> bool:
        """Poll until no message is queued; False if some remain after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.queue_files():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    # -- log -------------------------------------------------------------------------

    def log_text(self) -> str:
        """The whole maillog so far ("" before postlogd has written anything)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the maillog, for error messages."""
        tail = self.log_text().splitlines()[-lines:]
        return "--- maillog tail ---\n" + "\n".join(tail)

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Poll the maillog until ``pattern`` (multiline regex) matches; TimeoutError if not."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not logged in {timeout}s\n{self.log_tail()}")
            time.sleep(0.1)

    def _run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(argv, capture_output=True, **kwargs)
        if result.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}"
                f"{result.stderr.decode(errors='replace')}\n{self.log_tail()}"
            )
        return result
