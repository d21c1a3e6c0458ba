"""A private, loopback-only PostgreSQL server for tests (and, later, the PostgreSQL store).

Tests must never touch a system cluster, so each instance gets its own data directory, log
file and unix-socket directory under one base directory, listens on 127.0.0.1 only, on a
free port, and runs with ``fsync=off`` (a throwaway cluster needs no durability). Debian
installs the server binaries under /usr/lib/postgresql/<version>/bin, outside PATH, so the
newest version there is used. PostgreSQL refuses to run as root: as root the cluster is
created and run as the ``postgres`` system user, who must own the data directory and be
able to traverse every parent of the base directory. TCP logins need a random password,
so that other local users cannot reach a cluster whose superuser is trusted.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mailgate.lab.ports import LOOPBACK, free_port
from mailgate.lab.postfix import check_reachable
from mailgate.lab.processes import alive, kill, wait_gone

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
# sun_path holds 108 bytes; PostgreSQL's socket file is <dir>/.s.PGSQL.<port> (5-digit port).
_SOCKET_LIMIT = 107
_SOCKET_NAME = "/.s.PGSQL.65535"
_START_ATTEMPTS = 3


class PostgresError(RuntimeError):
    """A PostgreSQL command failed or the server did not come up; carries the log tail."""


def find_bindir(root: Path = PG_ROOT) -> Path:
    """The bin directory of the newest PostgreSQL installed the Debian way."""
    versions = []
    for candidate in root.glob("*/bin/pg_ctl"):
        version = candidate.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)?", version):
            versions.append((tuple(int(p) for p in version.split(".")), candidate.parent))
    if not versions:
        raise PostgresError(f"no PostgreSQL server under {root}: apt-get install postgresql")
    return max(versions)[1]


class PrivatePostgres:
    """One PostgreSQL cluster under ``basedir``: ``data/``, ``run/`` (socket), ``postgres.log``."""

    def __init__(self, basedir: Path, *, bindir: Path | None = None, system_user: str = "postgres") -> None:
        self.basedir = Path(basedir).absolute()
        self.data_dir = self.basedir / "data"
        self.socket_dir = self.basedir / "run"
        self.logfile = self.basedir / "postgres.log"
        if len(str(self.socket_dir) + _SOCKET_NAME) > _SOCKET_LIMIT:
            raise ValueError(f"basedir {self.basedir} is too long for a unix socket path")
        self.bindir = bindir or find_bindir()
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        # Only root can switch users; an unprivileged caller runs the cluster as itself.
        self._user = pwd.getpwnam(system_user) if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        self._running = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster if needed, start it and wait until it accepts TCP logins."""
        if self._running:
            return
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(_START_ATTEMPTS):
            # A restart keeps its port, so that clients (a gateway's pool) find the server again.
            if not self.port or attempt:
                self.port = free_port()
            self._write_settings()
            result = self._pg_ctl("start", "-l", str(self.logfile), "-w", "-t", "30", check=False)
            if result.returncode == 0:
                break
            # The port found free may have been taken before the server bound it: retry.
            if "could not bind" not in self.log_tail() or attempt == _START_ATTEMPTS - 1:
                raise PostgresError(f"pg_ctl start exited {result.returncode}: "
                                    f"{_output(result)}\n{self.log_tail()}")
        self._running = True
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout=30.0)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """``pg_ctl stop -m fast``, escalating to immediate and SIGKILL; check nothing remains."""
        if not self._running:
            return
        self._running = False
        atexit.unregister(self.stop)
        pid = self.postmaster_pid()
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(timeout)), check=False)
        if result.returncode != 0 and pid is not None and alive(pid):
            self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "10", check=False)
        if not wait_gone(self.processes(), 5.0):
            for stray in self.processes():
                kill(stray)
        leftovers = [p for p in self.processes() if not wait_gone([p], 2.0)]
        if leftovers:
            raise PostgresError(f"PostgreSQL processes {leftovers} survived stop\n{self.log_tail()}")

    def __enter__(self) -> PrivatePostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def postmaster_pid(self) -> int | None:
        """The pid in ``postmaster.pid``, if it names a live process."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def processes(self) -> list[int]:
        """Pids of this cluster's processes: every backend runs with the data directory as cwd."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "cwd") == str(self.data_dir) and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    # -- using it --------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URI for the superuser over TCP (password included)."""
        if not self.port:
            raise PostgresError("the server has not been started")
        return f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{LOOPBACK}:{self.port}/{quote(database)}"

    def create_database(self, name: str) -> None:
        """CREATE DATABASE (it cannot run inside a transaction, hence its own call)."""
        from psycopg import sql
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def execute(self, query: Any, params: Sequence[Any] | None = None,
                database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run SQL (several statements allowed without params) in autocommit; return the last rows."""
        import psycopg
        with psycopg.connect(self.dsn(database), autocommit=True, connect_timeout=10) as conn:
            cursor = conn.execute(query, params)
            rows = cursor.fetchall() if cursor.description else []
            while cursor.nextset():
                rows = cursor.fetchall() if cursor.description else []
            return rows

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log, for error messages."""
        try:
            text = self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return "--- postgres log tail ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- internals -------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        check_reachable(self.basedir, self._user, "PostgreSQL")
        for directory, mode in ((self.data_dir, 0o700), (self.socket_dir, 0o755)):
            directory.mkdir(exist_ok=True)
            os.chmod(directory, mode)
            os.chown(directory, self._user.pw_uid, self._user.pw_gid)
        self.logfile.touch()
        os.chown(self.logfile, self._user.pw_uid, self._user.pw_gid)

    def _initdb(self) -> None:
        pwfile = self.basedir / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.password + "\n")
        os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        try:
            self._run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                       f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                       "-E", "UTF8", "--no-locale", "--no-sync"])
        finally:
            pwfile.unlink(missing_ok=True)

    def _write_settings(self) -> None:
        """postgresql.auto.conf is read last, so these win over initdb's postgresql.conf."""
        settings = {
            "listen_addresses": LOOPBACK, "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "logging_collector": "off", "log_min_messages": "warning",
            "max_connections": "50", "shared_buffers": "32MB",
        }
        text = "".join(f"{key} = '{value}'\n" for key, value in settings.items())
        path = self.data_dir / "postgresql.auto.conf"
        path.write_text(text)
        os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresError(f"no TCP login on port {self.port} in {timeout}s ({exc})\n"
                                        f"{self.log_tail()}") from None
            time.sleep(0.1)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *args], check=check)

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
        if self._user.pw_uid == os.geteuid():
            result = subprocess.run(argv, capture_output=True, cwd=self.basedir)
        else:
            result = subprocess.run(argv, capture_output=True, cwd=self.basedir, user=self._user.pw_uid,
                                    group=self._user.pw_gid, extra_groups=[])
        if check and result.returncode != 0:
            raise PostgresError(f"{' '.join(argv)} exited {result.returncode}: {_output(result)}\n"
                                f"{self.log_tail()}")
        return result


def _output(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode(errors="replace").strip()
