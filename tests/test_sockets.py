"""Socket specs (milter convention) and servers bound to them."""

import asyncio
import grp
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.infra.sockets import SocketInUseError, blocked_directory, socket_is_listening, start_stream_server
from mailgate.infra.socketspec import SocketSpec, parse_socket_spec


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("unix:/run/m.sock", SocketSpec("unix", path="/run/m.sock"), "unix:/run/m.sock"),
        ("local:/run/m.sock", SocketSpec("unix", path="/run/m.sock"), "unix:/run/m.sock"),
        ("/run/m.sock", SocketSpec("unix", path="/run/m.sock"), "unix:/run/m.sock"),
        ("inet:10025@127.0.0.1", SocketSpec("inet", host="127.0.0.1", port=10025), "inet:10025@127.0.0.1"),
        ("inet:10025@localhost", SocketSpec("inet", host="localhost", port=10025), "inet:10025@localhost"),
        ("inet:10025", SocketSpec("inet", host="127.0.0.1", port=10025), "inet:10025@127.0.0.1"),
        ("inet:0.0.0.0:65535", SocketSpec("inet", host="0.0.0.0", port=65535), "inet:65535@0.0.0.0"),
        ("INET:1@h", SocketSpec("inet", host="h", port=1), "inet:1@h"),
        ("inet6:10025@::1", SocketSpec("inet6", host="::1", port=10025), "inet6:10025@::1"),
        ("inet6:10025@[::1]", SocketSpec("inet6", host="::1", port=10025), "inet6:10025@::1"),
        ("inet6:10025", SocketSpec("inet6", host="::1", port=10025), "inet6:10025@::1"),
        ("inet6:[fe80::1]:25", SocketSpec("inet6", host="fe80::1", port=25), "inet6:25@fe80::1"),
    ],
)
def test_parse_good(text: str, expected: SocketSpec, canonical: str) -> None:
    spec = parse_socket_spec(text)
    assert spec == expected
    assert str(spec) == canonical
    assert parse_socket_spec(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no family"),
        ("m.sock", "no family"),
        ("tcp:25", "unknown socket family"),
        ("unix:relative/m.sock", "absolute"),
        ("unix:", "absolute"),
        ("unix:/" + "a" * 107, "under 108"),
        ("inet:0@127.0.0.1", "out of range"),
        ("inet:65536", "out of range"),
        ("inet:-1", "invalid port"),
        ("inet:x@127.0.0.1", "invalid port"),
        ("inet:", "invalid port"),
        ("inet:25@", "invalid host"),
        ("inet::25", "invalid host"),
        ("inet:25@a b", "invalid host"),
        ("inet6:[::1]25", "expected inet6"),
        ("inet:２５", "invalid port"),
    ],
)
def test_parse_bad(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_socket_spec(text)


def test_longest_unix_path_accepted() -> None:
    path = "/" + "a" * 106
    assert parse_socket_spec(f"unix:{path}").path == path


def test_postfix_address() -> None:
    assert parse_socket_spec("unix:/r/s").postfix_address() == "unix:/r/s"
    assert parse_socket_spec("inet:25@h").postfix_address() == "inet:h:25"
    assert parse_socket_spec("inet6:25@::1").postfix_address() == "inet:[::1]:25"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """Short path: unix socket paths must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="mg-", dir="/tmp") as d:
        yield Path(d)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(await reader.readline())
        await writer.drain()
    finally:
        writer.close()


async def _roundtrip(spec: SocketSpec) -> bytes:
    if spec.family == "unix":
        reader, writer = await asyncio.open_unix_connection(spec.path)
    else:
        reader, writer = await asyncio.open_connection(spec.host, spec.port)
    writer.write(b"ping\n")
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return line


def test_unix_server_mode_and_group(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/s.sock")

    async def main() -> None:
        server = await start_stream_server(spec, _echo, group="postfix")
        async with server:
            st = os.stat(spec.path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
            try:
                assert st.st_gid == grp.getgrnam("postfix").gr_gid
            except KeyError:
                pass
            assert socket_is_listening(spec)
            assert await _roundtrip(spec) == b"ping\n"

    asyncio.run(main())


def test_unknown_group_skipped_but_mode_applied(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/s.sock")

    async def main() -> None:
        server = await start_stream_server(spec, _echo, mode=0o600, group="no-such-group-mg")
        async with server:
            st = os.stat(spec.path)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_gid == os.getegid()

    asyncio.run(main())


def test_stale_socket_replaced(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(spec.path)
    stale.close()
    assert os.path.exists(spec.path)
    assert not socket_is_listening(spec)

    async def main() -> None:
        async with await start_stream_server(spec, _echo):
            assert await _roundtrip(spec) == b"ping\n"

    asyncio.run(main())


def test_live_listener_refused(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/s.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(spec.path)
        live.listen()
        assert socket_is_listening(spec)
        with pytest.raises(SocketInUseError, match="already listening"):
            asyncio.run(start_stream_server(spec, _echo))
        assert os.path.exists(spec.path)


def test_non_socket_file_not_replaced(sockdir: Path) -> None:
    path = sockdir / "s.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        asyncio.run(start_stream_server(parse_socket_spec(f"unix:{path}"), _echo))
    assert path.read_text() == "precious"


def test_socket_is_listening_when_nothing_there(sockdir: Path) -> None:
    assert not socket_is_listening(parse_socket_spec(f"unix:{sockdir}/none.sock"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inet_server() -> None:
    spec = parse_socket_spec(f"inet:{_free_port()}@127.0.0.1")

    async def main() -> None:
        async with await start_stream_server(spec, _echo):
            assert await asyncio.to_thread(socket_is_listening, spec)
            assert await _roundtrip(spec) == b"ping\n"

    asyncio.run(main())
    assert not socket_is_listening(spec)


def test_inet_port_zero_for_tests() -> None:
    async def main() -> None:
        server = await start_stream_server(SocketSpec("inet", host="127.0.0.1", port=0), _echo)
        async with server:
            port = server.sockets[0].getsockname()[1]
            assert await _roundtrip(SocketSpec("inet", host="127.0.0.1", port=port)) == b"ping\n"

    asyncio.run(main())


@pytest.mark.parametrize(("mode", "group_postfix", "reachable"), [
    (0o755, False, True),    # RuntimeDirectoryMode=0755: others may pass
    (0o750, False, False),   # 0750 mailgate:mailgate: Postfix is locked out
    (0o750, True, True),     # 0750 with group postfix
    (0o700, True, False),
])
@pytest.mark.e2e
def test_blocked_directory_says_what_postfix_finds(mode: int, group_postfix: bool, reachable: bool) -> None:
    """The verdict is checked against the real thing: user postfix connecting to the socket."""
    try:
        postfix = grp.getgrnam("postfix")
    except KeyError:
        pytest.skip("no postfix group")
    base = Path(tempfile.mkdtemp(prefix="mg-dir-", dir="/tmp"))  # /tmp: every level above is passable
    try:
        os.chmod(base, 0o755)
        run = base / "run"
        run.mkdir()
        path = run / "s.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(1)
        os.chmod(path, 0o660)
        os.chown(path, -1, postfix.gr_gid)
        os.chmod(run, mode)
        if group_postfix:
            os.chown(run, -1, postfix.gr_gid)
        assert (blocked_directory(str(path), "postfix") is None) is reachable
        assert blocked_directory(str(path), "postfix") in (None, str(run))
        connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
        as_postfix = subprocess.run(["runuser", "-u", "postfix", "--", sys.executable, "-c", connect, str(path)],
                                    capture_output=True, timeout=30)
        assert (as_postfix.returncode == 0) is reachable, as_postfix.stderr
        listener.close()
    finally:
        shutil.rmtree(base)


def test_blocked_directory_of_an_unknown_group_is_none() -> None:
    assert blocked_directory("/run/x/s.sock", "no-such-group-here") is None
