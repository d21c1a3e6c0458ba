"""Socketmap server over real sockets, including Postfix's own client (postmap)."""

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.configfile import parse_config
from mailgate.infra.runtime import Runtime
from mailgate.infra.sockets import SocketInUseError, socket_is_listening
from mailgate.infra.socketspec import SocketSpec, parse_socket_spec
from mailgate.policy.lookup import LookupService
from mailgate.policy.netstring import NetstringDecoder, encode
from mailgate.policy.socketmap import SocketmapReply, SocketmapServer
from mailgate.rules import routing
from mailgate.rules.routing import route_for_sender
from mailgate.rules.tokens import TokenSigner
from mailgate.store.sqlite import SQLiteStore


def handler(mapname: str, key: str) -> SocketmapReply:
    if key == "boom":
        raise RuntimeError("handler bug")
    if key == "none":
        return None  # type: ignore[return-value]
    if mapname == "transport" and key == "a@b":
        return SocketmapReply.ok("smtp:[h]:25")
    if mapname == "echo":
        return SocketmapReply.ok(key)
    return SocketmapReply.notfound()


class Client:
    """Blocking socketmap client, like Postfix: one request, then wait for its reply."""

    def __init__(self, spec: SocketSpec) -> None:
        if spec.family == "unix":
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(spec.path)
        else:
            self.sock = socket.create_connection((spec.host, spec.port))
        self.sock.settimeout(5)
        self.decoder = NetstringDecoder()
        self.replies: list[bytes] = []

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def reply(self) -> bytes:
        while not self.replies:
            data = self.sock.recv(65536)
            assert data, "connection closed while waiting for a reply"
            self.replies.extend(self.decoder.feed(data))
        return self.replies.pop(0)

    def query(self, mapname: str, key: str) -> bytes:
        self.send(encode(f"{mapname} {key}".encode()))
        return self.reply()

    def closed(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mg-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(params=["unix", "inet"])
def server(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[SocketmapServer]:
    if request.param == "unix":
        spec = parse_socket_spec(f"unix:{sockdir}/map.sock")
    else:
        spec = SocketSpec("inet", host="127.0.0.1", port=0)
    srv = SocketmapServer(handler, spec, max_request=1000, logger=logging.getLogger("test.socketmap"))
    srv.start_in_thread()
    yield srv
    srv.stop_thread()


@pytest.fixture
def client(server: SocketmapServer) -> Iterator[Client]:
    c = Client(server.address)
    yield c
    c.close()


def test_many_requests_per_connection(client: Client) -> None:
    for _ in range(200):
        assert client.query("transport", "a@b") == b"OK smtp:[h]:25"
        assert client.query("transport", "x@y") == b"NOTFOUND "


def test_pipelined_requests_answered_in_order(client: Client) -> None:
    keys = [f"k{i}" for i in range(500)]
    client.send(b"".join(encode(f"echo {k}".encode()) for k in keys))
    assert [client.reply() for _ in keys] == [f"OK {k}".encode() for k in keys]


def test_heavy_pipelining_with_backpressure(client: Client) -> None:
    """More replies than socket buffers hold: the server must pause reading, not drop or reorder."""
    keys = [f"key-{i:06d}" for i in range(30_000)]
    wire = b"".join(encode(f"echo {k}".encode()) for k in keys)
    sender = threading.Thread(target=client.send, args=(wire,))
    sender.start()
    time.sleep(0.3)
    replies = [client.reply() for _ in keys]
    sender.join()
    assert replies == [f"OK {k}".encode() for k in keys]


def test_request_split_across_writes(client: Client) -> None:
    for byte in encode(b"transport a@b"):
        client.send(bytes([byte]))
    assert client.reply() == b"OK smtp:[h]:25"


def test_key_with_spaces_and_utf8(client: Client) -> None:
    assert client.query("echo", "a b  c") == b"OK a b  c"
    assert client.query("echo", "jos\u00e9@b\u00fccher.de") == "OK jos\u00e9@b\u00fccher.de".encode()
    client.send(encode(b"echo \xff\xfe"))
    assert client.reply() == b"OK \xff\xfe"


def test_empty_key_notfound_and_no_space_perm(client: Client) -> None:
    assert client.query("transport", "") == b"NOTFOUND "
    client.send(encode(b"transport"))
    assert client.reply() == b"PERM malformed request"
    client.send(encode(b" a@b"))
    assert client.reply() == b"PERM malformed request"
    client.send(encode(b""))
    assert client.reply() == b"PERM malformed request"
    assert client.query("transport", "a@b") == b"OK smtp:[h]:25"


def test_handler_exception_temp_and_logged(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="test.socketmap"):
        assert client.query("transport", "boom") == b"TEMP internal error"
        assert client.query("transport", "none") == b"TEMP internal error"
    assert client.query("transport", "a@b") == b"OK smtp:[h]:25"
    failures = [r for r in caplog.records if r.name == "test.socketmap" and r.exc_info]
    assert len(failures) == 2
    assert "handler bug" in str(failures[0].exc_info[1])


def test_malformed_netstring_perm_then_closed(server: SocketmapServer, client: Client) -> None:
    other = Client(server.address)
    try:
        assert client.query("transport", "a@b") == b"OK smtp:[h]:25"
        client.send(encode(b"echo 1") + b"x3:abc,")
        assert client.reply() == b"OK 1"
        assert client.reply() == b"PERM malformed netstring"
        assert client.closed()
        assert other.query("transport", "a@b") == b"OK smtp:[h]:25"
        fresh = Client(server.address)
        assert fresh.query("transport", "a@b") == b"OK smtp:[h]:25"
        fresh.close()
    finally:
        other.close()


def test_missing_comma_perm_then_closed(client: Client) -> None:
    client.send(b"13:transport a@b;")
    assert client.reply() == b"PERM malformed netstring"
    assert client.closed()


def test_oversize_request_perm_then_closed(server: SocketmapServer, client: Client) -> None:
    client.send(b"1001:")
    assert client.reply() == b"PERM request too long"
    assert client.closed()
    fits = Client(server.address)
    try:
        key = "k" * (1000 - len("echo "))
        assert fits.query("echo", key) == f"OK {key}".encode()
    finally:
        fits.close()


def test_peer_disconnect_mid_request_harmless(server: SocketmapServer) -> None:
    c = Client(server.address)
    c.send(b"50:transport")
    c.close()
    c = Client(server.address)
    assert c.query("transport", "a@b") == b"OK smtp:[h]:25"
    c.close()


def test_reply_to_bytes() -> None:
    assert SocketmapReply.ok("smtp:[h]:25").to_bytes() == b"OK smtp:[h]:25"
    assert SocketmapReply.notfound().to_bytes() == b"NOTFOUND "
    assert SocketmapReply.temp("db\r\ndown").to_bytes() == b"TEMP db  down"
    assert SocketmapReply.perm("no\0way").to_bytes() == b"PERM no way"
    assert SocketmapReply.ok("x" * 50).to_bytes(max_reply=10) == b"OK xxxxxxx"
    assert SocketmapReply.ok("\u00e9" * 5).to_bytes(max_reply=6) == "OK \u00e9".encode()
    assert SocketmapReply.ok("").to_bytes() == b"OK "
    with pytest.raises(ValueError):
        SocketmapReply("MAYBE", "x")


def test_long_reply_truncated_to_max_reply(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/r.sock")
    srv = SocketmapServer(lambda m, k: SocketmapReply.ok("v" * 200_000), spec)
    srv.start_in_thread()
    try:
        c = Client(spec)
        assert len(c.query("big", "k")) == 100_000
        c.close()
    finally:
        srv.stop_thread()


def test_idle_connection_closed(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/i.sock")
    srv = SocketmapServer(handler, spec, idle_timeout=0.3)
    srv.start_in_thread()
    try:
        c = Client(spec)
        assert c.query("transport", "a@b") == b"OK smtp:[h]:25"
        assert c.closed()
        c.close()
    finally:
        srv.stop_thread()


def test_start_in_thread_and_stop_thread_clean(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/t.sock")
    before = set(threading.enumerate())
    srv = SocketmapServer(handler, spec, group="postfix")
    srv.start_in_thread()
    assert oct(os.stat(spec.path).st_mode & 0o777) == "0o660"
    with pytest.raises(SocketInUseError):
        SocketmapServer(handler, spec).start_in_thread()
    c = Client(spec)
    assert c.query("transport", "a@b") == b"OK smtp:[h]:25"
    srv.stop_thread()
    assert c.closed()
    c.close()
    assert not os.path.exists(spec.path)
    assert not socket_is_listening(spec)
    assert set(threading.enumerate()) == before
    srv.start_in_thread()
    c = Client(spec)
    assert c.query("transport", "a@b") == b"OK smtp:[h]:25"
    c.close()
    srv.stop_thread()


def test_async_start_close(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/a.sock")

    async def main() -> None:
        srv = SocketmapServer(handler, spec)
        await srv.start()
        reader, writer = await asyncio.open_unix_connection(spec.path)
        writer.write(encode(b"transport a@b") + encode(b"transport c@d"))
        assert await reader.readexactly(len(b"14:OK smtp:[h]:25,")) == b"14:OK smtp:[h]:25,"
        assert await reader.readexactly(len(b"9:NOTFOUND ,")) == b"9:NOTFOUND ,"
        await srv.close()
        assert await reader.read() == b""
        writer.close()

    asyncio.run(main())
    assert not os.path.exists(spec.path)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("postmap") is None, reason="Postfix postmap not installed")
def test_postfix_postmap_client(sockdir: Path) -> None:
    (sockdir / "main.cf").write_text("compatibility_level = 3.6\nmeta_directory = /etc/postfix\n")
    spec = parse_socket_spec(f"unix:{sockdir}/p.sock")
    srv = SocketmapServer(handler, spec)
    srv.start_in_thread()
    try:
        table = f"socketmap:{spec.postfix_address()}:transport"

        def postmap(key: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["postmap", "-c", str(sockdir), "-q", key, table],
                capture_output=True, text=True, timeout=30,
            )

        found = postmap("a@b")
        assert (found.returncode, found.stdout) == (0, "smtp:[h]:25\n"), found.stderr
        missing = postmap("x@y")
        assert (missing.returncode, missing.stdout) == (1, ""), missing.stderr
    finally:
        srv.stop_thread()


# -- the lookup service: answers made once per configuration, redone at reload -------------------

LOOKUP_CONFIG = """\
alias_domain: mycompany.com
aliases:
  sales: {target: "odoo:crm.lead"}
servers:
  - {name: transactional, host: smtp.example.net, port: 587, from_filter: mycompany.com, priority: 10}
  - {name: mass, host: mass.example.net, port: 465, security: tls, priority: 20}
"""
SIGNER_SECRET = b"0123456789abcdef0123456789abcdef"


def lookup_runtime(tmp_path: Path, text: str = LOOKUP_CONFIG) -> Runtime:
    config = parse_config(text, "<test>", check_files=False).config
    return Runtime(config, SQLiteStore(tmp_path / "store.sqlite3"), TokenSigner(SIGNER_SECRET))


def test_lookup_answers_follow_a_reload(tmp_path: Path) -> None:
    runtime = lookup_runtime(tmp_path)
    lookup = LookupService(runtime)
    token = f"bounce+{runtime.signer.make(7, 'mass', 1_800_000_000)}@mycompany.com"
    for _ in range(2):  # the second round is answered from the per-configuration views
        assert lookup("transport", token) == SocketmapReply.ok("mg-mass:[mass.example.net]:465")
        assert lookup("transport", "odoo@mycompany.com") == SocketmapReply.ok("mg-transactional:[smtp.example.net]:587")
        assert lookup("transport", "<>") == SocketmapReply.notfound()
        assert lookup("delivery", "sales@mycompany.com") == SocketmapReply.ok("mailgate-odoo:sales")
        assert lookup("delivery", "support@mycompany.com") == SocketmapReply.notfound()
    runtime.config = parse_config(LOOKUP_CONFIG.replace("mass.example.net", "bulk.example.net")
                                  .replace("sales:", "support:"), "<test>", check_files=False).config
    assert lookup("transport", token) == SocketmapReply.ok("mg-mass:[bulk.example.net]:465")
    assert lookup("delivery", "sales@mycompany.com") == SocketmapReply.notfound()
    assert lookup("delivery", "support@mycompany.com") == SocketmapReply.ok("mailgate-odoo:support")
    runtime.store.close()


def test_token_of_a_server_gone_at_reload_routes_by_the_rule(tmp_path: Path) -> None:
    runtime = lookup_runtime(tmp_path)
    token = f"bounce+{runtime.signer.make(7, 'mass', 1_800_000_000)}@mycompany.com"
    assert route_for_sender(runtime.config, runtime.signer, token).reason == "token"
    without_mass = parse_config(LOOKUP_CONFIG.replace("priority: 20", "priority: 20, active: false"),
                                "<test>", check_files=False).config
    route = route_for_sender(without_mass, runtime.signer, token)
    assert (route.server.name, route.reason) == ("transactional", "rule")
    runtime.store.close()


def test_plain_route_cache_is_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(routing, "PLAIN_ROUTE_CACHE_SIZE", 8)
    runtime = lookup_runtime(tmp_path)
    for i in range(50):
        route = route_for_sender(runtime.config, runtime.signer, f"user{i}@mycompany.com")
        assert (route.server.name, route.reason) == ("transactional", "rule")
        assert len(routing.routing_view(runtime.config).plain_routes) <= 8
    assert route_for_sender(runtime.config, runtime.signer, "<>").reason == "null-sender"
    runtime.store.close()


def test_per_config_views_are_per_object() -> None:
    built: list[object] = []

    def build(config: object) -> list[object]:
        built.append(config)
        return [config]

    views = routing.PerConfig(build)
    configs = [parse_config(LOOKUP_CONFIG, "<test>", check_files=False).config for _ in range(6)]
    assert configs[0] == configs[1] and configs[0] is not configs[1]
    assert [views(c)[0] for c in configs] == configs
    assert views(configs[5])[0] is configs[5] and views(configs[2])[0] is configs[2]
    assert len(built) == 6  # equal but distinct objects get their own views; the recent ones are kept


class HeldTokens:
    """What the token keeper holds, for the lookup: a token per server name, or none yet."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens
        self.asked: list[str] = []

    def current(self, server) -> str | None:
        self.asked.append(server.name)
        return self.tokens.get(server.name)


def test_sasl_maps_answer_passwords_and_access_tokens(tmp_path: Path) -> None:
    text = LOOKUP_CONFIG + """\
  - {name: gmail, host: smtp.gmail.com, username: odoo@mycompany.com, auth: xoauth2,
     oauth: {provider: google, client_id: id, refresh_token_file: /nonexistent}}
"""
    runtime = lookup_runtime(tmp_path, text)
    runtime.passwords = {"transactional": ("relay@mycompany.com", "pw:with:colons")}
    lookup = LookupService(runtime)
    password = SocketmapReply.ok("relay@mycompany.com:pw:with:colons")
    assert lookup("sasl-transactional", "[smtp.example.net]:587") == password
    assert lookup("sasl-mass", "[mass.example.net]:465") == SocketmapReply.notfound()
    assert lookup("sasl-gmail", "[smtp.gmail.com]:587") == SocketmapReply.temp(
        "no usable OAuth access token yet: refresh under way")  # no keeper: Postfix defers
    runtime.tokens = held = HeldTokens({})
    assert lookup("sasl-gmail", "[smtp.gmail.com]:587").status == "TEMP"
    held.tokens["gmail"] = "ya29.current"
    assert lookup("sasl-gmail", "[smtp.gmail.com]:587") == SocketmapReply.ok("odoo@mycompany.com:ya29.current")
    assert held.asked == ["gmail", "gmail"]
    runtime.store.close()
