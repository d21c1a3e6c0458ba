"""Out of file descriptors: the limit raised at start, one log line per streak, the open
connections still served, new ones again once descriptors are free (both event loops).

The server runs in a subprocess under a low RLIMIT_NOFILE, so the test process keeps its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# Each test starts a server in a child process: the e2e set.
pytestmark = pytest.mark.e2e

REQUEST = b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=a@b\n\n"
LIMIT = 48

SERVER = textwrap.dedent("""\
    import logging, resource, sys, time
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from mailgate.infra.socketspec import parse_socket_spec
    from mailgate.policy import service
    from mailgate.policy.policyd import PolicyServer
    service.DESCRIPTOR_CHECK_SECONDS = 0.1
    resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))
    server = PolicyServer(lambda request: "DUNNO", parse_socket_spec("unix:{path}"),
                          logger=logging.getLogger("mailgate"))
    server.start_in_thread()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop_thread()
    """)


def ask(sock: socket.socket) -> bytes:
    sock.sendall(REQUEST)
    return sock.recv(100)


def try_connect(path: str) -> socket.socket | None:
    """A served connection, or None when the server reset or refused it."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(0.5)
    try:
        sock.connect(path)
        if ask(sock) == b"action=DUNNO\n\n":
            return sock
    except OSError:
        pass
    sock.close()
    return None


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_out_of_descriptors_logs_once_and_keeps_serving(tmp_path: Path, event_loop: str) -> None:
    path = str(tmp_path / "p.sock")
    env = {**os.environ, "MAILGATE_EVENT_LOOP": event_loop, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-c", SERVER.format(limit=LIMIT, path=path)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    held: list[socket.socket] = []
    try:
        assert server.stdout is not None
        while (line := server.stdout.readline()) and line.strip() != "ready":
            pass
        assert line, "the server did not start"
        first = try_connect(path)
        assert first is not None
        while (sock := try_connect(path)) is not None:  # up to the limit: then one is refused
            held.append(sock)
            assert len(held) < LIMIT, "no connection refused at the descriptor limit"
        time.sleep(1.0)  # the streak lasts: still one line
        assert try_connect(path) is None
        assert ask(first) == b"action=DUNNO\n\n"  # the connections it has are still served
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while (again := try_connect(path)) is None:
            assert time.monotonic() < deadline, "no new connection served after descriptors were freed"
            time.sleep(0.1)
        again.close()
        time.sleep(0.5)
        first.close()
    finally:
        for sock in held:
            sock.close()
        output, _ = server.communicate("", timeout=20)
    lines = output.splitlines()
    exhausted = [line for line in lines if "event=descriptors" in line and "state=exhausted" in line]
    assert len(exhausted) == 1, output[-3000:]
    assert f"limit={LIMIT}" in exhausted[0]
    assert any("event=descriptors" in line and "state=recovered" in line for line in lines), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_serve_raises_the_soft_limit_to_the_hard_one() -> None:
    script = textwrap.dedent("""\
        import logging, resource, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        from mailgate.policy.service import raise_descriptor_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
        print(raise_descriptor_limit(logging.getLogger("mailgate")), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["NOQUEUE: event=descriptors limit=4096", "4096 4096"]
