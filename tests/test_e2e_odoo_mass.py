"""Mass mailing with a real Odoo (the mass_mailing kit): hard bounces blacklist an address in mailgate
and in Odoo alike.

Odoo sends its mailings through a second outgoing server, the gateway's mass listener. Every
upstream sink refuses gone@customer.example, so each mailing to it comes back as Postfix's own
report, which mailgate records and passes on to Odoo. Five such bounces spread over twelve days
(mailgate's clock moved forward, Odoo's traces dated back by the same amount in its database)
must put the address on both blacklists, and mailgate then refuses mass mail to it at RCPT.
"""

from __future__ import annotations

import shutil
import smtplib
import sqlite3
from collections.abc import Iterator
from email.message import EmailMessage

import psycopg
import pytest

from faultlab import wait_until
from mailgate.lab.gateway import GONE, LabGateway
from mailgate.lab.odoo import (
    MAIL_QUEUE_CRON,
    MASS_MAILING_CRON,
    LabOdoo,
    OdooRpc,
    hand_mail_to_gateway,
)
from mailgate.lab.postfix import make_basedir

pytestmark = [pytest.mark.e2e, pytest.mark.odoo(every_version=False)]

DAY = 86400
BOUNCE_DAYS = (12, 9, 6, 3, 0)  # how long ago each of the five bounces happened: twelve days apart in all
MASS_SERVER_NAME = "mailgate-mass"


@pytest.fixture(scope="module")
def mass_gw(odoo_mass: LabOdoo) -> Iterator[tuple[LabGateway, LabOdoo, OdooRpc, int]]:
    base = make_basedir()
    gateway = LabGateway(base, odoo=odoo_mass, aliases={})
    try:
        gateway.start()
        assert gateway.pf is not None
        rpc = odoo_mass.rpc()
        hand_mail_to_gateway(rpc, odoo_mass.source.major, host="127.0.0.1", port=gateway.pf.port("submission"),
                             alias_domain="mycompany.com")
        mass_server = rpc.call("ir.mail_server", "create", {
            "name": MASS_SERVER_NAME, "smtp_host": "127.0.0.1", "smtp_port": gateway.pf.port("mass"),
            "smtp_encryption": "none", "sequence": 50})
        yield gateway, odoo_mass, rpc, int(mass_server)
    finally:
        gateway.stop()
    shutil.rmtree(base, ignore_errors=True)


def send_mailing(rpc: OdooRpc, partner: int, server: int, round_number: int) -> int:
    mailing = rpc.call("mailing.mailing", "create", {
        "subject": f"Newsletter {round_number}", "body_html": "<p>News</p>",
        "mailing_model_id": rpc.model_id("res.partner"), "mailing_domain": repr([("id", "=", partner)]),
        "email_from": "news@mycompany.com", "mail_server_id": server})
    rpc.call_returning_none("mailing.mailing", "action_put_in_queue", [mailing])
    rpc.run_cron(MASS_MAILING_CRON)
    rpc.run_cron(MAIL_QUEUE_CRON)
    return int(mailing)


def trace_of(rpc: OdooRpc, mailing: int) -> dict:
    found = rpc.call("mailing.trace", "search_read", [("mass_mailing_id", "=", mailing)],
                     fields=["email", "trace_status", "failure_type"])
    return found[0] if found else {}


def date_back(odoo: LabOdoo, mailing: int, days: int) -> None:
    """Move one mailing's trace back in time in Odoo's own database, as if it bounced `days` ago."""
    with psycopg.connect(odoo.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE mailing_trace SET create_date = create_date - make_interval(days => %s), "
                     "write_date = write_date - make_interval(days => %s) WHERE mass_mailing_id = %s",
                     [days, days, mailing])


def blacklisted_in_mailgate(gateway: LabGateway, address: str) -> bool:
    with sqlite3.connect(gateway.base / "state" / "mailgate.sqlite3") as conn:
        return bool(conn.execute("select 1 from blacklist where address = ? and removed_at is null",
                                 [address]).fetchone())


def test_five_hard_bounces_over_twelve_days_blacklist_the_address_in_mailgate_and_odoo(mass_gw):
    gateway, odoo, rpc, server = mass_gw
    partner = rpc.call("res.partner", "create", {"name": "Gone Customer", "email": GONE})
    for number, days_ago in enumerate(BOUNCE_DAYS):
        mailing = send_mailing(rpc, partner, server, number)
        wait_until(lambda m=mailing: trace_of(rpc, m).get("trace_status") == "bounce", 60, 0.3,
                   f"Odoo's trace of mailing {number} bounced")
        assert trace_of(rpc, mailing)["failure_type"] == "mail_bounce"
        if days_ago:
            date_back(odoo, mailing, days_ago)
            gateway.move_clock(3 * DAY)
    [contact] = rpc.call("res.partner", "read", [partner], fields=["message_bounce"])
    assert contact["message_bounce"] == len(BOUNCE_DAYS)
    assert rpc.call("mail.blacklist", "search_count", [("email", "=", GONE)]) == 1
    wait_until(lambda: blacklisted_in_mailgate(gateway, GONE), 30, 0.3, "mailgate's blacklist entry")

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "News <news@mycompany.com>", GONE, "One more newsletter"
    msg.set_content("News.\n")
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        gateway.submit(msg.as_bytes(), "bounce@mycompany.com", [GONE], listener="mass")
    assert refused.value.smtp_code == 550 and b"blacklisted" in refused.value.smtp_error

