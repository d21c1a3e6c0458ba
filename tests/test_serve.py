"""`mailgate serve` as systemd runs it: READY=1, SIGHUP reloads (a bad file keeps the old
configuration), SIGTERM stops cleanly and removes the sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mailgate.lab.postfix import make_basedir
from mailgate.policy.netstring import NetstringDecoder, encode
from mailgate.sockets import parse_socket_spec, socket_is_listening

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


def wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


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
        wait_for(lambda: all(socket_is_listening(parse_socket_spec(f"unix:{base}/{n}.sock"))
                             for n in ("milter", "lookup", "policy")))
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
