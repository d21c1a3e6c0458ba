"""`mailgate serve` as systemd runs it: READY=1, SIGHUP reloads (a bad file keeps the old
configuration), SIGTERM stops cleanly and removes the sockets."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from faultlab import wait_until
from mailgate.config import Config
from mailgate.infra.sockets import socket_is_listening
from mailgate.infra.socketspec import parse_socket_spec
from mailgate.lab.postfix import make_basedir
from mailgate.policy.netstring import NetstringDecoder, encode

CONFIG = """
alias_domain: mycompany.com
servers:
  - {{name: first, host: first.example.net, port: 587, from_filter: mycompany.com}}
{extra}
listen: {{milter: "unix:{base}/milter.sock", lookup: "unix:{base}/lookup.sock", policy: "unix:{base}/policy.sock"}}
database: state.sqlite3
secret_file: secret
"""


def lookup(base: Path, key: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(base / "lookup.sock"))
        sock.sendall(encode(f"transport {key}".encode()))
        decoder = NetstringDecoder()
        while True:
            replies = list(decoder.feed(sock.recv(4096)))
            if replies:
                return replies[0].decode()


@pytest.mark.e2e
def test_ready_reload_and_stop():
    base = make_basedir()
    config = base / "mailgate.yaml"
    config.write_text(CONFIG.format(base=base, extra=""))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(base / "notify.sock"))
    notify.settimeout(20)
    log = open(base / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "mailgate", "serve", "--config", str(config)],
                               stdout=log, stderr=log, env={**os.environ, "NOTIFY_SOCKET": str(base / "notify.sock")})
    try:
        assert notify.recv(100) == b"READY=1"
        wait_until(lambda: all(socket_is_listening(parse_socket_spec(f"unix:{base}/{n}.sock"))
                               for n in ("milter", "lookup", "policy")), 20, 0.05, "the three sockets")
        assert lookup(base, "a@other.example").startswith("OK mg-first:")

        config.write_text(CONFIG.format(base=base, extra="  - {name: brand, host: b.example.net, "
                                                         "from_filter: other.example, priority: 1}"))
        process.send_signal(signal.SIGHUP)
        assert notify.recv(100) == b"RELOADING=1" and notify.recv(100) == b"READY=1"
        assert lookup(base, "a@other.example").startswith("OK mg-brand:")

        config.write_text("servers: [oops\n")
        process.send_signal(signal.SIGHUP)
        assert notify.recv(100) == b"RELOADING=1" and notify.recv(100) == b"READY=1"
        assert lookup(base, "a@other.example").startswith("OK mg-brand:"), "the old configuration stays"
        text = (base / "serve.log").read_text()
        assert "event=reload result=refused" in text and "event=reload result=ok" in text

        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert notify.recv(100) == b"STOPPING=1"
        for name in ("milter", "lookup", "policy"):
            assert not (base / f"{name}.sock").exists(), name
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
        notify.close()


def milter_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"mailgate.milter.worker" in Path(f"/proc/{c}/cmdline").read_bytes()]


def gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped counts: it serves nothing)."""
    try:
        return b"(zombie)" in Path(f"/proc/{pid}/status").read_bytes()
    except FileNotFoundError:
        return True


@contextlib.contextmanager
def serving(base: Path | None = None) -> Iterator[tuple[Path, subprocess.Popen]]:
    """`mailgate serve` on a fresh (or the given) directory, its milter process listening."""
    base = base or make_basedir()
    config = base / "mailgate.yaml"
    config.write_text(CONFIG.format(base=base, extra=""))
    with open(base / "serve.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "mailgate", "serve", "--config", str(config)],
                                   stdout=log, stderr=log)
    try:
        wait_until(lambda: socket_is_listening(parse_socket_spec(f"unix:{base}/milter.sock"))
                   and milter_children(process.pid), 20, 0.05, "the milter child and its socket")
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.e2e
def test_the_milter_process_is_restarted_when_it_dies_and_stops_with_serve():
    with serving() as (base, process):
        milter_spec = parse_socket_spec(f"unix:{base}/milter.sock")
        [first] = milter_children(process.pid)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: milter_children(process.pid) not in ([], [first]) and socket_is_listening(milter_spec),
                   20, 0.05, "a new milter child")
        [second] = milter_children(process.pid)
        text = (base / "serve.log").read_text()
        assert "event=milter error=exited status=-9" in text and "event=milter result=restarted" in text
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert gone(second)
        assert not (base / "milter.sock").exists()


@pytest.mark.e2e
def test_a_killed_serve_takes_its_milter_process_with_it():
    with serving() as (_, process):
        [child] = milter_children(process.pid)
        process.kill()
        process.wait(10)
        wait_until(lambda: gone(child), 10, 0.05, "the milter child to exit")


def test_configuration_frames_survive_the_pipe_and_restarts_are_budgeted():
    from mailgate.commands.serve import RestartBudget
    from mailgate.configfile import parse_config
    from mailgate.milter.worker import read_frame, write_frame

    config = parse_config(CONFIG.format(base="/tmp", extra=""), "c.yaml", check_files=False).config
    config.active_servers  # noqa: B018 (a derived view already computed does not travel)
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as writer:
        write_frame(writer, config)
        write_frame(writer, config)
    with os.fdopen(read_end, "rb") as reader:
        assert read_frame(reader) == config and read_frame(reader) == config
        assert read_frame(reader) is None
    budget = RestartBudget(limit=2, window=60)
    assert budget.allow(0) and budget.allow(1) and not budget.allow(2) and budget.allow(70)


@pytest.mark.e2e
def test_serve_purges_rows_past_their_retention_soon_after_start():
    import time as clock

    from mailgate.store.sqlite import SQLiteStore
    from test_store import bounce

    base = make_basedir()
    store = SQLiteStore(base / "state.sqlite3")
    now = clock.time()
    old = store.record_bounce(replace(bounce("old@customer.example"), created_at=now - 400 * 86400))
    recent = store.record_bounce(replace(bounce("new@customer.example"), created_at=now - 86400))
    store.close()
    with serving(base) as (_, process):
        wait_until(lambda: "event=retention" in (base / "serve.log").read_text(), 30, 0.05, "the retention line")
        line = next(entry for entry in (base / "serve.log").read_text().splitlines() if "event=retention" in entry)
        assert "bounces=1" in line, line
    store = SQLiteStore(base / "state.sqlite3")
    try:
        kept = [row["id"] for row in store._rows("select id from bounces")]
    finally:
        store.close()
    assert kept == [recent] and old not in kept


@pytest.mark.e2e
def test_serve_on_a_store_from_before_reasons_judges_the_blacklist_once(monkeypatch):
    """docs/rules.md B3: a v8 store's rule entry made of block-list refusals comes off at the
    first start (logged), one made of unknown users stays; the next start does nothing again."""
    import time as clock

    from mailgate.store import sqlite as sqlite_backend
    from mailgate.store.sqlite import SQLiteStore

    base = make_basedir()
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", sqlite_backend.MIGRATIONS[:8])
    store = SQLiteStore(base / "state.sqlite3")
    now = clock.time()
    for address, status, text in (("good@big.example", "5.7.1", "554 5.7.1 Client host blocked using bl.example"),
                                  ("gone@big.example", "5.1.1", "550 5.1.1 User unknown")):
        ids = [store._scalar("insert into bounces (created_at, recipient, status, action, permanent, reason, "
                             "source, stale, matched) values (?, ?, ?, 'failed', 1, ?, 'dsn', 0, 1) returning id",
                             [now - days * 86400, address, status, text]) for days in (1, 3, 5, 7, 9)]
        store._execute("insert into blacklist (address, added_at, reason, source, bounce_ids) values "
                       "(?, ?, '5 hard bounces', 'rule', ?)", [address, now, ",".join(map(str, ids))])
    store.close()
    monkeypatch.undo()
    logs = []
    for _ in range(2):     # each start writes a fresh serve.log
        with serving(base):
            wait_until(lambda: "event=retention" in (base / "serve.log").read_text(), 30, 0.05, "the retention line")
        logs.append((base / "serve.log").read_text())
    assert [log.count("event=blacklist-reevaluation count=recipient removed=1") for log in logs] == [1, 0], logs
    assert "rcpt=<good@big.example> action=remove reason=re-evaluated" in logs[0]
    store = SQLiteStore(base / "state.sqlite3")
    try:
        assert store.blacklisted(["good@big.example", "gone@big.example"]) == {"gone@big.example"}
    finally:
        store.close()


@pytest.mark.e2e
def test_a_second_serve_on_the_same_sockets_is_one_line_and_exit_1():
    """Issue 15, item 8: the second one says why in one line; the first one goes on serving."""
    with serving() as (base, first):
        second = subprocess.run([sys.executable, "-m", "mailgate", "serve", "--config", str(base / "mailgate.yaml")],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        errors = [line for line in second.stderr.splitlines() if " error=" in line]
        assert "Traceback" not in second.stderr and len(errors) == 1, second.stderr
        assert "event=listen error=SocketInUseError" in errors[0]
        assert f"another process is already listening on unix:{base}/milter.sock" in second.stderr
        assert first.poll() is None and lookup(base, "a@other.example").startswith("OK mg-first:")
        # Only the milter's socket shared: the milter is bound in a child process of its own.
        milter_only = base / "milter-only.yaml"
        milter_only.write_text((base / "mailgate.yaml").read_text().replace("lookup.sock", "lookup2.sock")
                               .replace("policy.sock", "policy2.sock"))
        second = subprocess.run([sys.executable, "-m", "mailgate", "serve", "--config", str(milter_only)],
                                capture_output=True, text=True, timeout=60)
        errors = [line for line in second.stderr.splitlines() if " error=" in line]
        assert second.returncode == 1 and "Traceback" not in second.stderr and len(errors) == 1, second.stderr
        assert f"another process is already listening on unix:{base}/milter.sock" in errors[0]
        assert first.poll() is None


def start_time_config(base: Path, extra: str = "") -> Config:
    """A configuration loaded without its files checked: what `serve` holds when a file changed
    between the load and the start."""
    from mailgate.configfile import parse_config

    text = CONFIG.format(base=base, extra=extra).replace("secret_file: secret", f"secret_file: {base}/secret")
    return parse_config(text, str(base / "mailgate.yaml"), check_files=False).config


def test_a_short_secret_at_start_is_a_config_error(tmp_path):
    """Issue 15, item 6: the start-up reads the files with the checks of `check-config`."""
    from mailgate.configfile import ConfigError
    from mailgate.infra.runtime import Runtime

    (tmp_path / "secret").write_text("short\n")
    (tmp_path / "secret").chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        Runtime.from_config(start_time_config(tmp_path))
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/mailgate.yaml: secret_file: {tmp_path}/secret holds 5 bytes, fewer than 16: "
        "remove it and a new secret is made at the next start"]


def test_a_password_directory_at_start_is_a_config_error(tmp_path):
    from mailgate.configfile import ConfigError
    from mailgate.infra.runtime import Runtime, read_passwords

    (tmp_path / "pw").mkdir()
    config = start_time_config(tmp_path, extra=f"  - {{name: second, host: h.example.net, username: u, "
                                              f"password_file: {tmp_path}/pw}}")
    with pytest.raises(ConfigError) as caught:
        read_passwords(config)
    assert [str(p) for p in caught.value.problems] == [
        f"{tmp_path}/mailgate.yaml: servers[1](second).password_file: {tmp_path}/pw is a directory, "
        "not a regular file"]
    with pytest.raises(ConfigError):
        Runtime.from_config(config)
    assert (tmp_path / "secret").exists(), "the key is made before the passwords are read"
