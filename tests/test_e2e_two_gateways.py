"""Two gateways, one state: two private Postfix instances, each with its own `mailgate serve`,
sharing one PostgreSQL (private data directory, loopback) and one bounce-token key. Counters
that must be exact across hosts (loop guard, daily quota) and the blacklist are shared; a
PostgreSQL outage makes Postfix tempfail, and mailgate recovers by itself.
"""

from __future__ import annotations

import re
import secrets
import shutil
import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from faultlab import make_message
from mailgate.lab.gateway import GONE, LabGateway
from mailgate.lab.postfix import make_basedir

pytestmark = pytest.mark.e2e

DAY = 86400
EXTRA = "loop: {threshold: 4}\nquota: {daily: 6}\n"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[LabGateway, LabGateway, object]]:
    from mailgate.lab.postgres import PrivatePostgres
    shared = make_basedir("mgshared")
    secret = shared / "secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    postgres = PrivatePostgres(shared / "pg")  # its own: the outage test stops it
    postgres.start()
    postgres.create_database("mailgate")
    gateways = [LabGateway(make_basedir(), EXTRA, database=postgres.dsn("mailgate"), secret_file=secret)
                for _ in range(2)]
    try:
        for gateway in gateways:
            gateway.start()
        yield gateways[0], gateways[1], postgres
    finally:
        for gateway in gateways:
            gateway.stop()
        postgres.stop()
        for path in [shared, *(g.base for g in gateways)]:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def attach_logs(request, pair):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for gateway in pair[:2]:
            print(f"--- mailgate log {gateway.base} ---\n" + gateway.mailgate_log()[-4000:])


def message(header_from: str, to: str) -> bytes:
    return make_message(header_from, to, subject="two gateways")[0]


def test_loop_guard_counts_over_both_hosts(pair):
    one, two, _ = pair
    robot = f"robot{uuid.uuid4().hex[:6]}@spam.example"
    for gateway in (one, two, one, two):
        gateway.submit(message(robot, "sales@mycompany.com"), robot, ["sales@mycompany.com"], listener="inbound")
    for gateway in (one, two):
        with pytest.raises(smtplib.SMTPResponseException) as refused:
            gateway.submit(message(robot, "sales@mycompany.com"), robot, ["sales@mycompany.com"], listener="inbound")
        assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1")


def test_daily_quota_counts_over_both_hosts(pair):
    one, two, _ = pair
    domain = f"q{uuid.uuid4().hex[:6]}.example"
    answers = []
    for number in range(8):
        gateway = (one, two)[number % 2]
        with smtplib.SMTP("127.0.0.1", gateway.pf.port("submission"), timeout=30) as client:
            client.ehlo("lab.client")
            client.mail(f"app@{domain}")
            code = client.rcpt(f"r{number}@customer.example")[0]
            answers.append(code)
            if code == 250:  # a recipient counts once its message is accepted (a RSET gives it back)
                client.data(message(f'"App" <app@{domain}>', f"r{number}@customer.example"))
            else:
                client.rset()
    assert answers == [250] * 6 + [450, 450]


def test_aborted_transactions_on_both_hosts_give_back_and_the_day_stays_exact(pair):
    """On each host in turn, a session takes a recipient and resets, then sends one message:
    the aborted take is given back before the message's take, so exactly the 6 of `quota.daily` pass
    over both hosts, and the rest are deferred by the quota."""
    domain = f"q{uuid.uuid4().hex[:6]}.example"
    sender = f"app@{domain}"
    answers = []
    for number in range(6 + 2):
        gateway = pair[number % 2]
        with smtplib.SMTP("127.0.0.1", gateway.pf.port("submission"), timeout=30) as client:
            client.ehlo("lab.client")
            client.mail(sender)
            client.rcpt(f"aborted{number}@customer.example")
            client.rset()
            client.mail(sender)
            code, _ = client.rcpt(f"r{number}@customer.example")
            answers.append(code)
            if code == 250:
                message = make_message(sender, f"r{number}@customer.example", subject="two hosts")[0]
                assert client.data(message)[0] == 250
    assert answers == [250] * 6 + [450, 450]


def test_a_bounce_recorded_by_one_host_blacklists_for_the_other(pair):
    one, two, _ = pair
    earlier = len(re.findall(rf"role=bounce rcpt=<{GONE}> ", one.mailgate_log()))
    for number in range(5):
        for gateway in (one, two):
            gateway.move_clock(2 * DAY)
        sent = one.submit(message('"Sales" <sales@mycompany.com>', GONE), "sales@mycompany.com", [GONE])
        one.pf.wait_for_log(rf"{sent.queue_id}: to=<{GONE}>, .*status=bounced", 30)
        # the report comes back through the gateway after that line: record it before the clock
        # moves again, or the five bounces land closer together than min_spread_days
        deadline = time.monotonic() + 30
        while len(re.findall(rf"role=bounce rcpt=<{GONE}> ", one.mailgate_log())) - earlier <= number:
            assert time.monotonic() < deadline, f"bounce report {number + 1} not recorded"
            time.sleep(0.1)
    deadline = time.monotonic() + 30
    while "role=blacklist" not in one.mailgate_log() and time.monotonic() < deadline:
        time.sleep(0.2)
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        two.submit(message("News <news@mycompany.com>", GONE), "news@mycompany.com", [GONE], listener="mass")
    assert refused.value.smtp_code == 550 and b"blacklisted" in refused.value.smtp_error


def test_a_report_reaching_the_other_host_counts_only_the_messages_recipients(pair):
    """docs/rules.md B1, T1: the recipients' digests are keyed with the shared secret, not per
    host: a report on a message sent through one host, delivered to the other, counts for the
    message's own recipient and for nobody else."""
    one, two, _ = pair
    real, stranger = f"real{uuid.uuid4().hex[:6]}@customer.example", f"stranger{uuid.uuid4().hex[:6]}@else.example"
    sent = one.submit(message('"Sales" <sales@mycompany.com>', real), "sales@mycompany.com", [real])
    sink, index = one.delivery(sent.queue_id, real)
    token = re.fullmatch(r"bounce\+([a-z2-7]{32})@mycompany\.com", one.sinks[sink].messages[index].mail_from)
    assert token, one.sinks[sink].messages[index].mail_from
    row = two.token_signer().verify(token.group(1)).row_id
    report_to = f"bounce+{token.group(1)}@mycompany.com"
    groups = "".join(f"Final-Recipient: rfc822; {address}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
                     for address in (stranger, real))
    report = (f"From: MAILER-DAEMON@remote.example\r\nTo: {report_to}\r\nSubject: failed\r\n"
              f"Message-ID: <{uuid.uuid4().hex}@remote.example>\r\nMIME-Version: 1.0\r\n"
              'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
              "--B\r\nContent-Type: text/plain\r\n\r\nIt bounced.\r\n--B\r\n"
              "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; remote.example\r\n\r\n"
              f"{groups}--B--\r\n").encode()
    arrived = two.submit(report, "", [report_to], listener="inbound")
    deadline = time.monotonic() + 30
    while f"{arrived.queue_id}: role=bounce report=dsn" not in two.mailgate_log():
        assert time.monotonic() < deadline, "the report was not recorded"
        time.sleep(0.2)
    log = two.mailgate_log()
    assert re.search(rf"{arrived.queue_id}: role=bounce rcpt=<{real}> status=5.1.1 permanent=yes message={row} ", log)
    assert f"rcpt=<{stranger}>" not in log
    assert re.search(rf"{arrived.queue_id}: role=bounce report=dsn failed=2 recorded=1 ignored=1 "
                     r"not_recipients=1 ", log)


def test_postgres_outage_tempfails_and_recovers_by_itself(pair):
    one, _, postgres = pair
    to = f"r{uuid.uuid4().hex[:6]}@customer.example"
    held = one.submit(message('"Held" <held@example.com>', to), "held@example.com", [to])
    subprocess.run(["postsuper", "-c", str(one.pf.config_dir), "-h", held.queue_id], check=True, capture_output=True)
    postgres.stop()
    try:
        with pytest.raises(smtplib.SMTPResponseException) as refused:
            one.submit(message('"Down" <down@example.com>', to), "down@example.com", [to])
        assert 400 <= refused.value.smtp_code < 500
        # routing needs no database: the queued message still leaves through its token's server
        subprocess.run(["postsuper", "-c", str(one.pf.config_dir), "-H", held.queue_id], check=True,
                       capture_output=True)
        one.pf.flush()
        sink, _ = one.delivery(held.queue_id, to, timeout=60)
        assert sink == "transactional"
    finally:
        postgres.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            sent = one.submit(message('"Back" <back@example.com>', to), "back@example.com", [to])
            break
        except smtplib.SMTPResponseException:
            assert time.monotonic() < deadline, "mailgate did not recover by itself"
            time.sleep(1)
    one.delivery(sent.queue_id, to)
    log = one.mailgate_log()
    assert len(re.findall(r"event=database state=unavailable", log)) == 1
    assert "event=database state=back" in log
