"""The lab harness itself, against a real private Postfix and real sockets.

One Postfix instance and three sinks serve the whole module (a start costs about 3 s);
every test uses its own recipients and finds its mail by queue id or Message-ID, so the
tests do not depend on each other's order.
"""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgate.lab.certs import make_ca_and_cert
from mailgate.lab.postfix import PrivatePostfix, make_basedir
from mailgate.lab.sinks import ReceivedMessage, Sink

pytestmark = pytest.mark.e2e

SASL_USER, SASL_PASSWORD = "user", "password"
REJECTED = "nobody@reject.test"


@dataclass
class Lab:
    pf: PrivatePostfix
    plain: Sink
    tls: Sink
    starttls: Sink


def _transport(name: str, *options: str) -> str:
    return f"{name} unix - - n - - smtp\n" + "".join(f"  -o {o}\n" for o in options)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    base = make_basedir()
    bundle = make_ca_and_cert(base / "tls")
    cert = (bundle.cert, bundle.key)
    plain = Sink(name="plain", reject={REJECTED: "550 5.1.1 no such user"})
    tls = Sink(security="tls", cert=cert, name="tls")
    starttls = Sink(security="starttls", cert=cert, auth=(SASL_USER, SASL_PASSWORD), name="auth")
    sinks = [plain, tls, starttls]
    for sink in sinks:
        sink.start()
    routes = {
        "tls.test": f"lab-tls:[localhost]:{tls.port}",
        "auth.test": f"lab-auth:[localhost]:{starttls.port}",
        "badauth.test": f"lab-badauth:[localhost]:{starttls.port}",
    }
    pf = PrivatePostfix(
        base / "pf",
        listeners={"submission": {}},
        main_cf={
            "relayhost": f"[127.0.0.1]:{plain.port}",
            "transport_maps": "inline:{" + ", ".join(f"{k}={v}" for k, v in routes.items()) + "}",
        },
    )
    # "secure" verifies the chain against our CA and the name "localhost" (the nexthop)
    # against the certificate's SAN; "localhost" resolves through /etc/hosts because
    # Postfix falls back to getaddrinfo() when DNS is disabled.
    verified = ("smtp_tls_security_level=secure", f"smtp_tls_CAfile={bundle.ca_cert}",
                "smtp_tls_secure_cert_match=nexthop", "smtp_tls_loglevel=1")
    sasl = ("smtp_sasl_auth_enable=yes", "smtp_sasl_security_options=noanonymous",
            "smtp_sasl_tls_security_options=noanonymous")
    pf.add_master_service(_transport("lab-tls", "smtp_tls_wrappermode=yes", *verified))
    pf.add_master_service(_transport(
        "lab-auth", *verified, *sasl,
        f"smtp_sasl_password_maps=static:{SASL_USER}:{SASL_PASSWORD}"))
    try:
        pf.start()
        # Added to a running instance on purpose: exercises add_master_service + reload.
        pf.add_master_service(_transport(
            "lab-badauth", *verified, *sasl, f"smtp_sasl_password_maps=static:{SASL_USER}:wrong"))
        pf.reload()
        yield Lab(pf, plain, tls, starttls)
    finally:
        pf.stop()
        for sink in sinks:
            sink.stop()
    assert pf.processes() == []
    shutil.rmtree(base)


def _submit(pf: PrivatePostfix, sender: str, rcpts: list[str], subject: str) -> str:
    """Send over SMTP to the submission listener; return Postfix's queue id."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, ", ".join(rcpts), subject
    msg.set_content("lab test\n")
    with smtplib.SMTP("127.0.0.1", pf.port("submission"), timeout=10) as client:
        client.mail(sender)
        for rcpt in rcpts:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        code, reply = client.data(msg.as_bytes())
    assert code == 250, reply
    found = re.search(rb"queued as (\w+)", reply)
    assert found, reply
    return found.group(1).decode()


def _to(rcpt: str) -> Callable[[ReceivedMessage], bool]:
    return lambda m: rcpt in m.rcpt_tos


def _saved(pf: PrivatePostfix, qid: str, rcpt: str, sink: Sink) -> ReceivedMessage:
    """The message Postfix logged as delivered to ``sink``, found through ``250 saved N``."""
    line = pf.wait_for_log(
        rf"{qid}: to=<{re.escape(rcpt)}>, relay=\S+:{sink.port},.*status=sent \(250 saved (\d+)\)",
        timeout=15,
    )
    return sink.messages[int(line.group(1))]


def test_smtp_submission_reaches_plain_sink(lab: Lab) -> None:
    qid = _submit(lab.pf, "s1@example.org", ["r1@example.com"], "plain")
    [got] = lab.plain.wait_for(1, 15, match=_to("r1@example.com"))
    assert _saved(lab.pf, qid, "r1@example.com", lab.plain) == got
    assert got.mail_from == "s1@example.org" and not got.tls and got.auth_user is None
    assert got.parsed["Subject"] == "plain"
    assert lab.pf.wait_queue_empty(10), lab.pf.queue_files()


def test_sendmail_path_reaches_plain_sink(lab: Lab) -> None:
    msgid = f"<{uuid.uuid4().hex}@lab.test>"
    lab.pf.sendmail("s2@example.org", ["r2@example.com"],
                    f"Subject: via sendmail\nMessage-ID: {msgid}\n\nhello\n".encode())
    qid = lab.pf.wait_for_log(rf"(\w+): message-id={re.escape(msgid)}", 15).group(1)
    got = _saved(lab.pf, qid, "r2@example.com", lab.plain)
    assert got.parsed["Message-ID"] == msgid and got.mail_from == "s2@example.org"
    assert lab.pf.wait_queue_empty(10), lab.pf.queue_files()


def test_implicit_tls_upstream_verified(lab: Lab) -> None:
    qid = _submit(lab.pf, "s3@example.org", ["r3@tls.test"], "implicit tls")
    got = _saved(lab.pf, qid, "r3@tls.test", lab.tls)
    assert got.tls and got.rcpt_tos == ["r3@tls.test"]
    lab.pf.wait_for_log(rf"Verified TLS connection established to localhost\[127\.0\.0\.1\]:"
                        rf"{lab.tls.port}", 5)


def test_starttls_and_auth_upstream(lab: Lab) -> None:
    qid = _submit(lab.pf, "s4@example.org", ["r4@auth.test"], "starttls auth")
    got = _saved(lab.pf, qid, "r4@auth.test", lab.starttls)
    assert got.tls and got.auth_user == SASL_USER
    lab.pf.wait_for_log(rf"Verified TLS connection established to localhost\[127\.0\.0\.1\]:"
                        rf"{lab.starttls.port}", 5)


def test_wrong_sasl_password_defers(lab: Lab) -> None:
    qid = _submit(lab.pf, "s4b@example.org", ["r4b@badauth.test"], "bad password")
    try:
        lab.pf.wait_for_log(rf"{qid}: to=<r4b@badauth\.test>.*status=deferred "
                            r"\(SASL authentication failed", 15)
        assert qid in lab.pf.queue_files()
        assert not [m for m in lab.starttls.messages if "r4b@badauth.test" in m.rcpt_tos]
    finally:
        lab.pf.delete_queue()
    assert lab.pf.wait_queue_empty(5), lab.pf.queue_files()


def test_sink_reject_bounces(lab: Lab) -> None:
    qid = _submit(lab.pf, "s5@example.org", ["r5@example.com", REJECTED], "one refused")
    lab.pf.wait_for_log(rf"{qid}: to=<{re.escape(REJECTED)}>.*status=bounced \(host "
                        r"127\.0\.0\.1\[127\.0\.0\.1\] said: 550 5\.1\.1 no such user", 15)
    got = _saved(lab.pf, qid, "r5@example.com", lab.plain)
    assert got.rcpt_tos == ["r5@example.com"]
    # The non-delivery report goes back to the sender, through the same relayhost.
    [dsn] = lab.plain.wait_for(1, 15, match=lambda m: m.rcpt_tos == ["s5@example.org"])
    assert dsn.mail_from == "" and REJECTED in dsn.data.decode(errors="replace")
    assert lab.pf.wait_queue_empty(10), lab.pf.queue_files()


def test_stop_leaves_no_process() -> None:
    base = make_basedir()
    try:
        with PrivatePostfix(base / "pf", listeners={"smtp": {}}) as pf:
            pid = pf.master_pid()
            assert pid is not None and pid in pf.processes()
            port = pf.port("smtp")
        assert pf.master_pid() is None
        assert pf.processes() == []
        assert _state(pid) in ("gone", "Z")
        pgrep = subprocess.run(["pgrep", "-f", str(pf.config_dir)], capture_output=True)
        assert pgrep.stdout == b""
        with pytest.raises(OSError):
            smtplib.SMTP("127.0.0.1", port, timeout=2)
        pf.stop()
    finally:
        shutil.rmtree(base)


def _state(pid: int) -> str:
    """The process state letter; a zombie ("Z") has exited but no init reaped it here."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
