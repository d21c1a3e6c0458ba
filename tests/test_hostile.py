"""Hostile input, where it comes in: through Postfix into the milter, the policy service and the
lookup service, and straight into the pure rules where they parse (From and address handling,
inbound routing) with Hypothesis.

Whatever a client sends, mailgate gives a defined answer: the message is accepted (and delivered
exactly once, with a From that carries no header of the attacker's) or refused for good (5xx).
A 4xx for an input that will never change is not an answer: the client retries it for days and
the mail is stuck all that time. Secrets never reach a log; the sockets are for Postfix only.

Parsers fuzzed elsewhere (netstring, policy requests, bounce reports) are not repeated here.
"""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import email.utils
import grp
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from faultlab import (
    ACCEPTED,
    PERMANENT,
    db_rows,
    delivered_copies,
    delivery_report,
    gateway,
    make_message,
    send,
    uid,
    wait_until,
)
from mailgate.configfile import parse_config
from mailgate.lab.gateway import ODOO_PASSWORD, SASL_PASSWORD, SASL_USER, LabGateway
from mailgate.rules.inbound import decide_inbound
from mailgate.rules.message import InboundMessage
from mailgate.rules.outbound import OutboundRequest, decide_outbound
from mailgate.rules.tokens import BounceToken, TokenSigner
from thoroughness import examples

GATEWAY_EXTRA_CONFIG = "quota: {daily: null, mass_daily: null}\n"
NOTIFICATION = "notifications@mycompany.com"
DAY = 86400

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]


@pytest.fixture(scope="module")
def gw():
    with gateway(GATEWAY_EXTRA_CONFIG, main_cf_extra={"smtpd_recipient_limit": "2000"}) as lab:
        yield lab


def raw_message(header_from: bytes, to: bytes = b"r@customer.example", *, subject: bytes = b"hostile",
                msgid: bytes | None = None, extra: bytes = b"", body: bytes = b"body\r\n") -> tuple[bytes, str]:
    """A message built from bytes, exactly as given (no encoding, no folding)."""
    msgid = msgid or f"<{uid()}@lab.example>".encode()
    head = (b"From: " + header_from + b"\r\nTo: " + to + b"\r\nSubject: " + subject + b"\r\nMessage-ID: "
            + msgid + b"\r\n" + extra)
    return head + b"\r\n" + body, msgid.decode("utf-8", "surrogateescape")


def delivered(gw: LabGateway, msgid: str, timeout: float = 30) -> list:
    """The copies of a message on the upstream sinks, once there is at least one."""
    def found():
        return [m for s in gw.sinks.values() for m in s.messages if _msgid_of(m.data) == msgid]
    wait_until(found, timeout, what=f"delivery of {msgid}")
    time.sleep(0.3)
    return found()


def _msgid_of(data: bytes) -> str | None:
    head = data.split(b"\r\n\r\n", 1)[0]
    found = re.search(rb"(?im)^Message-ID:[ \t]*(.*)$", head)
    return found.group(1).strip().decode("utf-8", "surrogateescape") if found else None


def header_lines(data: bytes) -> list[tuple[str, bytes]]:
    """(name, unfolded value) of every header field of a message as it came off the wire."""
    head = data.split(b"\r\n\r\n", 1)[0]
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b" " + line.strip())
        else:
            name, _, value = line.partition(b":")
            fields.append((name.decode("ascii", "replace").strip().lower(), value.strip()))
    return fields


def assert_clean_head(data: bytes, *, forbidden: tuple[str, ...] = ("bcc", "x-injected")) -> bytes:
    """No bare CR or LF anywhere in the header block, no injected field, one From; returns it."""
    head = data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", head), head[:500]
    assert b"\0" not in head
    fields = header_lines(data)
    names = [name for name, _ in fields]
    for name in forbidden:
        assert name not in names, f"injected header {name}: {head[:800]!r}"
    froms = [value for name, value in fields if name == "from"]
    assert len(froms) == 1, froms
    return froms[0]


# --------------------------------------------------------------------------------------------
# Header injection through the milter's From rewriting

INJECTIONS = {
    "encoded CRLF (base64)": b"=?utf-8?b?" + base64.b64encode(b"Evil\r\nBcc: victim@x.example") + b"?= <a@example.com>",
    "encoded CRLF (q)": b"=?utf-8?q?Evil=0D=0AX-Injected:_yes?= <a@example.com>",
    "encoded CRLF in a quoted name": b'"=?utf-8?q?Evil=0D=0ABcc:_victim@x.example?=" <a@example.com>',
    "encoded lone LF and CR": b"=?utf-8?b?" + base64.b64encode(b"A\nX-Injected: 1\rB") + b"?= <a@example.com>",
    "unicode line separators":
        b"=?utf-8?b?" + base64.b64encode("A\u2028X-Injected: 1\u0085B".encode()) + b"?= <a@example.com>",
    "bare CR in the line": b"Evil\rX-Injected: yes <a@example.com>",
    "NUL in the name": b"Evil\0Name <a@example.com>",
    "encoded NUL": b"=?utf-8?b?" + base64.b64encode(b"Evil\0X-Injected: 1") + b"?= <a@example.com>",
    "escaped quotes and backslashes": b'"Evil\\" <x@y.example>\\\\\\"" <a@example.com>',
    "address-looking name": b'"notifications@mycompany.com" <a@example.com>',
}


@pytest.mark.parametrize("header_from", list(INJECTIONS.values()), ids=list(INJECTIONS))
def test_from_injection_never_reaches_the_wire(gw, header_from):
    data, msgid = raw_message(header_from)
    reply = send(gw.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True)
    assert reply.outcome == ACCEPTED, str(reply)
    [got] = delivered(gw, msgid)
    value = assert_clean_head(got.data)
    # rewritten to the notification address (the name kept, encoded), or left alone when it
    # could not be parsed at all; never a second address smuggled in
    if NOTIFICATION.encode() in value:
        pairs = email.utils.getaddresses([value.decode("ascii", "replace")])
        assert [a for _, a in pairs] == [NOTIFICATION], value
        name = str(email.header.make_header(email.header.decode_header(pairs[0][0])))
        for char in "\r\n\0":   # (U+2028 and U+0085 may stay: they travel base64-encoded)
            assert char not in name, repr(name)


@pytest.mark.parametrize("header_from", list(INJECTIONS.values())[:4], ids=list(INJECTIONS)[:4])
def test_from_injection_inbound_keeps_one_route_header(gw, header_from):
    sender = f"c{uid()}@customer.example"
    data, msgid = raw_message(header_from.replace(b"a@example.com", sender.encode()), b"sales@mycompany.com")
    reply = send(gw.pf.port("inbound"), sender, ["sales@mycompany.com"], data, raw=True)
    assert reply.outcome == ACCEPTED, str(reply)
    call = wait_until(lambda: [c for c in gw.odoo.calls if msgid.encode() in c.message], 30, what="Odoo delivery")
    [call] = call
    message = call.message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert_clean_head(message)
    routes = [v for n, v in header_lines(message) if n == "x-mailgate-route"]
    assert routes == [b"alias:sales"]


def test_log_lines_cannot_be_forged(gw):
    """Header values (a Message-ID without brackets, a From name) that carry a line break and a
    fake log line end up, at most, inside one key=value line."""
    forged = b"\r\nFORGED: role=outbound server=evil"
    sender = f"f{uid()}@customer.example"
    msgid = f"no-brackets-{uid()}".encode()
    data, _ = raw_message(b"=?utf-8?b?" + base64.b64encode(b"x" + forged) + b"?= <" + sender.encode() + b">",
                          b"catchall@mycompany.com", msgid=msgid + b"\r\n\tFORGED: role=outbound server=evil")
    for _ in range(2):  # the second one is a duplicate: its Message-ID goes into the log line
        reply = send(gw.pf.port("inbound"), sender, ["catchall@mycompany.com"], data, raw=True)
        assert reply.outcome == ACCEPTED, str(reply)
    wait_until(lambda: "duplicate of" in gw.mailgate_log() and msgid.decode() in gw.mailgate_log(), 20,
               what="the duplicate's log line")
    for text in (gw.mailgate_log(), gw.pf.log_text()):
        assert not re.search(r"^\s*FORGED", text, re.M)


# --------------------------------------------------------------------------------------------
# Big and bomb-shaped headers


def _words(count: int, word: bytes) -> bytes:
    return b" ".join([word] * count)


BOMBS = {
    "1 MB subject line": dict(subject=b"S" * 1_000_000),
    "1 MB display name": dict(header_from=b"N" * 1_000_000 + b" <a@example.com>"),
    "3000 encoded words": dict(header_from=_words(3000, b"=?utf-8?b?" + base64.b64encode("zoë".encode()) + b"?=")
                               + b" <a@example.com>"),
    "3000 unknown charsets": dict(header_from=_words(3000, b"=?x-no-such-charset?q?abc?=") + b" <a@example.com>"),
    "invalid base64, unknown charsets": dict(
        header_from=_words(500, b"=?utf-8?b?!!!?= =?x-none?b?QUJD?= =?utf-8?q?=ZZ?=") + b" <a@example.com>"),
    "nested encoded words": dict(header_from=b"=?utf-8?b?" + base64.b64encode(
        b"=?utf-8?b?" + base64.b64encode(b"=?iso-8859-1?q?=E9=0D=0ABcc:_x@y?=") + b"?=") + b"?= <a@example.com>"),
    "70 kB of base64": dict(header_from=b"=?utf-8?b?" + base64.b64encode(b"x" * 70_000) + b"?= <a@example.com>"),
    "2000 encoded words in Subject": dict(subject=_words(2000, b"=?utf-8?q?=E2=9C=93?=")),
}


@pytest.mark.parametrize("parts", list(BOMBS.values()), ids=list(BOMBS))
def test_big_and_bomb_shaped_headers_get_a_prompt_defined_answer(gw, parts):
    parts = dict(parts)
    header_from = parts.pop("header_from", b'"Plain" <a@example.com>')
    data, msgid = raw_message(header_from, **parts)
    reply = send(gw.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True, timeout=120)
    assert reply.outcome == ACCEPTED, str(reply)
    assert reply.seconds < 20, f"{reply.seconds:.1f}s for one message"
    [got] = delivered(gw, msgid, timeout=60)
    assert_clean_head(got.data)


BADLY_DECODING = {
    "a character split across two encoded words": b"=?utf-8?q?Zo=C3?= =?utf-8?q?=AB?= <a@example.com>",
    "invalid UTF-8 in a utf-8 word": b"=?utf-8?b?/w==?= <a@example.com>",
    "UTF-16 lone surrogate": b"=?utf-16?b?2D3c?= <a@example.com>",
    "8-bit bytes in an unknown charset": b"=?x-unknown?q?Caf=E9?= <a@example.com>",
}


@pytest.mark.parametrize("header_from", list(BADLY_DECODING.values()), ids=list(BADLY_DECODING))
def test_badly_decoding_display_names_are_still_rewritten(gw, header_from):
    """Encoded words whose bytes do not decode in their charset (pure ASCII on the wire; 'Zoë'
    split across two words is common) give names with lone surrogates: they must still be
    rewritten, never answered 451 for ever (found here, fixed in f1219f0: addresses.clean_text)."""
    data, msgid = raw_message(header_from)
    reply = send(gw.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True)
    assert reply.outcome == ACCEPTED, f"{reply} (a 4xx for an input that never changes: stuck for ever)"
    [got] = delivered(gw, msgid)
    assert NOTIFICATION.encode() in assert_clean_head(got.data)


# Address-list shapes that Python's header parser handles in quadratic time, each as long as fits
# below mailgate's 64 kB parsing limit (Postfix passes headers up to header_size_limit, 100 kB).
PATHOLOGICAL_UNITS = ['""', "\\\\", ". ", "@,", "x,", "(),", ",,"]


def test_pathological_address_lists_are_parsed_in_bounded_time():
    code = textwrap.dedent(f"""
        import time
        from mailgate.rules.addresses import parse_mailboxes
        for unit in {PATHOLOGICAL_UNITS!r}:
            value = (unit * 40_000)[:63_000] + "a@example.com"
            started = time.perf_counter()
            parse_mailboxes(value)
            print(repr(unit), round(time.perf_counter() - started, 2), flush=True)
    """)
    try:
        subprocess.run([sys.executable, "-c", code], timeout=10, check=True, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"parse_mailboxes took more than 10 s for these 63 kB From headers: {exc.stdout!r}")


# --------------------------------------------------------------------------------------------
# Invalid UTF-8 (raw 8-bit bytes, as old mailers still send them)

# Raw 8-bit bytes reach mailgate as lone surrogates (pymilter decodes with surrogateescape); nothing
# could encode them later (SQLite, encoded words, email.message), so every such message was answered
# 451 for ever (found here, fixed in f1219f0: addresses.clean_text at the milter boundary).


def _raw_session(port: int, sender: bytes, recipient: bytes, data: bytes) -> tuple[int, str]:
    """An SMTP transaction with 8-bit bytes in the envelope (smtplib only sends ASCII commands)."""
    import smtplib
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    try:
        client.ehlo("lab.client")
        client.send(b"MAIL FROM:<" + sender + b">\r\n")
        code, text = client.getreply()
        if code != 250:
            return code, text.decode(errors="replace")
        client.send(b"RCPT TO:<" + recipient + b">\r\n")
        code, text = client.getreply()
        if code not in (250, 251):
            return code, text.decode(errors="replace")
        code, text = client.docmd("DATA")
        assert code == 354
        client.send(data + b".\r\n")
        code, text = client.getreply()
        return code, text.decode(errors="replace")
    finally:
        try:
            client.quit()
        except Exception:
            client.close()


EIGHT_BIT = [
    pytest.param("submission", b"a@example.com", b"r@customer.example", dict(subject=b"Caf\xe9 \xff\xfe"),
                 id="outbound-subject"),
    pytest.param("inbound", b"c@customer.example", b"sales@mycompany.com",
                 dict(header_from=b"Caf\xe9 <c@customer.example>"), id="inbound-from-name"),
    pytest.param("submission", b"a@example.com", b"r@customer.example", dict(header_from=b"Caf\xe9 <a@example.com>"),
                 id="outbound-from-name"),
    pytest.param("submission", b"a@example.com", b"r@customer.example", dict(header_from=b"X <caf\xe9@example.com>"),
                 id="outbound-from-address"),
    pytest.param("inbound", b"c@customer.example", b"sales@mycompany.com",
                 dict(header_from=b"X <caf\xe9@customer.example>"), id="inbound-from-address"),
    pytest.param("submission", b"a@example.com", b"r@customer.example", dict(msgid=b"<caf\xe9@lab.example>"),
                 id="outbound-message-id"),
    pytest.param("inbound", b"c@customer.example", b"sales@mycompany.com", dict(msgid=b"<caf\xe9@lab.example>"),
                 id="inbound-message-id"),
    pytest.param("submission", b"a@example.com", b"r\xe9@customer.example", {},
                 id="outbound-envelope-recipient"),
    pytest.param("submission", b"caf\xe9@example.com", b"r@customer.example", {},
                 id="outbound-envelope-sender"),
    pytest.param("inbound", b"c@customer.example", b"sales@mycompany.com",
                 dict(extra=b'Content-Type: text/plain; charset="\xc3\xa9\xe9"\r\n'),
                 id="inbound-content-type"),
]


@pytest.mark.parametrize("listener, sender, recipient, parts", EIGHT_BIT)
def test_invalid_utf8_gets_a_defined_answer(gw, listener, sender, recipient, parts):
    parts = dict(parts)
    header_from = parts.pop("header_from", b"X <" + sender + b">")
    data, msgid = raw_message(header_from, recipient, **parts)
    port = gw.pf.port(listener)
    answers = [_raw_session(port, sender, recipient, data) for _ in range(2)]  # the client's retry
    code, text = answers[-1]
    assert not 400 <= code < 500, f"temporary refusal for good: {answers}"
    if code == 250:
        if listener == "inbound":
            wait_until(lambda: [c for c in gw.odoo.calls if msgid.encode("utf-8", "surrogateescape") in c.message],
                       30, what="Odoo delivery")
        else:
            assert_clean_head(delivered(gw, msgid)[0].data)


# --------------------------------------------------------------------------------------------
# 1,000+ recipients


def blacklist_add(gw: LabGateway, *addresses: str) -> None:
    for address in addresses:
        done = subprocess.run([sys.executable, "-m", "mailgate", "blacklist", "add", address, "--reason", "test",
                               "--config", str(gw.config_path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def sink_copies(gw: LabGateway, sink: str, msgid: str) -> dict[str, int]:
    copies: dict[str, int] = {}
    for message in gw.sinks[sink].messages:
        if message.parsed.get("Message-ID") == msgid:
            for rcpt in message.rcpt_tos:
                copies[rcpt] = copies.get(rcpt, 0) + 1
    return copies


@pytest.mark.parametrize("how", ["stream-header", "mass-listener"])
def test_twelve_hundred_recipients_with_blacklisted_ones(gw, how):
    tag = uid()
    recipients = [f"n{i}-{tag}@customer.example" for i in range(1200)]
    blocked = recipients[7::500]       # 3 of them
    blacklist_add(gw, *blocked)
    headers = {"X_Mailgate_Stream": "mass"} if how == "stream-header" else {}
    data, msgid = make_message('"News" <news@mycompany.com>', "list@mycompany.com", **headers)
    listener = "submission" if how == "stream-header" else "mass"
    started = time.monotonic()
    reply = send(gw.pf.port(listener), "news@mycompany.com", recipients, data, timeout=300)
    assert reply.outcome == ACCEPTED, str(reply)
    refused = {r: c for r, c in reply.rcpt_codes.items() if c[0] != 250}
    if how == "mass-listener":      # known as mass mail at RCPT: the policy service refuses them
        assert set(refused) == set(blocked) and all(c[0] == 550 and c[1].startswith("5.7.1") for c in refused.values())
    else:                            # known only from the header: the milter removes them
        assert not refused
    wanted = set(recipients) - set(blocked)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and set(sink_copies(gw, "mass", msgid)) < wanted:
        time.sleep(0.5)
    copies = sink_copies(gw, "mass", msgid)
    assert set(copies) == wanted and set(copies.values()) == {1}
    assert time.monotonic() - started < 150
    if how == "stream-header":
        log = gw.mailgate_log()
        for address in blocked:
            assert re.search(rf"role=blacklist rcpt=<{re.escape(address)}> action=removed mass=yes", log)


def test_fifteen_hundred_addresses_in_to_and_cc_inbound(gw):
    sender = f"c{uid()}@customer.example"
    msg = EmailMessage()
    msg["From"] = f'"Big List" <{sender}>'
    msg["To"] = ", ".join(f"Person {i} <p{i}@customer.example>" for i in range(1500)) + ", sales@mycompany.com"
    msg["Cc"] = ", ".join(f"q{i}@other.example" for i in range(1000))
    msg["Subject"] = "many recipients"
    msg["Message-ID"] = msgid = f"<{uid()}@customer.example>"
    msg.set_content("hello\n")
    reply = send(gw.pf.port("inbound"), sender, ["sales@mycompany.com"], msg.as_bytes(), timeout=120)
    assert reply.outcome == ACCEPTED, str(reply)
    assert reply.seconds < 20, f"{reply.seconds:.1f}s"
    [call] = wait_until(lambda: [c for c in gw.odoo.calls if msgid.encode() in c.message], 30, what="Odoo delivery")
    assert call.model == "crm.lead" and b"X-Mailgate-Route: alias:sales" in call.message


# --------------------------------------------------------------------------------------------
# Forged bounce tokens


def signer(gw: LabGateway) -> TokenSigner:
    return gw.token_signer()


def gateway_now(gw: LabGateway) -> float:
    return time.time() + float(gw.clock_file.read_text() or 0)


def forged_tokens(gw: LabGateway) -> dict[str, str]:
    good = signer(gw).make(1, "transactional", gateway_now(gw))
    flipped = good[:-1] + ("a" if good[-1] != "a" else "b")
    return {
        "wrong hmac": flipped,
        "truncated": good[:20],
        "one character short": good[:-1],
        "one character long": good + "a",
        "another installation's secret": TokenSigner(b"another-installation-secret-0123456789").make(
            1, "transactional", gateway_now(gw)),
        "not base32": "!" * 32,
        "too long": "a" * 200,
        "another store's identity": TokenSigner((gw.base / "secret").read_bytes().strip(), "f" * 32).make(
            1, "transactional", gateway_now(gw)),
        "future version": _with_version(gw, good, 3),
    }


def _with_version(gw: LabGateway, token: str, version: int) -> str:
    """A correctly signed token of a layout this gateway does not know (version byte changed)."""
    import hashlib
    import hmac
    raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    payload = bytes([version]) + raw[1:12]
    mac = hmac.new((gw.base / "secret").read_bytes().strip(), payload, hashlib.sha256).digest()[:8]
    return base64.b32encode(payload + mac).decode().rstrip("=").lower()


FORGED_NAMES = ["wrong hmac", "truncated", "one character short", "one character long",
                "another installation's secret", "another store's identity", "not base32", "too long",
                "future version"]


@pytest.mark.parametrize("name", FORGED_NAMES)
@pytest.mark.parametrize("listener, sender", [("inbound", ""), ("inbound", "mailer-daemon@remote.example"),
                                              ("submission", "")])
def test_forged_bounce_token_is_refused_at_rcpt(gw, name, listener, sender):
    address = f"bounce+{forged_tokens(gw)[name]}@mycompany.com"
    data, msgid = make_message("MAILER-DAEMON <mailer-daemon@remote.example>", address)
    reply = send(gw.pf.port(listener), sender, [address], data)
    code, text = reply.rcpt_codes[address]
    assert code == 550 and text.startswith("5.7.1 "), (code, text)
    assert delivered_copies(gw, msgid) == 0


@pytest.mark.parametrize("name", ["wrong hmac", "another installation's secret", "truncated"])
def test_forged_bounce_token_in_the_headers_is_refused_at_end_of_message(gw, name):
    """The envelope passes the policy service (the catchall); the forged token is only in To."""
    address = f"bounce+{forged_tokens(gw)[name]}@mycompany.com"
    data, msgid = make_message("MAILER-DAEMON <mailer-daemon@remote.example>", address)
    reply = send(gw.pf.port("inbound"), "", ["catchall@mycompany.com"], data)
    assert reply.outcome == PERMANENT and reply.stage == "data", str(reply)
    assert reply.code == 550 and reply.text.startswith("5.7.1 "), str(reply)
    assert delivered_copies(gw, msgid) == 0


def test_replayed_expired_token_is_recorded_stale_and_never_blacklists(gw):
    """A report on a token older than `bounces.token_days` (30) is signed by us, so it passes
    RCPT; it is recorded as stale and never counted: six of them spread over ten days blacklist
    nobody, while the same six on fresh tokens do (the control). Each report is on its own
    message, sent to both addresses: a report counts only for a message's own recipients, once
    (docs/rules.md B1)."""
    sender = f"app{uid()}@mycompany.com"
    stale_rcpt, fresh_rcpt = f"stale{uid()}@customer.example", f"fresh{uid()}@customer.example"
    moved = 0.0
    try:
        for _ in range(6):
            data, msgid = make_message(f'"App" <{sender}>', [stale_rcpt, fresh_rcpt])
            reply = send(gw.pf.port("submission"), sender, [stale_rcpt, fresh_rcpt], data)
            assert reply.outcome == ACCEPTED, str(reply)
            delivered(gw, msgid)
            [row] = db_rows(gw, "select id from messages where message_id = ?", msgid)
            now = gateway_now(gw)
            for failed, issued in ((stale_rcpt, now - 40 * DAY), (fresh_rcpt, now)):
                token = signer(gw).make(row["id"], "transactional", issued)
                report, _ = delivery_report(token, failed)
                answer = send(gw.pf.port("inbound"), "", [f"bounce+{token}@mycompany.com"], report)
                assert answer.outcome == ACCEPTED, str(answer)
            gw.move_clock(2 * DAY)
            moved += 2 * DAY
        wait_until(lambda: len(db_rows(gw, "select id from bounces where recipient in (?, ?)",
                                       stale_rcpt, fresh_rcpt)) == 12, 30, what="12 bounce rows")
    finally:
        gw.move_clock(-moved)
    stale_rows = db_rows(gw, "select stale, matched from bounces where recipient = ?", stale_rcpt)
    assert [(r["stale"], r["matched"]) for r in stale_rows] == [(1, 1)] * 6
    assert not db_rows(gw, "select id from blacklist where address = ?", stale_rcpt)
    fresh_rows = db_rows(gw, "select stale from bounces where recipient = ?", fresh_rcpt)
    assert [r["stale"] for r in fresh_rows] == [0] * 6
    assert db_rows(gw, "select id from blacklist where address = ? and removed_at is null", fresh_rcpt)


# --------------------------------------------------------------------------------------------
# Sockets and secrets


@pytest.mark.parametrize("name", ["milter.sock", "lookup.sock", "policy.sock"])
def test_sockets_are_for_postfix_only(gw, name):
    path = gw.base / name
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
    assert info.st_gid == grp.getgrnam("postfix").gr_gid
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); print('connected')\nexcept PermissionError: print('denied')\n")
    as_nobody = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", probe, str(path)],
                               capture_output=True, text=True, timeout=30)
    assert as_nobody.stdout.strip() == "denied", as_nobody
    as_postfix = subprocess.run(["runuser", "-u", "postfix", "--", sys.executable, "-c", probe, str(path)],
                                capture_output=True, text=True, timeout=30)
    assert as_postfix.stdout.strip() == "connected", as_postfix


def test_no_secret_in_any_log_after_sessions_that_use_them(gw):
    """SASL to the transactional server, Odoo's XML-RPC login (also when Odoo's error text echoes
    the password), bounce tokens made and checked, a reload: none of the secrets is logged."""
    # SASL: mycompany.com goes through the transactional server, with AUTH
    sender = f"app{uid()}@mycompany.com"
    data, msgid = make_message(f'"App" <{sender}>', "r@customer.example")
    assert send(gw.pf.port("submission"), sender, ["r@customer.example"], data).outcome == ACCEPTED
    [got] = delivered(gw, msgid)
    assert got.auth_user == SASL_USER
    # Odoo: a delivery, and one that fails with an error quoting the password
    who = f"c{uid()}@customer.example"
    gw.odoo.fail_with = f"psycopg2.OperationalError: password authentication failed ({ODOO_PASSWORD})"
    try:
        data, msgid = make_message(who, "sales@mycompany.com")
        reply = send(gw.pf.port("inbound"), who, ["sales@mycompany.com"], data)
        assert reply.outcome == ACCEPTED
        gw.pf.wait_for_log(rf"{reply.queue_id}: to=<sales@mycompany.com>, relay=mailgate-odoo.*status=deferred", 30)
    finally:
        gw.odoo.fail_with = None
    gw.pf.flush()
    wait_until(lambda: [c for c in gw.odoo.calls if msgid.encode() in c.message], 60, what="Odoo delivery")
    # a forged token (the secret is used to check it) and a reload
    forged = f"bounce+{forged_tokens(gw)['wrong hmac']}@mycompany.com"
    send(gw.pf.port("inbound"), "", [forged], make_message("x@y.example", forged)[0])
    before = gw.mailgate_log().count("event=reload")
    os.kill(gw.process.pid, 1)
    wait_until(lambda: gw.mailgate_log().count("event=reload") > before, 20, what="the reload")
    time.sleep(0.5)

    secret = (gw.base / "secret").read_bytes().strip().decode()
    plain = base64.b64encode(f"\0{SASL_USER}\0{SASL_PASSWORD}".encode()).decode()
    secrets = {"SASL password": SASL_PASSWORD, "Odoo password": ODOO_PASSWORD, "bounce secret": secret,
               "AUTH PLAIN blob": plain}
    logs = {"mailgate": gw.mailgate_log(), "postfix": gw.pf.log_text()}
    assert "***" in logs["postfix"] or "password authentication failed" in logs["postfix"]
    for log_name, text in logs.items():
        for secret_name, value in secrets.items():
            assert value not in text, f"{secret_name} in the {log_name} log"


# --------------------------------------------------------------------------------------------
# Malformed and several From headers (docs/rules.md O5; issue 15, items 2 and 3)

# Shapes no parser reads as mailboxes, each holding a foreign address. For local submission
# Postfix's own header rewriting turns some into mailboxes (`Doe` becomes `Doe@myorigin`); for a
# remote client (Odoo on another host) it leaves them alone, so both are tried.
MALFORMED_FROMS = {
    "unquoted comma in the name": b"Doe, John <john@example.com>",
    "garbage after the address": b"<admin@example.com>, garbage",
    "unclosed comment": b"Name (unclosed <a@example.com>",
    "doubled angle bracket": b"<<a@example.com>",
    "encoded word that decodes to an address and CRLF": b"=?utf-8?q?evil@example.com=0D=0A?=",
    "encoded word hiding the address": b"=?utf-8?b?" + base64.b64encode(b"x@example.com\r\n") + b"?= garbage",
}


@pytest.fixture(scope="module")
def remote_gw():
    """A gateway whose Postfix treats every client as remote (`local_header_rewrite_clients`
    empty, `remote_header_rewrite_domain` empty): headers reach the milter exactly as sent, as
    from an Odoo on another host submitting with SASL."""
    with gateway(GATEWAY_EXTRA_CONFIG, main_cf_extra={"local_header_rewrite_clients": ""}) as lab:
        yield lab


def _unfolded(value: bytes) -> str:
    return value.decode("ascii", "replace")


def assert_one_notification_from(data: bytes) -> str:
    """Exactly one From, which parses to the notification address and names no other address."""
    value = _unfolded(assert_clean_head(data))
    assert [a for _, a in email.utils.getaddresses([value])] == [NOTIFICATION], value
    assert "example.com" not in value and "attacker" not in value, value
    return value


@pytest.mark.parametrize("where", ["local", "remote"])
@pytest.mark.parametrize("header_from", list(MALFORMED_FROMS.values()), ids=list(MALFORMED_FROMS))
def test_malformed_from_with_a_foreign_address_is_replaced(gw, remote_gw, where, header_from):
    lab = gw if where == "local" else remote_gw
    data, msgid = raw_message(header_from)
    reply = send(lab.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True)
    assert reply.outcome == ACCEPTED, str(reply)
    [got] = delivered(lab, msgid)
    assert_one_notification_from(got.data)
    assert re.search(r"role=outbound .*rewritten=yes .*malformed_from=", lab.mailgate_log()), "no malformed_from="


SECOND_FROMS = {
    "foreign address": b"evil@attacker.example",
    "malformed foreign address": b"Doe, Evil <evil@attacker.example>",
    "our own domain": b"jane@mycompany.com",
}


@pytest.mark.parametrize("where", ["local", "remote"])
@pytest.mark.parametrize("second", list(SECOND_FROMS.values()), ids=list(SECOND_FROMS))
def test_several_from_headers_leave_as_one_notification_from(gw, remote_gw, where, second):
    """Issue 15 item 2: the second From used to leave as written, with `rewritten=yes` logged."""
    lab = gw if where == "local" else remote_gw
    data, msgid = raw_message(b'"Admin" <admin@example.com>', extra=b"From: " + second + b"\r\n")
    reply = send(lab.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True)
    assert reply.outcome == ACCEPTED, str(reply)
    [got] = delivered(lab, msgid)
    value = assert_one_notification_from(got.data)
    assert email.utils.getaddresses([value])[0][0] == "Admin"
    assert re.search(r"role=outbound .*malformed_from=\"several From headers\" froms_removed=1 ", lab.mailgate_log())


def test_message_without_from_leaves_with_the_notification_address(remote_gw):
    msgid = f"<{uid()}@lab.example>"
    data = (b"To: r@customer.example\r\nSubject: no From\r\nMessage-ID: " + msgid.encode()
            + b"\r\n\r\nbody\r\n")
    reply = send(remote_gw.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True)
    assert reply.outcome == ACCEPTED, str(reply)
    [got] = delivered(remote_gw, msgid)
    assert_one_notification_from(got.data)


def test_malformed_from_reject_refuses_with_554_5_6_0(remote_gw):
    """`malformed_from: reject`: the same shapes are refused for good, with the table's reply."""
    lab = remote_gw
    original = lab.config_path.read_text()
    reloads = lab.mailgate_log().count("event=reload result=ok")
    try:
        lab.config_path.write_text(original + "malformed_from: reject\n")
        os.kill(lab.process.pid, signal.SIGHUP)
        wait_until(lambda: lab.mailgate_log().count("event=reload result=ok") > reloads, 20, what="reload")
        for header_from in (MALFORMED_FROMS["unquoted comma in the name"], b"a@example.com"):
            extra = b"From: evil@attacker.example\r\n" if header_from == b"a@example.com" else b""
            data, msgid = raw_message(header_from, extra=extra)
            reply = send(lab.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True)
            assert reply.outcome == PERMANENT and reply.code == 554, str(reply)
            assert reply.text.startswith("5.6.0 "), str(reply)
        data, msgid = raw_message(b'"Admin" <admin@example.com>')  # well formed: rewritten as ever
        reply = send(lab.pf.port("submission"), "a@example.com", ["r@customer.example"], data, raw=True)
        assert reply.outcome == ACCEPTED, str(reply)
        assert NOTIFICATION.encode() in assert_clean_head(delivered(lab, msgid)[0].data)
    finally:
        lab.config_path.write_text(original)
        os.kill(lab.process.pid, signal.SIGHUP)
        wait_until(lambda: lab.mailgate_log().count("event=reload result=ok") >= reloads + 2, 20, what="reload")


# --------------------------------------------------------------------------------------------
# Pure rules, with Hypothesis


CONFIG = parse_config("""
alias_domain: mycompany.com
default_from: notifications
servers:
  - {name: trans, host: t.example.net, from_filter: mycompany.com, priority: 1}
  - {name: partner, host: p.example.net, from_filter: partner.example, priority: 2}
mass_mail: {server: trans}
allowed_alias_domains: [mycompany.com, othercompany.example]
aliases:
  sales: {target: "odoo:crm.lead"}
  commercial: {target: "odoo:crm.lead", incoming_local: true}
fallback_target: null
""", check_files=False).config

HOSTILE_CHARS = st.sampled_from(list("\r\n\0\t \"\\<>()@,;:[]=?'\u2028\u0085\x7f\u00e9\u202e") + ["=?", "?="])
hostile_text = st.lists(st.one_of(HOSTILE_CHARS, st.text(max_size=4)), max_size=12).map("".join)
SMUGGLED = [b"A\r\nBcc: v@x.example", b"\0X-Injected: 1", "\u2028X: 1".encode(), b'"\\<>@', b"=?utf-8?q?x?="]


def _word(charset: str, enc: str, payload: bytes) -> str:
    if enc == "b":
        return f"=?{charset}?b?{base64.b64encode(payload).decode()}?="
    return f"=?{charset}?q?{''.join(f'={c:02X}' for c in payload)}?="


encodings = st.sampled_from(["b", "q"])
# encoded words whose bytes decode in their charset (what any correct mailer sends)
decodable_word = st.one_of(
    st.builds(_word, st.sampled_from(["utf-8", "UTF-8", "utf-8*fr"]), encodings,
              st.one_of(st.text(max_size=12).map(lambda t: t.encode("utf-8")), st.sampled_from(SMUGGLED))),
    st.builds(_word, st.sampled_from(["iso-8859-1", "windows-1252"]), encodings, st.binary(max_size=24)
              .map(lambda b: bytes(c for c in b if c not in range(0x80, 0xa0)))),
    st.builds(_word, st.sampled_from(["x-unknown", "us-ascii", ""]), encodings,
              st.binary(max_size=24).map(lambda b: bytes(c & 0x7F for c in b))),
    st.just("=?utf-8?b?!!!?="), st.just("=?utf-8?q?=ZZ?="))
# any bytes in any charset: invalid sequences, lone surrogates, split characters
any_word = st.builds(_word, st.sampled_from(["utf-8", "utf-16", "utf-7", "x-unknown", "iso-2022-jp", "utf-32"]),
                     encodings, st.binary(max_size=24))
local = st.one_of(st.from_regex(r"[a-z0-9._+-]{1,12}", fullmatch=True), hostile_text,
                  st.just('"quoted local"'), st.just("a\r\nb"))
domain = st.one_of(st.sampled_from(["mycompany.com", "partner.example", "example.org", "MyCompany.COM",
                                    "ééé.com", "xn--9caaa.com", "[127.0.0.1]", "", "a..b"]), hostile_text)
address = st.builds(lambda lp, d: f"{lp}@{d}", local, domain)
# what Postfix lets through as MAIL FROM (no controls, no spaces, no brackets)
envelope_sender = st.one_of(st.none(), st.just(""), address.filter(
    lambda a: not re.search(r"[\x00-\x20\x7f<>]", a)))


def header_from_values(word):
    display = st.one_of(hostile_text, word, st.lists(word, min_size=1, max_size=5).map(" ".join),
                        st.builds(lambda t: f'"{t}"', hostile_text), st.builds(lambda w: f'"{w}"', word))
    return st.one_of(
        st.none(), address, hostile_text,
        st.builds(lambda n, a: f"{n} <{a}>", display, address),
        st.lists(st.builds(lambda n, a: f"{n} <{a}>", display, address), min_size=2, max_size=3).map(", ".join),
        st.builds(lambda g, a: f"{g}: {a};", hostile_text, address))


header_from = header_from_values(decodable_word)
undecodable = st.one_of(
    header_from_values(any_word),
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")))


def _check_outbound(value: str | None, sender: str | None, mass: bool) -> None:
    decision = decide_outbound(CONFIG, OutboundRequest(value, sender, mass))
    assert decision.server is not None
    assert isinstance(decision.envelope_from, str)
    for char in "\r\n\0":
        assert char not in decision.envelope_from
    if decision.rewritten:
        new = decision.header_from
        for char in "\r\n\0":
            assert char not in new, repr(new)
        new.encode("utf-8")  # it goes to Postfix as UTF-8 (chgheader)
        # (RFC 5322 parsing, without decoding encoded words inside quotes as some MUAs do)
        assert [a for _, a in email.utils.getaddresses([new])] == [NOTIFICATION], (value, new)


@settings(max_examples=examples(1500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_from, envelope_sender, st.booleans())
def test_outbound_from_handling_is_total_and_never_unsafe(value, sender, mass):
    _check_outbound(value, sender, mass)


@settings(max_examples=examples(300), deadline=None)
@given(undecodable, st.booleans())
@example("=?utf-8?q?Zo=C3?= =?utf-8?q?=AB?= <a@example.com>", False)
@example("Caf\udce9 <a@example.com>", False)
def test_outbound_from_handling_is_total_on_undecodable_input(value, mass):
    _check_outbound(value, "a@example.com", mass)


message_id = st.one_of(st.none(), st.builds(lambda t: f"<{t}@x.example>", hostile_text), hostile_text,
                       st.just("<a-loop-detection-bounce-email@x>"))
header_name = st.sampled_from(["From", "To", "Cc", "Delivered-To", "Resent-To", "Resent-Cc", "References",
                               "In-Reply-To", "Message-ID", "Content-Type", "X-Other"])
header_value = st.one_of(header_from.map(lambda v: v or ""), message_id.map(lambda v: v or ""),
                         st.sampled_from(["multipart/report; report-type=delivery-status",
                                          "multipart/report; report-type=\"delivery-status\"; boundary=x",
                                          "sales@mycompany.com", "catchall@mycompany.com",
                                          "bounce+aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@mycompany.com",
                                          "commercial@othercompany.example, commercial@gmail.com",
                                          "MAILER-DAEMON@remote.example"]),
                         st.just(""))
undecodable_value = undecodable.map(lambda v: v or "")
envelope = st.lists(st.one_of(address, st.sampled_from(["sales@mycompany.com", "catchall@mycompany.com",
                                                        "bounce@mycompany.com", "SALES@MyCompany.com"])),
                    max_size=4)


def _check_inbound(headers, rcpts, sender, count, known, valid) -> None:
    message = InboundMessage(tuple(headers), tuple(rcpts), sender)
    decision = decide_inbound(
        CONFIG, message,
        known_outbound=lambda ids: ids[0] if known and ids else None,
        already_received=lambda msgid: count % 7 == 0,
        recent_count=lambda s, k: count,
        verify_token=lambda token: BounceToken(1, 0, 0) if valid else None)
    assert decision.action in {"deliver", "reject", "defer", "hold", "drop"}
    if decision.action in ("reject", "defer"):
        assert re.fullmatch(r"[45]\d\d [45]\.\d{1,3}\.\d{1,3} \S.*", str(decision.reply)), decision.reply
        assert str(decision.reply)[0] == ("5" if decision.action == "reject" else "4")
    else:
        assert decision.reply is None
    if decision.action == "deliver":
        assert decision.routes
    for label in decision.labels:   # they become the X-Mailgate-Route header: one line
        assert not re.search(r"[\r\n]", label), label


inbound_args = (envelope, st.one_of(st.just(""), address), st.integers(min_value=0, max_value=40), st.booleans(),
                st.booleans())


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(header_name, header_value), max_size=10), *inbound_args)
def test_inbound_routing_is_total_and_well_formed(headers, rcpts, sender, count, known, valid):
    _check_inbound(headers, rcpts, sender, count, known, valid)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(header_name, st.one_of(header_value, undecodable_value)), max_size=10), *inbound_args)
@example([("Content-Type", b'text/plain; charset="\xc3\xa9\xe9"'.decode("utf-8", "surrogateescape"))],
         [], "", 0, False, False)
def test_inbound_routing_is_total_on_undecodable_input(headers, rcpts, sender, count, known, valid):
    _check_inbound(headers, rcpts, sender, count, known, valid)
