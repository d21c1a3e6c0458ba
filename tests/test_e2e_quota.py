"""The daily quota through the real Postfix: only mail that is sent pays (docs/rules.md Q).

Recipients are taken at RCPT and kept at END-OF-MESSAGE (`smtpd_end_of_data_restrictions`);
a transaction that ends otherwise gives them back when Postfix's next request on that policy
connection names another transaction, or when Postfix closes the connection (here after 1 s
idle, `smtpd_policy_service_max_idle`). Refusals at DATA come from `smtpd_data_restrictions`
by client address: 127.0.0.3 is refused (5xx), 127.0.0.2 deferred (4xx) and retries as 127.0.0.1.
"""

from __future__ import annotations

import smtplib
import time
import uuid
from collections.abc import Iterator

import pytest

from faultlab import db_rows, gateway, make_message
from mailgate.lab.gateway import LabGateway

pytestmark = pytest.mark.e2e

DAILY = 4
REFUSED_AT_DATA = "127.0.0.3"
DEFERRED_AT_DATA = "127.0.0.2"


@pytest.fixture(scope="module")
def gw() -> Iterator[LabGateway]:
    with gateway(f"quota: {{daily: {DAILY}, mass_daily: {DAILY}, scope: sender_domain}}\n", main_cf_extra={
        "smtpd_data_restrictions": (f"check_client_access inline:{{ {{{REFUSED_AT_DATA} = 554 5.7.1 refused at data}}, "
                                    f"{{{DEFERRED_AT_DATA} = 450 4.7.1 try again later}} }}"),
        "smtpd_policy_service_max_idle": "1s",
    }) as started:
        yield started


def taken(gw: LabGateway, domain: str) -> int:
    rows = db_rows(gw, "select coalesce(sum(count), 0) as n from quota_counters where key = ? and stream = ?",
                   f"domain:{domain}", "transactional")
    return int(rows[0]["n"])


def wait_for_taken(gw: LabGateway, domain: str, expected: int, what: str) -> None:
    """Give-backs follow the end of Postfix's policy connection: wait a little for them."""
    deadline = time.monotonic() + 15
    while taken(gw, domain) != expected:
        assert time.monotonic() < deadline, (f"{what}: the quota counts {taken(gw, domain)}, "
                                             f"expected {expected}\n{gw.mailgate_log()[-3000:]}")
        time.sleep(0.1)


def session(gw: LabGateway, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gw.pf.port("submission"), timeout=30, source_address=(source, 0))
    client.ehlo("lab.client")
    return client


def rcpts(client: smtplib.SMTP, sender: str, recipients: list[str]) -> None:
    assert client.mail(sender)[0] == 250
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        assert code == 250, (recipient, code, text)


def test_only_accepted_mail_pays_the_quota(gw: LabGateway) -> None:
    domain = f"q{uuid.uuid4().hex[:8]}.example"
    sender = f"app@{domain}"
    three = [f"r{i}@customer.example" for i in range(3)]

    with session(gw) as client:  # RSET after RCPT, then QUIT after RCPT
        rcpts(client, sender, three[:2])
        client.rset()
        rcpts(client, sender, three[2:])
    wait_for_taken(gw, domain, 0, "RSET and QUIT after RCPT")

    with session(gw, REFUSED_AT_DATA) as client:  # a 5xx at DATA
        rcpts(client, sender, three)
        assert client.docmd("DATA")[0] == 554
    wait_for_taken(gw, domain, 0, "a refusal at DATA")

    with session(gw, DEFERRED_AT_DATA) as client:  # a 4xx at DATA, then the client's retry
        rcpts(client, sender, three)
        assert client.docmd("DATA")[0] == 450
    with session(gw) as client:
        rcpts(client, sender, three)
        assert client.data(make_message(sender, three[0], subject="quota retry")[0])[0] == 250
    wait_for_taken(gw, domain, 3, "a 4xx at DATA retried")

    with session(gw) as client:  # the last one of the day, then the limit
        rcpts(client, sender, ["last@customer.example"])
        assert client.data(make_message(sender, "last@customer.example", subject="quota last")[0])[0] == 250
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt("over@customer.example")
        assert code == 450 and b"daily sending limit" in text, (code, text)
    wait_for_taken(gw, domain, DAILY, "the day's mail")
    assert "event=quota_returned" in gw.mailgate_log()
