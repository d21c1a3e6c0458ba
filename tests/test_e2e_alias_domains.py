"""Two companies' alias domains end to end, through the real Postfix (docs/rules.md O1, I2, I5).

mycompany.com keeps Odoo's defaults; brand.example has its own bounce alias (`rebonds`), catchall
(`contact`) and default sender. Each company's notification from a foreign author leaves with
its own domain's From and tokenised bounce address; Postfix's report on each comes back to that
domain's bounce address and is recorded against the right message, then handed to Odoo at the
bounce address the message came with.
"""

from __future__ import annotations

import smtplib
import time
import uuid
from email import message_from_bytes
from email.message import EmailMessage

import pytest

from mailgate.lab.gateway import GONE
from test_alias_domains import ALIAS_DOMAINS
from test_e2e_bounces import rows, wait_rows

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]



def gateway_options(request, base) -> dict:
    """The lab gateway with the two alias domains instead of its one."""
    return {"alias_domains": ALIAS_DOMAINS}


# per domain: (the envelope Odoo gives, the From it leaves with, the sink, the tokenised prefix)
DOMAINS = {
    "mycompany.com": ("bounce@mycompany.com", "notifications@mycompany.com", "transactional", "bounce+"),
    "brand.example": ("rebonds@brand.example", "hello@brand.example", "mass", "rebonds+"),
}


def notification(to: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = '"Jane Doe" <jane@gmail.example>', to, "two domains"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@odoo.example>"
    msg.set_content("Hello.\n")
    return msg.as_bytes()


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_each_companys_mail_leaves_with_its_own_domain(gw, domain):
    envelope, author, sink, prefix = DOMAINS[domain]
    rcpt = f"client-{uuid.uuid4().hex[:6]}@customer.example"
    sent = gw.submit(notification(rcpt), envelope, [rcpt])
    name, index = gw.delivery(sent.queue_id, rcpt)
    received = gw.sinks[name].messages[index]
    assert name == sink
    assert received.mail_from.startswith(prefix) and received.mail_from.endswith(f"@{domain}")
    assert message_from_bytes(received.data)["From"] == f'"Jane Doe" <{author}>'
    assert f"{sent.queue_id}: role=outbound" in gw.mailgate_log()
    [line] = [li for li in gw.mailgate_log().splitlines() if f"{sent.queue_id}: role=outbound" in li]
    assert f" domain={domain} domain_by=envelope" in line


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_a_report_to_each_domains_bounce_address_is_recorded_against_its_message(gw, domain):
    envelope = DOMAINS[domain][0]
    sent = gw.submit(notification(GONE), envelope, [GONE])
    gw.pf.wait_for_log(rf"{sent.queue_id}: to=<{GONE}>, .*status=bounced", 30)
    [outbound] = rows(gw, "select id, envelope_from from messages where queue_id = ?", sent.queue_id)
    assert outbound["envelope_from"] == envelope
    [bounce] = wait_rows(gw, 1, "select * from bounces where message = ?", outbound["id"])
    assert bounce["recipient"] == GONE and bounce["status"] == "5.1.1" and bounce["matched"] == 1
    deadline = time.monotonic() + 30
    marker = f"Delivered-To: {envelope}".encode()
    while time.monotonic() < deadline and not any(marker in c.message for c in gw.odoo.calls):
        time.sleep(0.2)
    assert any(marker in c.message for c in gw.odoo.calls), "the report goes back to the domain's bounce address"


@pytest.mark.parametrize("address, accepted", [
    ("contact@brand.example", True), ("catchall@mycompany.com", True),
    ("catchall@brand.example", False), ("nobody@brand.example", False), ("sales@brand.example", False),
])
def test_the_policy_service_knows_every_domains_addresses(gw, address, accepted):
    try:
        gw.submit(notification(address), "someone@remote.example", [address], listener="inbound")
    except smtplib.SMTPResponseException as exc:
        assert not accepted and exc.smtp_code == 550, exc
    else:
        assert accepted
