"""The inbound path end to end: the public listener, the policy service, the inbound milter role,
the pipe to `mailgate deliver` and a local Odoo stand-in, through a real Postfix.
"""

from __future__ import annotations

import re
import smtplib
import time
import uuid
from email.message import EmailMessage

import pytest

from mailgate.lab.gateway import LabGateway
from mailgate.rules.replies import SMTP

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]


def message(sender: str, to: str, cc: str | None = None, msgid: str | None = None, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, "inbound e2e"
    if cc:
        msg["Cc"] = cc
    msg["Message-ID"] = msgid or f"<{uuid.uuid4().hex}@customer.example>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello Odoo.\n")
    return msg.as_bytes()


def sender() -> str:
    return f"c{uuid.uuid4().hex[:8]}@customer.example"


def odoo_calls_for(gw: LabGateway, marker: str, count: int = 1, timeout: float = 30) -> list:
    """Wait until Odoo got `count` messages whose bytes contain `marker`; flush the queue meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [c for c in gw.odoo.calls if marker.encode() in c.message]
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"Odoo got {len(found)} of {count} messages with {marker}")


def test_alias_mail_reaches_odoo_at_once(gw):
    who = sender()
    gw.submit(message(who, "sales@mycompany.com"), who, ["sales@mycompany.com"], listener="inbound")
    [call] = odoo_calls_for(gw, who)
    assert call.model == "crm.lead"
    assert b"X-Mailgate-Route: alias:sales" in call.message
    assert b"Delivered-To: sales@mycompany.com" in call.message
    assert re.search(rf"role=inbound from=<{who}> sender=<{who}> rcpt=<sales@mycompany.com> routes=alias:sales "
                     r"action=deliver", gw.mailgate_log())


def test_unknown_alias_is_refused_at_rcpt(gw):
    who = sender()
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        gw.submit(message(who, "nobody@mycompany.com"), who, ["nobody@mycompany.com"], listener="inbound")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.1.1 <nobody@mycompany.com>")
    assert re.search(rf"role=policy from=<{who}> rcpt=<nobody@mycompany.com> verdict=no_such_alias", gw.mailgate_log())


def test_forged_bounce_token_is_refused_at_rcpt(gw):
    who = sender()
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        gw.submit(message(who, "x@y.example"), who, ["bounce+aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@mycompany.com"],
                  listener="inbound")
    assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1 ")


def test_foreign_alias_in_cc_does_not_route(gw):
    """Only the gmail.com addresses match `sales`/`commercial`: the mail stays with the catchall."""
    who = sender()
    gw.submit(message(who, "catchall@mycompany.com", cc="sales@gmail.com, commercial@gmail.com"), who,
              ["catchall@mycompany.com"], listener="inbound")
    [call] = odoo_calls_for(gw, who)
    assert call.model is None
    assert b"X-Mailgate-Route: catchall" in call.message and b"alias:sales" not in call.message


def test_incoming_local_alias_on_an_allowed_domain(gw):
    who = sender()
    gw.submit(message(who, "commercial@othercompany.example"), who, ["commercial@othercompany.example"],
              listener="inbound")
    [call] = odoo_calls_for(gw, who)
    assert call.model == "crm.lead" and b"X-Mailgate-Route: alias:commercial" in call.message


def test_route_header_from_outside_is_replaced(gw):
    who = sender()
    gw.submit(message(who, "support@mycompany.com", X_Mailgate_Route="alias:sales"), who,
              ["support@mycompany.com"], listener="inbound")
    [call] = odoo_calls_for(gw, who)
    assert call.message.count(b"X-Mailgate-Route:") == 1 and b"X-Mailgate-Route: alias:support" in call.message


def test_duplicate_catchall_message_is_dropped(gw):
    who = sender()
    msgid = f"<dup-{uuid.uuid4().hex}@customer.example>"
    data = message(who, "catchall@mycompany.com", msgid=msgid)
    first = gw.submit(data, who, ["catchall@mycompany.com"], listener="inbound")
    odoo_calls_for(gw, who)
    second = gw.submit(data, who, ["catchall@mycompany.com"], listener="inbound")
    gw.pf.wait_for_log(rf"{second.queue_id}: milter-discard", 20)
    assert re.search(rf"{second.queue_id}: role=inbound .*action=drop .*duplicate of {re.escape(msgid)}",
                     gw.mailgate_log())
    time.sleep(1)
    assert len([c for c in gw.odoo.calls if who.encode() in c.message]) == 1
    assert first.queue_id != second.queue_id


def test_loop_guard_refuses_the_21st_message_and_forgets_after_the_window(gw):
    robot = f"robot{uuid.uuid4().hex[:6]}@spam.example"
    for _ in range(20):
        gw.submit(message(robot, "support@mycompany.com"), robot, ["support@mycompany.com"], listener="inbound")
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        gw.submit(message(robot, "support@mycompany.com"), robot, ["support@mycompany.com"], listener="inbound")
    reply = SMTP["loop_reject"]
    assert refused.value.smtp_code == int(reply.code)
    assert refused.value.smtp_error.decode() == f"{reply.status} {reply.text}"
    odoo_calls_for(gw, robot, count=20, timeout=60)
    gw.move_clock(121 * 60)
    try:
        gw.submit(message(robot, "support@mycompany.com"), robot, ["support@mycompany.com"], listener="inbound")
        odoo_calls_for(gw, robot, count=21, timeout=30)
    finally:
        gw.move_clock(-121 * 60)


def test_odoo_down_keeps_mail_queued_until_it_is_back(gw):
    who = sender()
    gw.odoo.stop()
    try:
        sent = gw.submit(message(who, "sales@mycompany.com"), who, ["sales@mycompany.com"], listener="inbound")
        gw.pf.wait_for_log(rf"{sent.queue_id}: to=<sales@mycompany.com>, relay=mailgate-odoo.*status=deferred", 30)
        assert sent.queue_id in gw.pf.queue_files()
    finally:
        gw.odoo.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [c for c in gw.odoo.calls if who.encode() in c.message]:
        gw.pf.flush()
        time.sleep(1)
    [call] = odoo_calls_for(gw, who, timeout=5)
    assert call.model == "crm.lead"
    assert gw.pf.wait_queue_empty(20)
