"""Bounces, the blacklist and the daily quota end to end, through the real Postfix.

An upstream sink refuses gone@customer.example with 550 5.1.1; Postfix's own report goes to the
tokenised bounce address, through the milter (internal_mail_filter_classes = bounce), and is
recorded. The gateway's clock is moved forward instead of sleeping.
"""

from __future__ import annotations

import re
import smtplib
import sqlite3
import time
import uuid
from email.message import EmailMessage

import pytest

from mailgate.lab.gateway import GONE, LabGateway
from mailgate.rules.replies import POLICY

DAY = 86400


pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]


def message(header_from: str, to: list[str], **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = header_from, ", ".join(to), "bounce e2e"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@mycompany.com>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello.\n")
    return msg.as_bytes()


def rows(gw: LabGateway, sql: str, *params) -> list[dict]:
    with sqlite3.connect(gw.base / "state" / "mailgate.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]


def wait_rows(gw: LabGateway, count: int, sql: str, *params, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = rows(gw, sql, *params)
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{len(found)} of {count} rows for {sql}")


def bounce_once(gw: LabGateway, envelope: str = "sales@mycompany.com") -> str:
    """Send to the address every sink refuses; return the queue id of the outbound message once
    its report is recorded (so that a clock moved next does not date the bounce)."""
    sent = gw.submit(message('"Sales" <sales@mycompany.com>', [GONE]), envelope, [GONE])
    gw.pf.wait_for_log(rf"{sent.queue_id}: to=<{GONE}>, .*status=bounced", 30)
    [outbound] = rows(gw, "select id from messages where queue_id = ?", sent.queue_id)
    wait_rows(gw, 1, "select id from bounces where message = ?", outbound["id"])
    return sent.queue_id


def test_postfix_report_is_recorded_and_handed_back_to_odoos_bounce_address(gw):
    odoo_bounce = f"bounce+{uuid.uuid4().hex[:6]}-mail.mail-17@mycompany.com"
    queue_id = bounce_once(gw, envelope=odoo_bounce)
    [outbound] = rows(gw, "select * from messages where queue_id = ?", queue_id)
    [bounce] = wait_rows(gw, 1, "select * from bounces where message = ?", outbound["id"])
    assert bounce["recipient"] == GONE and bounce["status"] == "5.1.1" and bounce["permanent"] == 1
    assert bounce["server"] == "transactional" and bounce["stale"] == 0 and bounce["matched"] == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(odoo_bounce.encode() in c.message for c in gw.odoo.calls):
        time.sleep(0.2)
    [call] = [c for c in gw.odoo.calls if odoo_bounce.encode() in c.message]
    assert f"Delivered-To: {odoo_bounce}".encode() in call.message and call.model is None
    assert re.search(rf"role=bounce rcpt=<{GONE}> status=5.1.1 permanent=yes message={outbound['id']} "
                     r"server=transactional .*reason=userunknown hard=yes", gw.mailgate_log())
    assert (bounce["reason"], bounce["hard"]) == ("userunknown", 1) and "User unknown" in bounce["diagnostic"]


def test_five_bounces_over_weeks_blacklist_mass_mail_but_not_transactional(gw):
    before = len(rows(gw, "select id from bounces where recipient = ?", GONE))
    for _ in range(5 - before):
        gw.move_clock(2 * DAY)
        bounce_once(gw)
    wait_rows(gw, 1, "select * from blacklist where address = ? and removed_at is null", GONE)
    [entry] = rows(gw, "select * from blacklist where address = ?", GONE)
    assert entry["source"] == "rule" and len(entry["bounce_ids"].split(",")) >= 5
    assert "hard bounces" in entry["reason"]

    # mass mail known at RCPT (the mass listener): refused there
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        gw.submit(message("News <news@mycompany.com>", [GONE]), "news@mycompany.com", [GONE], listener="mass")
    assert refused.value.smtp_code == 550 and b"blacklisted" in refused.value.smtp_error

    # mass mail known only from its headers: the milter removes the recipient, the others get it
    alive = f"alive{uuid.uuid4().hex[:6]}@customer.example"
    sent = gw.submit(message("Shop <shop@mycompany.com>", [GONE, alive], X_Mailgate_Stream="mass"),
                     "shop@mycompany.com", [GONE, alive])
    sink, _ = gw.delivery(sent.queue_id, alive)
    assert sink == "mass"
    assert re.search(rf"{sent.queue_id}: role=blacklist rcpt=<{GONE}> action=removed mass=yes", gw.mailgate_log())
    only_gone = gw.submit(message("Shop <shop@mycompany.com>", [GONE], X_Mailgate_Stream="mass"),
                          "shop@mycompany.com", [GONE])
    gw.pf.wait_for_log(rf"{only_gone.queue_id}: milter-discard", 20)

    # transactional mail is never blocked by the blacklist, only logged
    queue_id = bounce_once(gw)
    assert re.search(rf"{queue_id}: role=blacklist rcpt=<{GONE}> action=logged mass=no", gw.mailgate_log())


def test_operator_removal_clears_the_blacklist(gw):
    import subprocess
    import sys
    from pathlib import Path
    mailgate = str(Path(sys.executable).with_name("mailgate"))
    address = f"manual{uuid.uuid4().hex[:6]}@customer.example"
    run = lambda *args: subprocess.run([mailgate, *args, "--config", str(gw.config_path)],  # noqa: E731
                                       capture_output=True, text=True, timeout=60)
    assert run("blacklist", "add", address, "--reason", "asked by the customer").returncode == 0
    listed = run("blacklist", "list", "--json")
    assert address in listed.stdout
    assert run("blacklist", "remove", address).returncode == 0
    why = run("blacklist", "why", address)
    assert "not blacklisted" in why.stdout and "asked by the customer" in why.stdout


def test_quota_defers_the_201st_recipient_of_a_day(gw):
    shop = f"q{uuid.uuid4().hex[:6]}.example"
    recipients = [f"r{i}@customer.example" for i in range(201)]
    with smtplib.SMTP("127.0.0.1", gw.pf.port("submission"), timeout=60) as client:
        client.ehlo("lab.client")
        assert client.mail(f"app@{shop}")[0] == 250
        codes = [client.rcpt(r) for r in recipients]
        assert all(code == 250 for code, _ in codes[:200])
        code, reply = codes[200]
        assert code == 450 and reply.endswith(POLICY["quota_defer"].split(" ", 2)[2].encode())
        assert client.data(message(f"App <app@{shop}>", recipients[:200]))[0] == 250
    assert re.search(rf"role=policy from=<app@{shop}> rcpt=<r200@customer.example> verdict=quota_defer",
                     gw.mailgate_log())
    gw.move_clock(DAY + 60)
    with smtplib.SMTP("127.0.0.1", gw.pf.port("submission"), timeout=60) as client:
        client.ehlo("lab.client")
        client.mail(f"app@{shop}")
        assert client.rcpt(recipients[200])[0] == 250
        client.rset()


# -- docs/rules.md B1: a report counts only for the message's own recipients, once -----------------


def uid() -> str:
    return uuid.uuid4().hex[:8]


def sent_token(gw: LabGateway, recipients: list[str]) -> tuple[str, int]:
    """Send one message to `recipients` (all delivered); (the token of its envelope, its row id)."""
    sent = gw.submit(message('"Sales" <sales@mycompany.com>', recipients), "sales@mycompany.com", recipients)
    sink, index = gw.delivery(sent.queue_id, recipients[0])
    mail_from = gw.sinks[sink].messages[index].mail_from
    token = re.fullmatch(r"bounce\+([a-z2-7]{32})@mycompany\.com", mail_from)
    assert token, mail_from
    [row] = rows(gw, "select id from messages where queue_id = ?", sent.queue_id)
    return token.group(1), row["id"]


def report_naming(to: str, failed: list[str]) -> tuple[bytes, str]:
    """An RFC 3464 report to `to` with one failed group per address (any number of them)."""
    report_id = f"<{uuid.uuid4().hex}@remote.example>"
    groups = "".join(f"Final-Recipient: rfc822; {address}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
                     "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n" for address in failed)
    text = (f"From: MAILER-DAEMON@remote.example\r\nTo: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
            f"Message-ID: {report_id}\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            "--B\r\nContent-Type: text/plain\r\n\r\nIt bounced.\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; remote.example\r\n\r\n"
            f"{groups}--B--\r\n")
    return text.encode(), report_id


def send_report(gw: LabGateway, to: str, failed: list[str]) -> str:
    """The report through Postfix's inbound listener, null sender; returns its Message-ID once
    mailgate has logged its summary line."""
    data, report_id = report_naming(to, failed)
    with smtplib.SMTP("127.0.0.1", gw.pf.port("inbound"), timeout=60) as client:
        client.ehlo("remote.example")
        assert client.mail("")[0] == 250
        code, reply = client.rcpt(to)
        assert code == 250, (code, reply)
        code, reply = client.data(data)
        assert code == 250, (code, reply)
    queue_id = re.search(rb"queued as (\w+)", reply).group(1).decode()
    deadline = time.monotonic() + 30
    while f"{queue_id}: role=bounce report=dsn failed={len(failed)} " not in gw.mailgate_log():
        assert time.monotonic() < deadline, f"no summary line for the report {queue_id}"
        time.sleep(0.2)
    return queue_id


def test_a_report_naming_five_hundred_strangers_counts_only_the_real_recipient_once(gw):
    """B1: the report's address is in every recipient's Return-Path; naming 500 people who never
    got the message writes nothing for them, and the same failure under another Message-ID is
    not a second bounce. One report writes at most as many rows as the message had recipients."""
    real, other = f"real{uid()}@customer.example", f"other{uid()}@customer.example"
    token, row = sent_token(gw, [real, other])
    strangers = [f"stranger{n}.{uid()}@else.example" for n in range(500)]
    first = send_report(gw, f"bounce+{token}@mycompany.com", [*strangers[:5], real, *strangers[5:]])
    assert [(b["recipient"], b["matched"], b["permanent"]) for b in
            rows(gw, "select * from bounces where message = ?", row)] == [(real, 1, 1)]
    assert not rows(gw, "select id from bounces where recipient like 'stranger%'")
    log = gw.mailgate_log()
    assert re.search(rf"{first}: role=bounce report=dsn failed=501 recorded=1 ignored=500 not_recipients=11 "
                     r"repeated=0 over_limit=489 ", log), "only 2 + 10 addresses are looked at, the real one among them"

    again = send_report(gw, f"bounce+{token}@mycompany.com", [real])
    assert len(rows(gw, "select id from bounces where message = ?", row)) == 1
    assert re.search(rf"{again}: role=bounce report=dsn failed=1 recorded=0 ignored=1 not_recipients=0 repeated=1 ",
                     gw.mailgate_log())


def test_reports_naming_an_address_that_was_never_mailed_never_blacklist_it(gw):
    """B1/B3: five reports two days apart, each on a real message of ours, name `victim`, who got
    none of them: it is not blacklisted and mass mail to it still goes; the message's own
    recipient, named by the same reports, is (the control: the reports did count)."""
    victim, real = f"victim{uid()}@customer.example", f"real{uid()}@customer.example"
    for _ in range(5):
        gw.move_clock(2 * DAY)
        token, _ = sent_token(gw, [real])
        send_report(gw, f"bounce+{token}@mycompany.com", [victim, real])
    assert rows(gw, "select id from blacklist where address = ? and removed_at is null", real)
    assert not rows(gw, "select id from bounces where recipient = ?", victim)
    assert not rows(gw, "select id from blacklist where address = ?", victim)
    sent = gw.submit(message("News <news@mycompany.com>", [victim]), "news@mycompany.com", [victim], listener="mass")
    assert gw.delivery(sent.queue_id, victim)[0] == "mass"


def test_a_report_to_odoos_own_pre_token_address_is_passed_to_odoo(gw):
    """T1, I2.1, I5, I6: Odoo 16's own bounce address, in mail sent before the cut-over, is
    accepted at RCPT (no longer refused as a forged token), delivered to Odoo as addressed, and
    names no message row of ours: its rows never count."""
    odoo_own = f"bounce+{int(uid(), 16) % 10**6}-mail.mail-17@mycompany.com"
    failed = f"pre{uid()}@customer.example"
    queue_id = send_report(gw, odoo_own, [failed])
    [bounce] = rows(gw, "select * from bounces where recipient = ?", failed)
    assert bounce["message"] is None and bounce["matched"] == 0
    assert re.search(rf"{queue_id}: role=bounce report=dsn failed=1 recorded=1 ignored=0 odoo_own=yes "
                     r"destination=odoo", gw.mailgate_log())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(failed.encode() in c.message for c in gw.odoo.calls):
        time.sleep(0.2)
    [call] = [c for c in gw.odoo.calls if failed.encode() in c.message]
    assert f"Delivered-To: {odoo_own}".encode() in call.message and call.model is None
