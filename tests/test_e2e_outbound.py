"""The outbound path end to end: a real Postfix, `mailgate serve`, sinks as upstream servers.

One gateway serves the module (see `mailgate.lab.gateway` for its three servers); every test
uses its own addresses and finds its mail by queue id, so the tests do not depend on order.
"""

from __future__ import annotations

import email.header
import email.headerregistry
import email.policy
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import time
import uuid
from dataclasses import dataclass
from email.message import EmailMessage

import pytest

from mailgate.lab.gateway import SASL_USER, LabGateway
from mailgate.lab.sinks import ReceivedMessage
from mailgate.rules.tokens import TokenSigner, split_tokenised

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]


def message(header_from: str, to: str, **headers: str) -> tuple[bytes, str]:
    msg = EmailMessage()
    msg["From"] = header_from
    msg["To"] = to
    msg["Subject"] = "e2e"
    msg["Message-ID"] = msgid = f"<{uuid.uuid4().hex}@app.example>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello from the e2e tests.\n")
    return msg.as_bytes(), msgid


def rcpt() -> str:
    return f"r{uuid.uuid4().hex[:10]}@customer.example"


def db_row(gw: LabGateway, queue_id: str) -> dict:
    with sqlite3.connect(gw.base / "state" / "mailgate.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("select * from messages where queue_id = ?", [queue_id]).fetchone()
    assert row is not None, f"no message row for {queue_id}"
    return dict(row)


def signer(gw: LabGateway) -> TokenSigner:
    return gw.token_signer()


@dataclass
class Outcome:
    queue_id: str
    message_id: str
    sink: str
    got: ReceivedMessage


def send(gw: LabGateway, header_from: str, sender: str, listener: str = "submission", **headers: str) -> Outcome:
    """Submit one message over SMTP and wait until Postfix delivered it to a sink."""
    to = rcpt()
    data, msgid = message(header_from, to, **headers)
    sent = gw.submit(data, sender, [to], listener=listener)
    sink, index = gw.delivery(sent.queue_id, to)
    return Outcome(sent.queue_id, msgid, sink, gw.sinks[sink].messages[index])


def test_filtered_domain_keeps_from_and_tokenises_bounce(gw):
    out = send(gw, '"Jane Doe" <jane@mycompany.com>', "jane@mycompany.com")
    sink, got = out.sink, out.got
    assert sink == "transactional" and got.tls and got.auth_user == SASL_USER
    assert got.parsed["From"] == "Jane Doe <jane@mycompany.com>"
    token, domain = split_tokenised(got.mail_from, "bounce")
    assert domain == "mycompany.com"
    row = db_row(gw, out.queue_id)
    parsed = signer(gw).verify(token)
    assert parsed is not None and parsed.row_id == row["id"]
    assert row["message_id"] == out.message_id and row["server"] == "transactional" and row["mass"] == 0
    # O1: an envelope sender on the alias domain is this message's bounce address (kept to pass
    # bounces on); on the wire it becomes the tokenised bounce address.
    assert row["envelope_from_original"] == "jane@mycompany.com" and row["envelope_from"] == "jane@mycompany.com"
    assert re.search(rf"{out.queue_id}: role=outbound from=<jane@mycompany.com> "
                     r"header_from=<jane@mycompany.com> rewritten=no .*server=transactional reason=from-domain",
                     gw.mailgate_log())


def test_foreign_domain_is_encapsulated_with_display_name(gw):
    out = send(gw, '"Admin" <admin@example.com>', "admin@example.com")
    sink, got = out.sink, out.got
    assert sink == "transactional"
    raw_from = re.search(rb"^From: (.*)$", got.data, re.M).group(1).strip()
    assert raw_from == b'"Admin" <notifications@mycompany.com>'
    assert got.mail_from.startswith("bounce+")
    row = db_row(gw, out.queue_id)
    assert row["header_from_before"] == '"Admin" <admin@example.com>'
    assert row["header_from_after"] == '"Admin" <notifications@mycompany.com>'


def test_non_ascii_display_name_survives_encapsulation(gw):
    out = send(gw, '"Zoë Ünal" <zoe@example.org>', "zoe@example.org")
    got = out.got
    assert got.parsed["From"].addresses[0].display_name == "Zoë Ünal"
    assert got.parsed["From"].addresses[0].addr_spec == "notifications@mycompany.com"


def test_server_filtered_on_other_domain_gets_from_as_envelope(gw):
    out = send(gw, "Partner Desk <desk@partner.example>", "desk@partner.example")
    sink, got = out.sink, out.got
    assert sink == "partner" and not got.tls
    assert got.mail_from == "desk@partner.example"
    assert got.parsed["From"] == "Partner Desk <desk@partner.example>"


def test_mass_listener_goes_to_mass_server(gw):
    out = send(gw, '"Newsletter" <news@mycompany.com>', "news@mycompany.com", listener="mass")
    sink, got = out.sink, out.got
    assert sink == "mass" and got.tls and got.mail_from.startswith("bounce+")
    assert got.parsed["From"] == "Newsletter <news@mycompany.com>"
    assert db_row(gw, out.queue_id)["mass"] == 1


def test_mass_stream_header_is_honoured_and_removed(gw):
    out = send(gw, "Shop <shop@example.net>", "shop@example.net", X_Mailgate_Stream="mass")
    sink, got = out.sink, out.got
    assert sink == "mass"
    assert got.parsed["From"] == "Shop <shop@example.net>"
    assert "X-Mailgate-Stream" not in got.parsed


def test_odoo_bounce_address_is_kept_for_passing_bounces_on(gw):
    odoo_bounce = "bounce+991-mail.mail-17@mycompany.com"
    out = send(gw, '"Sales" <sales@mycompany.com>', odoo_bounce)
    sink, got = out.sink, out.got
    assert sink == "transactional"
    assert got.mail_from != odoo_bounce and signer(gw).verify(split_tokenised(got.mail_from, "bounce")[0])
    row = db_row(gw, out.queue_id)
    assert row["envelope_from_original"] == odoo_bounce and row["envelope_from"] == odoo_bounce


def test_sendmail_gets_the_same_treatment(gw):
    to = rcpt()
    data, msgid = message('"Cron" <cron@example.com>', to)
    gw.pf.sendmail("cron@example.com", [to], data)
    queue_id = gw.pf.wait_for_log(rf"(\w+): message-id={re.escape(msgid)}", 20).group(1)
    sink, index = gw.delivery(queue_id, to)
    got = gw.sinks[sink].messages[index]
    assert sink == "transactional"
    assert re.search(rb'^From: "Cron" <notifications@mycompany.com>', got.data, re.M)
    assert got.mail_from.startswith("bounce+")


def test_mailgate_down_tempfails_and_nothing_is_lost(gw):
    """Stopped: SMTP clients get 4xx, sendmail mail waits; restarted: all of it goes out right."""
    assert gw.stop_mailgate() == 0
    to_smtp, to_local = rcpt(), rcpt()
    data, _ = message('"Down" <down@example.com>', to_smtp)
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        gw.submit(data, "down@example.com", [to_smtp])
    assert 400 <= refused.value.smtp_code < 500
    local_data, msgid = message('"Local" <local@example.com>', to_local)
    gw.pf.sendmail("local@example.com", [to_local], local_data)
    time.sleep(2)
    assert not any(to_local in rcpts for s in gw.sinks.values() for m in s.messages for rcpts in [m.rcpt_tos])
    assert gw.pf.queue_files(), "sendmail mail must wait in the queue while mailgate is down"

    gw.start_mailgate()
    sent = gw.submit(data, "down@example.com", [to_smtp])  # the client's retry
    sink, index = gw.delivery(sent.queue_id, to_smtp)
    assert sink == "transactional"
    assert b'"Down" <notifications@mycompany.com>' in gw.sinks[sink].messages[index].data
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        gw.pf.flush()
        kick_pickup(gw)
        found = [m for m in gw.sinks["transactional"].messages if to_local in m.rcpt_tos]
        if found:
            break
        time.sleep(1)
    assert found, "the queued sendmail message was not delivered after mailgate came back"
    assert b'"Local" <notifications@mycompany.com>' in found[0].data
    assert found[0].mail_from.startswith("bounce+")


def kick_pickup(gw: LabGateway) -> None:
    """Wake pickup so that mail waiting in maildrop is retried now."""
    subprocess.run(["postkick", "-c", str(gw.pf.config_dir), "public", "pickup", "W"],
                   capture_output=True, timeout=10)


def test_lookup_answers_postfix_directly(gw):
    """Postfix's own client (postmap) asks the socketmap the way qmgr does."""
    token = signer(gw).make(1, "mass", time.time())
    lookup = f"socketmap:unix:{gw.base}/lookup.sock:transport"

    def query(key: str) -> subprocess.CompletedProcess:
        return subprocess.run(["postmap", "-c", str(gw.pf.config_dir), "-q", key, lookup],
                              capture_output=True, text=True, timeout=10)
    assert query(f"bounce+{token}@mycompany.com").stdout.strip() == \
        f"mg-mass:[localhost]:{gw.sinks['mass'].port}"
    assert query("desk@partner.example").stdout.strip() == f"mg-partner:[127.0.0.1]:{gw.sinks['partner'].port}"
    assert query("anyone@else.example").stdout.strip().startswith("mg-transactional:")
    password = subprocess.run(["postmap", "-c", str(gw.pf.config_dir), "-q", "[localhost]:1",
                               f"socketmap:unix:{gw.base}/lookup.sock:sasl-transactional"],
                              capture_output=True, text=True, timeout=10)
    assert password.stdout.strip() == f"{SASL_USER}:relay-password"


def test_sockets_are_0660_for_the_postfix_group(gw):
    import grp
    import os
    import stat
    for name in ("milter.sock", "lookup.sock"):
        info = os.stat(gw.base / name)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660, name
        assert info.st_gid == grp.getgrnam("postfix").gr_gid, name


def test_a_reload_reaches_the_milter_process(gw):
    """SIGHUP goes to `serve`; the milter runs in its own process and must rewrite with the new
    configuration from the next message on (and with the old one again after the next reload)."""
    original = gw.config_path.read_text()
    assert "default_from: notifications" in original
    reloads = gw.mailgate_log().count("event=reload result=ok")
    try:
        gw.config_path.write_text(original.replace("default_from: notifications", "default_from: robot"))
        os.kill(gw.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while gw.mailgate_log().count("event=reload result=ok") == reloads:
            assert time.monotonic() < deadline, "no reload"
            time.sleep(0.1)
        got = send(gw, '"Admin" <admin@example.com>', "admin@example.com").got
        assert re.search(rb"^From: (.*)$", got.data, re.M).group(1).strip() == b'"Admin" <robot@mycompany.com>'
    finally:
        gw.config_path.write_text(original)
        os.kill(gw.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while gw.mailgate_log().count("event=reload result=ok") < reloads + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    got = send(gw, '"Admin" <admin@example.com>', "admin@example.com").got
    assert re.search(rb"^From: (.*)$", got.data, re.M).group(1).strip() == b'"Admin" <notifications@mycompany.com>'


# docs/rules.md O5: the rewritten From is folded (issue 15, item 5), a comment is a name (item 8).

LONG_NAMES = {
    "long ASCII name with spaces and quotes": 'Jane "JJ" Doe, Sales \\ Support Team ' * 40,
    "long non-ASCII name": "Zoë Ünal-Élodie Łukasz Ørsted 東京 " * 40,
    "one long ASCII word": "N" * 900,
}


def _from_lines(data: bytes) -> list[bytes]:
    """The physical lines of the From header as the sink received them."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    start = next(i for i, line in enumerate(head) if line.lower().startswith(b"from:"))
    end = start + 1
    while end < len(head) and head[end][:1] in (b" ", b"\t"):
        end += 1
    return head[start:end]


def _display_name(unfolded: str) -> str:
    """The one mailbox's name, read by the email package: its header registry for a quoted name,
    RFC 2047 decoding for encoded words (the registry keeps the white space between them, which
    RFC 2047 6.2 says to drop)."""
    [mailbox] = email.policy.default.header_factory("From", unfolded).addresses
    assert mailbox.addr_spec == "notifications@mycompany.com", unfolded
    if "=?" not in unfolded:
        return mailbox.display_name
    words = unfolded.rpartition("<")[0].strip()
    return str(email.header.make_header(email.header.decode_header(words)))


def _folded_author(name: str, address: str) -> bytes:
    """A well-formed, folded From as a careful client writes it: a quoted name folded before
    its spaces, or the email package's own encoded words. (The email package's refolding of a
    long quoted name drops its quotes, so it is not used for that.)"""
    if name.isascii():
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return ('"' + quoted.replace(" ", "\r\n ") + f'" <{address}>').encode()
    return (email.header.Header(name, "utf-8").encode(maxlinelen=76) + f" <{address}>").encode()


@pytest.mark.parametrize("name", list(LONG_NAMES.values()), ids=list(LONG_NAMES))
def test_long_names_are_folded_and_round_trip_through_postfix(gw, name):
    name = name.strip()
    to = rcpt()
    msgid = f"<{uuid.uuid4().hex}@app.example>"
    data = (b"From: " + _folded_author(name, "long@example.org") + b"\r\nTo: " + to.encode()
            + b"\r\nSubject: long name\r\nMessage-ID: " + msgid.encode() + b"\r\n\r\nbody\r\n")
    sent = gw.submit(data, "long@example.org", [to])
    sink, index = gw.delivery(sent.queue_id, to)
    out = Outcome(sent.queue_id, msgid, sink, gw.sinks[sink].messages[index])
    lines = _from_lines(out.got.data)
    assert all(len(line) <= 78 for line in lines), [len(line) for line in lines]
    unfolded = b"".join(lines).decode("ascii")[len("From:"):]
    assert _display_name(unfolded) == name
    assert out.got.parsed["From"].addresses[0].addr_spec == "notifications@mycompany.com"


def test_a_comment_is_kept_as_the_display_name(gw):
    out = send(gw, "admin@example.com (Admin Person)", "admin@example.com")
    assert out.got.parsed["From"].addresses[0].display_name == "Admin Person"
    assert out.got.parsed["From"].addresses[0].addr_spec == "notifications@mycompany.com"
