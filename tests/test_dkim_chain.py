"""OpenDKIM chained after mailgate (postfix-examples/dkim): the signature must be made over the
message as it leaves, i.e. over mailgate's rewritten From, and for that From's domain.

Postfix hands each milter the message as the milters before it left it, so with
`smtpd_milters = mailgate, opendkim` OpenDKIM sees `"Admin" <notifications@mycompany.com>`, not the
author's `admin@example.com`. The proof is on the wire: the upstream sink receives a signature with
d=mycompany.com that dkimpy verifies against the key opendkim-genkey made (no DNS: the TXT record
comes from genkey's .txt file). The reverse order is run too, to show why the example says "after".
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from importlib import resources

import dkim
import pytest

from examples_lab import EXAMPLES, LabValues, rewrite
from mailgate.commands.postfixconf import main_settings
from mailgate.configfile import parse_config
from mailgate.lab.gateway import LabGateway
from mailgate.lab.postfix import make_basedir

DKIM = EXAMPLES / "dkim"
DOMAIN, SELECTOR = "mycompany.com", "mail"
# The lab lives under /tmp, which every user may write: OpenDKIM's key-safety check refuses
# keys below such a directory. A host keeps the key in /etc/dkimkeys (0700 opendkim).
LAB_ONLY = "RequireSafeKeys false\n"


def example_milters() -> dict[str, str]:
    """The milter lines of the dkim main.cf fragment, as written."""
    found = re.findall(r"^(\w+) = (.+)$", (DKIM / "main.cf").read_text(), re.M)
    return dict(found)


class OpenDKIM:
    """Debian's opendkim in the foreground (-f) with the example's opendkim.conf, rewritten for the
    lab, and a key made with opendkim-genkey the way the README tells the operator."""

    def __init__(self, lab: LabValues):
        self.lab = lab
        self.conf = lab.base / "opendkim.conf"
        self.log = lab.base / "opendkim.log"
        self.process: subprocess.Popen | None = None
        self.socket = lab.opendkim_run / "opendkim.sock"

    def start(self) -> None:
        user = pwd.getpwnam("opendkim")
        # As on a host: the keys private to opendkim (/etc/dkimkeys), the run directory open to
        # Postfix by group (/run/opendkim; here group postfix, as the socket, see examples_lab).
        self.lab.dkim_keys.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.lab.dkim_keys, user.pw_uid, user.pw_gid)
        self.lab.opendkim_run.mkdir(mode=0o750, exist_ok=True)
        os.chown(self.lab.opendkim_run, user.pw_uid, grp.getgrnam("postfix").gr_gid)
        subprocess.run(["opendkim-genkey", "-D", str(self.lab.dkim_keys), "-d", DOMAIN, "-s", SELECTOR],
                       check=True, capture_output=True, timeout=60)
        os.chown(self.lab.dkim_keys / f"{SELECTOR}.private", user.pw_uid, user.pw_gid)
        conf = rewrite((DKIM / "opendkim.conf").read_text(), self.lab) + LAB_ONLY
        assert f"local:{self.socket}\n" in conf and "\nUserID opendkim:postfix\n" in conf, \
            "the example's Socket or UserID line changed: update examples_lab.rewrites()"
        self.conf.write_text(conf)
        log = open(self.log, "ab")
        self.process = subprocess.Popen(["opendkim", "-f", "-x", str(self.conf)], stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"opendkim did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def terminate(self) -> None:
        """Ask it to stop (libmilter takes a few seconds): overlap that with the rest of the teardown."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def txt_record(self) -> bytes:
        """The TXT record to publish at mail._domainkey.mycompany.com: genkey's quoted strings joined."""
        text = (self.lab.dkim_keys / f"{SELECTOR}.txt").read_text()
        return "".join(re.findall(r'"([^"]*)"', text)).encode()

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's DNS lookup, answered from the generated key only."""
        return self.txt_record() if name.rstrip(b".") == f"{SELECTOR}._domainkey.{DOMAIN}".encode() else None


@dataclass
class Chain:
    gw: LabGateway
    opendkim: OpenDKIM
    milters: dict[str, str]


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    """The lab gateway (Postfix wired by postfix-config) with the example's milter lines, and OpenDKIM
    started before Postfix (LabGateway's before_start hook)."""
    base = make_basedir()
    lab = LabValues(base=base)
    opendkim = OpenDKIM(lab)
    milters = {key: rewrite(value, lab) for key, value in example_milters().items()}
    gw = LabGateway(base, main_cf_extra=milters, before_start=lambda gw: opendkim.start())
    try:
        gw.start()
        yield Chain(gw, opendkim, milters)
    finally:
        opendkim.terminate()
        gw.stop()
        opendkim.stop()
        shutil.rmtree(base, ignore_errors=True)


def send(gw: LabGateway, header_from: str, sender: str) -> bytes:
    """Submit on the outbound listener; the bytes the upstream sink received."""
    to = f"r{uuid.uuid4().hex[:10]}@customer.example"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = header_from, to, "signed after rewriting"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@odoo.example>"
    msg.set_content("Body lines that the signature covers.\n")
    sent = gw.submit(msg.as_bytes(), sender, [to])
    sink, index = gw.delivery(sent.queue_id, to)
    assert sink == "transactional"
    return gw.sinks[sink].messages[index].data


def signature_tags(data: bytes) -> dict[str, str]:
    header = re.search(rb"^DKIM-Signature:(.*?)\r?\n(?![ \t])", data, re.M | re.S)
    assert header is not None, data[:2000]
    value = re.sub(rb"\s+", b"", header.group(1)).decode()
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


def test_example_chain_puts_mailgate_first():
    """The fragment only appends OpenDKIM to the milter postfix-config prints."""
    example = parse_config(resources.files("mailgate").joinpath("data/mailgate.example.yaml").read_text(),
                           check_files=False).config
    mailgate = dict(main_settings(example))
    for key in ("smtpd_milters", "non_smtpd_milters"):
        assert example_milters()[key] == f"{mailgate[key]}, unix:/run/opendkim/opendkim.sock"


@pytest.mark.e2e
def test_opendkim_signs_the_from_mailgate_wrote(chain):
    data = send(chain.gw, '"Admin" <admin@example.com>', "admin@example.com")
    assert re.search(rb"^From: (.*)$", data, re.M).group(1).strip() == b'"Admin" <notifications@mycompany.com>'
    tags = signature_tags(data)
    assert tags["d"] == DOMAIN and tags["s"] == SELECTOR and tags["c"] == "relaxed/simple"
    assert "from" in tags["h"].lower().split(":")
    assert dkim.verify(data, dnsfunc=chain.opendkim.dns), "the signature does not verify over the message as sent"


@pytest.mark.e2e
def test_signature_breaks_if_the_signed_from_is_changed(chain):
    """The check above has teeth: the same bytes with the author's From put back fail."""
    data = send(chain.gw, '"Admin" <admin@example.com>', "admin@example.com")
    forged = data.replace(b"notifications@mycompany.com", b"admin@example.com", 1)
    assert not dkim.verify(forged, dnsfunc=chain.opendkim.dns)


@pytest.mark.e2e
def test_opendkim_first_sees_the_authors_from_and_signs_nothing(chain):
    """The wrong order: OpenDKIM runs before the rewrite, sees From: admin@example.com (not a domain
    it signs for), and the mail leaves with mycompany.com in From but no signature for it."""
    pf = chain.gw.pf
    assert pf is not None
    pf.postconf({key: ", ".join(reversed(value.split(", "))) for key, value in chain.milters.items()})
    pf.reload()
    try:
        data = send(chain.gw, '"Admin" <admin@example.com>', "admin@example.com")
    finally:
        pf.postconf(chain.milters)
        pf.reload()
    assert b"notifications@mycompany.com" in data
    assert not re.search(rb"^DKIM-Signature:", data, re.M)
