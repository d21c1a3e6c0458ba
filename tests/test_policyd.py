"""Policy delegation server over real sockets, plus fuzzing of its request framing."""

import asyncio
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mailgate.configfile import parse_config
from mailgate.infra.runtime import Runtime
from mailgate.infra.sockets import SocketInUseError, socket_is_listening
from mailgate.infra.socketspec import SocketSpec, parse_socket_spec
from mailgate.policy.attributes import PolicyRequest
from mailgate.policy.policyd import (
    INTERNAL_ERROR_ACTION,
    MALFORMED_DEFER,
    PolicyServer,
    _Connection,
)
from mailgate.policy.recipients import GatewayPolicy
from mailgate.rules.replies import POLICY
from mailgate.rules.tokens import TokenSigner
from mailgate.store import sqlite as sqlite_store
from mailgate.store.sqlite import SQLiteStore
from thoroughness import examples

LOGGER = "test.policyd"
DUNNO = b"action=DUNNO\n\n"
INTERNAL = f"action={INTERNAL_ERROR_ACTION}\n\n".encode()


def handler(req: PolicyRequest) -> str:
    rcpt = req.recipient
    if rcpt == "boom@x":
        raise RuntimeError("handler bug")
    if rcpt == "none@x":
        return None  # type: ignore[return-value]
    if rcpt == "empty@x":
        return ""
    if rcpt == "inject@x":
        return "REJECT a\nb\r\nc\0d\n\naction=OK"
    if rcpt.startswith("echo"):
        return f"OK {rcpt} {req.sender} {req.protocol_state}"
    if rcpt == "no-such@mycompany.com":
        return "550 5.1.1 <no-such@mycompany.com>: no such alias"
    return "DUNNO"


def request(recipient: str = "a@b", **attrs: str) -> bytes:
    """A request as Postfix sends it at RCPT time."""
    fields = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": "192.0.2.1", "client_name": "client.example", "helo_name": "helo.example",
        "sender": "alice@example.org", "recipient": recipient, "recipient_count": "0",
        "queue_id": "", "instance": "1a.2b.3c.0", "size": "0", "sasl_username": "",
    } | attrs
    text = "".join(f"{k}={v}\n" for k, v in fields.items()) + "\n"
    return text.encode("utf-8", "surrogateescape")


class Client:
    """Blocking policy client, like Postfix's: one request, then wait for its reply."""

    def __init__(self, spec: SocketSpec) -> None:
        if spec.family == "unix":
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(spec.path)
        else:
            self.sock = socket.create_connection((spec.host, spec.port))
        self.sock.settimeout(5)
        self.buffer = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def reply(self) -> bytes:
        while b"\n\n" not in self.buffer:
            data = self.sock.recv(65536)
            assert data, f"connection closed while waiting for a reply (have {self.buffer!r})"
            self.buffer += data
        reply, self.buffer = self.buffer.split(b"\n\n", 1)
        return reply + b"\n\n"

    def ask(self, raw: bytes) -> bytes:
        self.send(raw)
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed (a reset counts: closing with unread input resets)."""
        if self.buffer:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mg-", dir="/tmp") as d:
        yield Path(d)


class BatchingHandler:
    """`handler` with `answer_all`, as the gateway's policy has: the server then answers every
    request of one loop turn in one call. Records the size of each call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, req: PolicyRequest) -> str:
        return handler(req)

    def answer_all(self, requests: list[PolicyRequest]) -> list[str]:
        self.batches.append(len(requests))
        return [handler(req) for req in requests]


def make_server(spec: SocketSpec, batching: bool = False, **kwargs: Any) -> PolicyServer:
    return PolicyServer(BatchingHandler() if batching else handler, spec, logger=logging.getLogger(LOGGER),
                        **kwargs)


@pytest.fixture(params=["unix", "inet", "unix-batching"])
def server(request: pytest.FixtureRequest, sockdir: Path) -> Iterator[PolicyServer]:
    if request.param.startswith("unix"):
        spec = parse_socket_spec(f"unix:{sockdir}/policy.sock")
    else:
        spec = SocketSpec("inet", host="127.0.0.1", port=0)
    srv = make_server(spec, batching=request.param.endswith("batching"), max_request_bytes=2000, max_attributes=20)
    srv.start_in_thread()
    yield srv
    srv.stop_thread()


@pytest.fixture
def client(server: PolicyServer) -> Iterator[Client]:
    c = Client(server.address)
    yield c
    c.close()


def test_one_request(client: Client) -> None:
    assert client.ask(request("no-such@mycompany.com")) == (
        b"action=550 5.1.1 <no-such@mycompany.com>: no such alias\n\n")


def echoed(rcpt: str) -> bytes:
    return f"action=OK {rcpt} alice@example.org RCPT\n\n".encode()


def test_many_requests_per_connection(client: Client) -> None:
    for i in range(300):
        assert client.ask(request(f"echo{i}@b")) == echoed(f"echo{i}@b")
        assert client.ask(request("other@b")) == DUNNO


def test_pipelined_requests_answered_in_order(client: Client) -> None:
    n = 500
    client.send(b"".join(request(f"echo{i}@b") for i in range(n)))
    assert [client.reply() for _ in range(n)] == [echoed(f"echo{i}@b") for i in range(n)]


def test_heavy_pipelining_with_backpressure(client: Client) -> None:
    """More replies than socket buffers hold: the server must pause reading, not drop or reorder."""
    n = 20_000
    wire = b"".join(request(f"echo{i}") for i in range(n))
    sender = threading.Thread(target=client.send, args=(wire,))
    sender.start()
    replies = [client.reply() for _ in range(n)]
    sender.join()
    assert replies == [echoed(f"echo{i}") for i in range(n)]


def test_request_split_byte_by_byte(client: Client) -> None:
    for byte in request("echo@b"):
        client.send(bytes([byte]))
    assert client.reply() == echoed("echo@b")


def test_empty_line_is_an_empty_request(server: PolicyServer, client: Client) -> None:
    """A stray empty line is an (empty, malformed) request: the requests before it are answered,
    it gets one reply, and the connection closes before anything after it is read."""
    client.send(request("echo@b") + b"\n" + request("no-such@mycompany.com"))
    assert client.reply() == echoed("echo@b")
    assert client.reply() == DUNNO
    assert client.closed()
    other = Client(server.address)
    assert other.ask(b"\n") == DUNNO and other.closed()
    other.close()


@pytest.mark.parametrize("garbage", [
    bytes(range(256)),                               # binary, with a NUL and line feeds
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello's start: no line feed at all
    b"GET / HTTP/1.1\r\nHost: x\r\n",                # finished lines without '='
], ids=["binary", "tls-hello", "http"])
def test_garbage_without_an_empty_line_is_answered_and_closed(client: Client, garbage: bytes) -> None:
    """Bytes that can never become a policy request get the malformed answer at once and the
    connection closes, instead of waiting silently for an empty line that never comes."""
    client.send(garbage)
    assert client.reply() == DUNNO
    assert client.closed()


def test_duplicate_attribute_last_wins_and_empty_values(client: Client) -> None:
    raw = b"request=smtpd_access_policy\nrecipient=a@b\nrecipient=echo@b\nsender=\nx==y\n\n"
    assert client.ask(raw) == b"action=OK echo@b  \n\n"


@pytest.mark.parametrize("raw", [
    b"request=smtpd_access_policy\nrecipient=echo@b\nno equals sign\n\n",
    b"request=smtpd_access_policy\n=value without a name\n\n",
    b"recipient=echo@b\nsender=a@b\n\n",
    b"request=junk\nrecipient=echo@b\n\n",
    b"REQUEST=smtpd_access_policy\nrecipient=echo@b\n\n",
    b"request=smtpd_access_policy\n" + b"".join(b"a%d=1\n" % i for i in range(20)) + b"\n",
], ids=["no-equals", "empty-name", "no-request", "wrong-request", "name-case", "too-many"])
def test_malformed_answered_once_then_closed(
    server: PolicyServer, client: Client, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a policy request: one answer, then the connection is closed (what followed it is
    never read), as the socketmap does with a broken netstring; the server serves others."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        client.send(raw + request("echo@b"))
        assert client.reply() == DUNNO
        assert client.closed()
    other = Client(server.address)
    assert other.ask(request("echo@c")).startswith(b"action=OK echo@c")
    other.close()
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "malformed" in warnings[0].getMessage()


def test_max_attributes_is_inclusive(client: Client) -> None:
    raw = b"request=smtpd_access_policy\nrecipient=echo@b\n"
    raw += b"".join(b"a%d=1\n" % i for i in range(18)) + b"\n"
    assert client.ask(raw).startswith(b"action=OK echo@b")


def test_malformed_log_line_is_short(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert client.ask(b"x" * 1500 + b"\n\n") == DUNNO
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    message = record.getMessage()
    assert "\n" not in message and len(message) < 300


def test_on_malformed_action_configurable(sockdir: Path) -> None:
    srv = make_server(parse_socket_spec(f"unix:{sockdir}/d.sock"), on_malformed=MALFORMED_DEFER)
    srv.start_in_thread()
    try:
        c = Client(srv.address)
        assert c.ask(b"garbage\n\n") == f"action={MALFORMED_DEFER}\n\n".encode()
        assert c.closed()
        c.close()
    finally:
        srv.stop_thread()


def test_oversize_request_answered_then_closed(server: PolicyServer, client: Client) -> None:
    client.send(request("echo@b") + b"request=smtpd_access_policy\nrecipient=" + b"r" * 3000)
    assert client.reply().startswith(b"action=OK echo@b")
    assert client.reply() == DUNNO
    assert client.closed()
    fits = Client(server.address)
    pad = b"x" * (2000 - len(request("echo@b")) - len(b"pad=\n"))
    wire = request("echo@b")[:-1] + b"pad=" + pad + b"\n\n"
    assert len(wire) == 2000
    assert fits.ask(wire).startswith(b"action=OK echo@b")
    fits.send(wire[:-2] + b"x\n\n")
    assert fits.reply() == DUNNO
    assert fits.closed()
    fits.close()


def test_oversize_without_terminator_is_closed(client: Client) -> None:
    for _ in range(4):
        client.send(b"recipient=" + b"x" * 600 + b"\n")
    assert client.reply() == DUNNO
    assert client.closed()


@pytest.mark.parametrize("rcpt", ["boom@x", "none@x", "empty@x"])
def test_handler_failure_defers_and_keeps_serving(
    client: Client, rcpt: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert client.ask(request(rcpt)) == INTERNAL
    assert client.ask(request("no-such@mycompany.com")).startswith(b"action=550 5.1.1")
    (failure,) = [r for r in caplog.records if r.name == LOGGER and r.exc_info]
    assert rcpt in failure.getMessage()
    if rcpt == "boom@x":
        assert "handler bug" in str(failure.exc_info[1])


def test_non_utf8_bytes_round_trip(client: Client) -> None:
    raw = request("echo\udcff\udcfe@b")
    assert client.ask(raw) == b"action=OK echo\xff\xfe@b alice@example.org RCPT\n\n"
    assert client.ask(b"request=smtpd_access_policy\n\xc3=\x80\nrecipient=echo\n\n").startswith(
        b"action=OK echo")
    assert client.ask(request("jos\u00e9@b\u00fccher.de")) == DUNNO


def test_newlines_in_action_cannot_inject(client: Client) -> None:
    client.send(request("inject@x") + request("x@y"))
    assert client.reply() == b"action=REJECT a b  c d  action=OK\n\n"
    assert client.reply() == DUNNO


def test_partial_request_at_close_dropped(
    server: PolicyServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        c = Client(server.address)
        c.send(request("echo@b") + b"request=smtpd_access_policy\nrecip")
        assert c.reply().startswith(b"action=OK")
        c.close()
        fresh = Client(server.address)
        assert fresh.ask(request("x@y")) == DUNNO
        fresh.close()
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_idle_connection_closed(sockdir: Path) -> None:
    srv = make_server(parse_socket_spec(f"unix:{sockdir}/i.sock"), idle_timeout=0.3)
    srv.start_in_thread()
    try:
        c = Client(srv.address)
        assert c.ask(request("x@y")) == DUNNO
        assert c.closed()
        c.close()
    finally:
        srv.stop_thread()


def test_start_in_thread_and_stop_thread_clean(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/t.sock")
    before = set(threading.enumerate())
    srv = make_server(spec, group="postfix")
    srv.start_in_thread()
    st_ = os.stat(spec.path)
    assert oct(st_.st_mode & 0o777) == "0o660"
    with pytest.raises(SocketInUseError):
        make_server(spec).start_in_thread()
    c = Client(spec)
    assert c.ask(request("x@y")) == DUNNO
    srv.stop_thread()
    assert c.closed()
    c.close()
    assert not os.path.exists(spec.path)
    assert not socket_is_listening(spec)
    assert set(threading.enumerate()) == before
    srv.start_in_thread()
    c = Client(spec)
    assert c.ask(request("x@y")) == DUNNO
    c.close()
    srv.stop_thread()


def test_async_start_close(sockdir: Path) -> None:
    spec = parse_socket_spec(f"unix:{sockdir}/a.sock")

    async def main() -> None:
        srv = make_server(spec)
        await srv.start()
        reader, writer = await asyncio.open_unix_connection(spec.path)
        writer.write(request("echo@b") + request("x@y"))
        assert await reader.readuntil(b"\n\n") == echoed("echo@b")
        assert await reader.readuntil(b"\n\n") == DUNNO
        await srv.close()
        assert await reader.read() == b""
        writer.close()

    asyncio.run(main())
    assert not os.path.exists(spec.path)


def test_policy_request_mapping() -> None:
    req = PolicyRequest({"request": "smtpd_access_policy", "recipient": "r@x", "size": "1234",
                         "recipient_count": "junk", "instance": "i.1", "sasl_username": "bob"})
    assert (req.recipient, req.size, req.recipient_count, req.instance) == ("r@x", 1234, 0, "i.1")
    assert (req.sender, req.queue_id, req.client_address, req.protocol_state) == ("", "", "", "")
    assert req.sasl_username == "bob" and req["recipient"] == "r@x" and "size" in req
    assert req.get("nope") is None and len(req) == 6 and dict(req)["instance"] == "i.1"
    with pytest.raises(TypeError):
        req["recipient"] = "other"  # type: ignore[index]


# -- batching: a handler with answer_all gets every request of one loop turn ------------------

def test_batch_spans_connections_and_keeps_each_connections_order() -> None:
    server = PolicyServer(BatchingHandler(), SocketSpec("inet", host="127.0.0.1", port=0),
                          logger=logging.getLogger(LOGGER))

    async def run() -> None:
        (a, a_out), (b, b_out) = connect(server), connect(server)
        receive(a, request("echo1@b") + request("no-such@mycompany.com"))
        receive(b, request("echo2@b") + b"\n")
        assert a_out.written == b_out.written == b""  # answered at the end of the loop turn
        await asyncio.sleep(0)
        assert server.handler.batches == [3]
        assert a_out.written == echoed("echo1@b") + b"action=550 5.1.1 <no-such@mycompany.com>: no such alias\n\n"
        assert b_out.written == echoed("echo2@b") + DUNNO and b_out.closed and not a_out.closed

    asyncio.run(run())


class FailingBatches(BatchingHandler):
    """answer_all fails for any batch holding boom@x, or answers one action short."""

    def __init__(self, short: bool = False) -> None:
        super().__init__()
        self.short = short

    def answer_all(self, requests: list[PolicyRequest]) -> list[str]:
        actions = super().answer_all(requests)
        return actions[:-1] if self.short else actions


@pytest.mark.parametrize("short", [False, True], ids=["raises", "short"])
def test_failed_batch_answers_each_request_alone(short: bool, caplog: pytest.LogCaptureFixture) -> None:
    server = PolicyServer(FailingBatches(short), SocketSpec("inet", host="127.0.0.1", port=0),
                          logger=logging.getLogger(LOGGER))

    async def run() -> None:
        (a, a_out), (b, b_out), (c, c_out) = connect(server), connect(server), connect(server)
        receive(a, request("boom@x" if not short else "echo0@b"))
        receive(b, request("echo@b"))
        receive(c, request("x@y"))
        c_out.closed = True  # the client left before its answer
        await asyncio.sleep(0)
        assert a_out.written == (INTERNAL if not short else echoed("echo0@b"))
        assert b_out.written == echoed("echo@b")
        assert c_out.written == b""

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        asyncio.run(run())
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "answering 3 requests together failed" in messages[0]
    assert any("boom@x" in m for m in messages[1:]) != short


def test_oversize_in_a_batch_is_answered_then_closed() -> None:
    server = fuzz_server(batching=True)

    async def run() -> None:
        conn, out = connect(server)
        receive(conn, b"x=" + b"y" * FUZZ_MAX_BYTES)
        receive(conn, request("echo@b"))  # after the oversize request: never read
        assert not out.closed
        await asyncio.sleep(0)
        assert out.written == DUNNO and out.closed

    asyncio.run(run())


# -- the gateway's policy: quota claims of one batch in one transaction ----------------------

QUOTA_CONFIG = """\
alias_domain: mycompany.com
quota: {daily: 3, mass_daily: 1, scope: sender_domain}
mass_mail: {listeners: [mass]}
"""


@pytest.fixture
def gateway_policy(tmp_path: Path) -> Iterator[GatewayPolicy]:
    config = parse_config(QUOTA_CONFIG, "<test>", check_files=False).config
    store = SQLiteStore(tmp_path / "store.sqlite3")
    yield GatewayPolicy(Runtime(config, store, TokenSigner(b"0123456789abcdef0123456789abcdef"),
                                clock=lambda: 1_800_000_000.0))
    store.close()


def rcpt(sender: str, recipient: str, context: str = "ORIGINATING") -> PolicyRequest:
    return PolicyRequest({"request": "smtpd_access_policy", "protocol_state": "RCPT", "sender": sender,
                          "recipient": recipient, "policy_context": context})


def test_batched_quota_claims_count_exactly(gateway_policy: GatewayPolicy) -> None:
    defer = POLICY["quota_defer"]
    batch = [rcpt("odoo@a.example", f"r{i}@customer.example") for i in range(5)]
    batch.insert(2, rcpt("someone@customer.example", "catchall@mycompany.com", "INBOUND"))
    batch.insert(3, rcpt("news@a.example", "m@customer.example", "mass"))
    batch.append(rcpt("odoo@b.example", "r@customer.example"))
    assert gateway_policy.answer_all(batch) == ["DUNNO"] * 5 + [defer] * 2 + ["DUNNO"]
    assert gateway_policy(rcpt("odoo@a.example", "late@customer.example")) == defer
    assert gateway_policy.answer_all([rcpt("news@a.example", "m2@customer.example", "mass")]) == [defer]
    store = gateway_policy.runtime.store
    since = 1_800_000_000.0 - 3600
    assert store.quota_count("domain:a.example", "transactional", since) == 3
    assert store.quota_count("domain:a.example", "mass", since) == 1
    assert store.quota_count("domain:b.example", "transactional", since) == 1


def test_a_locked_store_defers_the_quota_claims_of_a_batch_and_answers_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Behind a lock held past the busy timeout, every claim of the batch gets the internal error
    (one wait, not one more per claim) and the requests that take no quota keep their answers."""
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 200)
    config = parse_config(QUOTA_CONFIG, "<test>", check_files=False).config
    store = SQLiteStore(tmp_path / "store.sqlite3")
    policy = GatewayPolicy(Runtime(config, store, TokenSigner(b"0123456789abcdef0123456789abcdef"),
                                   clock=lambda: 1_800_000_000.0))
    holder = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    batch = [rcpt("odoo@a.example", "r1@customer.example"),
             rcpt("someone@customer.example", "catchall@mycompany.com", "INBOUND"),
             rcpt("news@a.example", "m@customer.example", "mass"),
             rcpt("someone@customer.example", "nobody@mycompany.com", "INBOUND")]
    try:
        with caplog.at_level(logging.INFO):
            actions = policy.answer_all(batch)
    finally:
        holder.rollback()
        holder.close()
    failed = POLICY["internal_error"]
    assert actions == [failed, "DUNNO", failed, POLICY["no_such_alias"]]
    errors = [r.getMessage() for r in caplog.records if "role=error" in r.getMessage()]
    assert len(errors) == 1 and 'event=quota error=OperationalError detail="database is locked" claims=2' in errors[0]
    assert sum("verdict=internal_error" in r.getMessage() for r in caplog.records) == 2
    assert store.quota_count("domain:a.example", "transactional", 0) == 0
    assert policy.answer_all(batch[:1]) == ["DUNNO"]  # the lock gone, the quota is taken again
    store.close()


# -- fuzzing ------------------------------------------------------------------------------

FUZZ_MAX_BYTES = 300
FUZZ_MAX_ATTRIBUTES = 8
MALFORMED = DUNNO


def expected_replies(stream: bytes) -> tuple[list[bytes], bool]:
    """Reference model: a request is everything up to the first empty line; the first that is
    not a policy request (or too big, or an unfinished one already broken) is answered as
    malformed and ends the connection. Returns the replies and whether the server must close."""
    replies: list[bytes] = []
    pos = 0
    while True:
        if stream.startswith(b"\n", pos):
            return replies + [MALFORMED], True
        end = stream.find(b"\n\n", pos)
        if end < 0:
            tail = stream[pos:]
            finished = tail.split(b"\n")[:-1]
            if (len(tail) >= FUZZ_MAX_BYTES or b"\0" in tail or len(finished) > FUZZ_MAX_ATTRIBUTES
                    or any(not line.split(b"=", 1)[0] or b"=" not in line for line in finished)):
                return replies + [MALFORMED], True
            return replies, False
        if end + 2 - pos > FUZZ_MAX_BYTES:
            return replies + [MALFORMED], True
        block = stream[pos:end]
        if malformed(block):
            return replies + [MALFORMED], True
        replies.append(expected_reply(block))
        pos = end + 2


def malformed(block: bytes) -> bool:
    lines = block.split(b"\n")
    if len(lines) > FUZZ_MAX_ATTRIBUTES or b"\0" in block or any(not line.split(b"=", 1)[0] or b"=" not in line
                                                                for line in lines):
        return True
    return dict(line.split(b"=", 1) for line in lines).get(b"request") != b"smtpd_access_policy"


def expected_reply(block: bytes) -> bytes:
    attrs = dict(line.split(b"=", 1) for line in block.split(b"\n"))
    rcpt = attrs.get(b"recipient", b"")
    if rcpt in (b"boom@x", b"none@x", b"empty@x"):
        return INTERNAL
    if rcpt == b"inject@x":
        return b"action=REJECT a b  c d  action=OK\n\n"
    if rcpt.startswith(b"echo"):
        action = b"OK " + rcpt + b" " + attrs.get(b"sender", b"") + b" " + attrs.get(
            b"protocol_state", b"")
        return b"action=" + action.replace(b"\r", b" ").replace(b"\0", b" ") + b"\n\n"
    if rcpt == b"no-such@mycompany.com":
        return b"action=550 5.1.1 <no-such@mycompany.com>: no such alias\n\n"
    return DUNNO


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def fuzz_server(batching: bool) -> PolicyServer:
    return PolicyServer(BatchingHandler() if batching else handler, SocketSpec("inet", host="127.0.0.1", port=0),
                        max_request_bytes=FUZZ_MAX_BYTES, max_attributes=FUZZ_MAX_ATTRIBUTES,
                        logger=logging.getLogger("test.policyd.fuzz"))


def connect(server: PolicyServer) -> tuple[_Connection, FakeTransport]:
    """A connection's protocol object on a fake transport (inside a running loop)."""
    conn = _Connection(server)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def receive(conn: _Connection, chunk: bytes) -> None:
    buf = conn.get_buffer(len(chunk))
    buf[: len(chunk)] = chunk
    conn.buffer_updated(len(chunk))


def feed(chunks: list[bytes], batching: bool = False) -> tuple[bytes, bool]:
    """Drive one connection's protocol object directly, so chunk boundaries are exact; a
    batching server answers at the end of each loop turn, so each chunk gets one."""
    server = fuzz_server(batching)

    async def run() -> tuple[bytes, bool]:
        conn, transport = connect(server)
        for chunk in chunks:
            if transport.closed:
                break
            receive(conn, chunk)
            await asyncio.sleep(0)
        conn.connection_lost(None)
        return transport.written, transport.closed

    return asyncio.run(run())


_RECIPIENTS = [b"boom@x", b"none@x", b"empty@x", b"inject@x", b"echo\xff\r\0", b"echo@b",
               b"no-such@mycompany.com", b"other@b"]
_good_line = st.one_of(
    st.sampled_from([b"sender=s@x\n", b"protocol_state=RCPT\n", b"\xff\xfe=\x80\n", b"x=\r\n",
                     b"request=smtpd_access_policy\n", b"a==\n", b"sender=\n"]),
    st.sampled_from(_RECIPIENTS).map(lambda r: b"recipient=" + r + b"\n"),
)
_bad_line = st.one_of(
    st.sampled_from([b"request=junk\n", b"=x\n", b"noequals\n", b"\n"]),
    st.binary(max_size=40),
    st.integers(100, 400).map(lambda n: b"pad=" + b"x" * n + b"\n"),
)
# Mostly well-formed requests (some with a bad line, a missing request=, too many lines or too
# many bytes), stray empty lines and raw garbage, so every branch of the framing is reached.
_request = st.one_of(
    st.sampled_from(_RECIPIENTS).map(lambda r: request(r.decode("utf-8", "surrogateescape"))),
    st.lists(_good_line, min_size=1, max_size=10).map(
        lambda lines: b"request=smtpd_access_policy\n" + b"".join(lines) + b"\n"),
    st.lists(st.one_of(_good_line, _bad_line), max_size=10).map(
        lambda lines: b"".join(lines) + b"\n"),
    st.binary(max_size=60),
)
_stream = st.one_of(st.lists(_request, max_size=12).map(b"".join), st.binary(max_size=800))


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(_stream)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked(), st.booleans())
def test_fuzz_framing_any_chunking(case: tuple[bytes, list[bytes]], batching: bool) -> None:
    stream, chunks = case
    written, closed = feed(chunks, batching)
    replies, must_close = expected_replies(stream)
    assert written == b"".join(replies)
    answers = written.split(b"\n\n")
    assert answers.pop() == b"" and len(answers) == len(replies)
    assert all(answer.startswith(b"action=") and b"\n" not in answer for answer in answers)
    assert closed == must_close


@pytest.fixture(scope="module", params=["plain", "batching"])
def socket_fuzz_server(request: pytest.FixtureRequest) -> Iterator[PolicyServer]:
    with tempfile.TemporaryDirectory(prefix="mg-", dir="/tmp") as d:
        srv = PolicyServer(BatchingHandler() if request.param == "batching" else handler,
                           parse_socket_spec(f"unix:{d}/f.sock"),
                           max_request_bytes=FUZZ_MAX_BYTES, max_attributes=FUZZ_MAX_ATTRIBUTES,
                           logger=logging.getLogger("test.policyd.fuzz"))
        srv.start_in_thread()
        yield srv
        srv.stop_thread()


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(chunked())
def test_fuzz_over_real_socket(socket_fuzz_server: PolicyServer, case: tuple[bytes, list[bytes]]) -> None:
    """The same property end to end: after the client's EOF the server has answered every
    complete request exactly once, then closed; and it still serves a new connection."""
    stream, chunks = case
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(socket_fuzz_server.address.path)
    sock.settimeout(5)
    try:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert received == b"".join(expected_replies(stream)[0])
    fresh = Client(socket_fuzz_server.address)
    assert fresh.ask(request("x@y")) == DUNNO
    fresh.close()


# -- the gateway's policy: only mail that is sent pays the quota -------------------------------

def on(connection: int, instance: str, request: PolicyRequest, **attrs: str) -> PolicyRequest:
    """`request` as sent on policy connection `connection` for the transaction `instance`."""
    return PolicyRequest({**request, "instance": instance, **attrs}, connection)


def end_of_message(connection: int, instance: str, sender: str, recipients: int) -> PolicyRequest:
    return on(connection, instance, rcpt(sender, ""), protocol_state="END-OF-MESSAGE",
              recipient_count=str(recipients))


def taken(policy: GatewayPolicy, key: str = "domain:a.example") -> int:
    return policy.runtime.store.quota_count(key, "transactional", 1_800_000_000.0 - 3600)


def test_a_transaction_that_ends_without_its_message_gives_its_quota_back(gateway_policy: GatewayPolicy) -> None:
    """RSET or QUIT after RCPT, a refusal at DATA, a 4xx the client retries: Postfix's next
    request on the connection carries another instance, and the retry finds the room again."""
    policy = gateway_policy
    first = [on(1, "t1", rcpt("odoo@a.example", f"r{i}@customer.example")) for i in range(3)]
    assert policy.answer_all(first) == ["DUNNO"] * 3
    assert taken(policy) == 3
    retry = [on(1, "t2", rcpt("odoo@a.example", f"r{i}@customer.example")) for i in range(3)]
    assert policy.answer_all(retry) == ["DUNNO"] * 3  # not the quota's 4xx: t1 gave its 3 back first
    assert policy(end_of_message(1, "t2", "odoo@a.example", 3)) == "DUNNO"
    assert taken(policy) == 3
    assert policy(on(1, "t3", rcpt("odoo@a.example", "late@customer.example"))) == POLICY["quota_defer"]
    assert taken(policy) == 3  # t2 was sent: kept


def test_end_of_message_gives_back_recipients_refused_after_the_take(gateway_policy: GatewayPolicy) -> None:
    policy = gateway_policy
    assert policy.answer_all([on(1, "t1", rcpt("odoo@a.example", f"r{i}@customer.example"))
                              for i in range(3)]) == ["DUNNO"] * 3
    policy(end_of_message(1, "t1", "odoo@a.example", 1))  # Postfix accepted one of the three
    assert taken(policy) == 1


def test_a_closed_connection_gives_back_and_a_later_end_of_message_takes_again(
        gateway_policy: GatewayPolicy) -> None:
    """Postfix closed the connection (QUIT, then its idle timeout; or smtpd exited): given back.
    Should the transaction go on over a new connection (we closed an idle one), its
    END-OF-MESSAGE takes the recipients again: the count stays exact."""
    policy = gateway_policy
    policy.answer_all([on(1, "t1", rcpt("odoo@a.example", "r1@customer.example")),
                       on(1, "t1", rcpt("odoo@a.example", "r2@customer.example"))])
    policy.answer_all([on(2, "u1", rcpt("odoo@a.example", "r3@customer.example"))])
    assert taken(policy) == 3
    policy.connection_closed(1)
    policy.connection_closed(2)
    assert taken(policy) == 0
    policy(end_of_message(3, "t1", "odoo@a.example", 2))
    assert taken(policy) == 2
    policy.connection_closed(3)
    assert taken(policy) == 2


def test_direct_calls_and_dry_run_keep_nothing_pending(tmp_path: Path) -> None:
    """Requests without a connection (a direct call) keep their take at once, as before."""
    config = parse_config(QUOTA_CONFIG, "<test>", check_files=False).config
    store = SQLiteStore(tmp_path / "store.sqlite3")
    policy = GatewayPolicy(Runtime(config, store, TokenSigner(b"0123456789abcdef0123456789abcdef"),
                                   clock=lambda: 1_800_000_000.0))
    policy(on(0, "t1", rcpt("odoo@a.example", "r1@customer.example")))
    policy(on(0, "t2", rcpt("odoo@a.example", "r2@customer.example")))
    assert taken(policy) == 2
    store.close()


def test_the_server_tells_the_policy_of_a_closed_connection(tmp_path: Path) -> None:
    """Through the real server: each request carries its connection's number, and the close of
    a client connection reaches `connection_closed` (the stop of the server does not)."""
    config = parse_config(QUOTA_CONFIG, "<test>", check_files=False).config
    store = SQLiteStore(tmp_path / "store.sqlite3")
    policy = GatewayPolicy(Runtime(config, store, TokenSigner(b"0123456789abcdef0123456789abcdef"),
                                   clock=lambda: 1_800_000_000.0))
    server = PolicyServer(policy, parse_socket_spec(f"unix:{tmp_path}/p.sock"))
    server.start_in_thread()
    try:
        wire = "".join(f"{k}={v}\n" for k, v in on(0, "t1", rcpt("odoo@a.example", "r@customer.example")).items())
        aborted, kept = Client(server.address), Client(server.address)
        assert aborted.ask(wire.encode() + b"\n") == DUNNO
        assert kept.ask(wire.replace("instance=t1", "instance=t2").encode() + b"\n") == DUNNO
        assert taken(policy) == 2
        aborted.close()
        deadline = time.monotonic() + 5
        while taken(policy) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert taken(policy) == 1
    finally:
        server.stop_thread()
    assert taken(policy) == 1  # stopping is not an end: Postfix finishes t2 with whoever serves next
    store.close()


def test_end_of_message_without_a_recipient_count_keeps_everything(gateway_policy: GatewayPolicy) -> None:
    """Postfix always sends `recipient_count` at END-OF-MESSAGE; without it nothing is known to
    have been refused, so nothing is given back (too many counted, never too few)."""
    policy = gateway_policy
    policy.answer_all([on(1, "t1", rcpt("odoo@a.example", f"r{i}@customer.example")) for i in range(2)])
    policy(end_of_message(1, "t1", "odoo@a.example", 0))
    assert taken(policy) == 2
