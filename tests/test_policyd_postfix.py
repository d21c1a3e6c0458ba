"""The policy server behind a real private Postfix: a 550 at RCPT for an unknown alias, other
recipients delivered, and a 4xx (never accepted-and-lost mail) while the server is down."""

from __future__ import annotations

import shutil
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage

import pytest

from mailgate.infra.socketspec import parse_socket_spec
from mailgate.lab.postfix import PrivatePostfix, make_basedir
from mailgate.lab.sinks import Sink
from mailgate.policy.attributes import PolicyRequest
from mailgate.policy.policyd import PolicyServer

pytestmark = pytest.mark.e2e

UNKNOWN = "no-such@mycompany.com"
NO_SUCH_ALIAS = f"550 5.1.1 <{UNKNOWN}>: no such alias"
DOWN_ACTION = "451 4.3.5 policy service unavailable"


def toy_policy(request: PolicyRequest) -> str:
    return NO_SUCH_ALIAS if request.recipient == UNKNOWN else "DUNNO"


@dataclass
class Lab:
    pf: PrivatePostfix
    sink: Sink
    policy: PolicyServer


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """Postfix asking ``toy_policy`` at RCPT time; on failure the maillog tail is printed."""
    base = make_basedir()
    sink = Sink(name="sink")
    sink.start()
    spec = parse_socket_spec(f"unix:{base}/policy.sock")
    policy = PolicyServer(toy_policy, spec, group="postfix")
    policy.start_in_thread()
    postfix = PrivatePostfix(base, listeners={"smtp": {}}, main_cf={
        "smtpd_recipient_restrictions":
            f"check_policy_service {policy.address.postfix_address()}, permit_mynetworks, reject",
        "smtpd_policy_service_default_action": DOWN_ACTION,
        "relayhost": f"[127.0.0.1]:{sink.port}",
    })
    try:
        postfix.start()
        yield Lab(postfix, sink, policy)
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(postfix.log_tail(60))
        postfix.stop()
        policy.stop_thread()
        sink.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_policy_rejects_at_rcpt_delivers_others_and_tempfails_when_down(lab: Lab) -> None:
    pf, sink = lab.pf, lab.sink
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.org", "ok@mycompany.com", "hi"
    message.set_content("policy delegation test\n")

    with smtplib.SMTP("127.0.0.1", pf.port("smtp"), timeout=30) as smtp:
        smtp.ehlo("client.example")
        assert smtp.mail("a@example.org")[0] == 250
        code, text = smtp.rcpt(UNKNOWN)
        # Postfix puts "<rcpt>: Recipient address rejected: " before the action's text.
        assert code == 550 and text.decode().startswith("5.1.1 "), (code, text)
        assert text.decode().endswith(f"Recipient address rejected: {NO_SUCH_ALIAS[10:]}")
        assert smtp.rcpt("ok@mycompany.com")[0] == 250
        assert smtp.data(message.as_bytes())[0] == 250
    (delivered,) = sink.wait_for(1, timeout=10, match=lambda m: "ok@mycompany.com" in m.rcpt_tos)
    assert delivered.rcpt_tos == ["ok@mycompany.com"]
    pf.wait_for_log(r"NOQUEUE: reject: RCPT from \S+: 550 5\.1\.1 <no-such@mycompany\.com>", 5)

    lab.policy.stop_thread()
    with smtplib.SMTP("127.0.0.1", pf.port("smtp"), timeout=30) as smtp:
        smtp.ehlo("client.example")
        assert smtp.mail("a@example.org")[0] == 250
        code, text = smtp.rcpt("later@mycompany.com")
        assert code == 451 and text.decode().startswith("4.3.5 "), (code, text)
        assert text.decode().endswith("policy service unavailable")
        assert smtp.docmd("DATA")[0] >= 500
    time.sleep(0.5)
    assert pf.queue_files() == []
    assert not [m for m in sink.messages if "later@mycompany.com" in m.rcpt_tos]
