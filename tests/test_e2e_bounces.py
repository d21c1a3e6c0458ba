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
                     r"server=transactional", gw.mailgate_log())


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
