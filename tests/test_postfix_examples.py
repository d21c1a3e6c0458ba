"""The three example set-ups in postfix-examples/ are what an operator starts from, so they must
(1) say what `mailgate postfix-config` says, (2) pass Postfix's own checks, and (3) actually work:
each runs here as a real Postfix, from its own files with only the lab's paths and ports swapped
in (tests/examples_lab.py lists every change), in front of `mailgate serve` and the lab's sinks.
"""

from __future__ import annotations

import copy
import re
import shutil
import smtplib
import subprocess
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from examples_lab import EXAMPLES, SASL_LOGIN, SASL_REALM, SASL_SECRET, ExamplePostfix, example_postfix, tls_context
from faultlab import make_message
from mailgate.commands.postfixconf import SUBMISSION_LISTENER, main_settings, render
from mailgate.configfile import parse_config
from mailgate.lab.gateway import LabGateway
from mailgate.lab.postfix import make_basedir
from mailgate.rules.delivery import ODOO_TRANSPORT

FOLDERS = ["local-odoo", "remote-odoo-sasl", "inbound"]

EXAMPLE_CONFIG = parse_config(
    resources.files("mailgate").joinpath("data/mailgate.example.yaml").read_text(), check_files=False).config
MAILGATE_MAIN = dict(main_settings(EXAMPLE_CONFIG))
INBOUND_ONLY = {"relay_domains", "transport_maps", f"{ODOO_TRANSPORT}_destination_recipient_limit"}

# Which of postfix-config's main.cf settings and master.cf services each set-up carries: the
# outbound gateways everything but the relaying of the alias domain; the inbound one all of
# main.cf and, of master.cf, all but Odoo's loopback listeners.
MAIN_KEYS = {
    "local-odoo": set(MAILGATE_MAIN) - INBOUND_ONLY,
    "remote-odoo-sasl": set(MAILGATE_MAIN) - INBOUND_ONLY,
    "inbound": set(MAILGATE_MAIN),
}
SERVICES = {
    "local-odoo": {"127.0.0.1:10025/inet", "127.0.0.1:10026/inet", "mg-transactional/unix", "mg-mass/unix"},
    "remote-odoo-sasl": {"mg-transactional/unix", "mg-mass/unix"},
    "inbound": {"smtp/inet", f"{ODOO_TRANSPORT}/unix", "mg-transactional/unix", "mg-mass/unix"},
}


def postconf(directory: Path, *args: str) -> str:
    """Postfix's own reading of a configuration directory; any warning fails the test."""
    result = subprocess.run(["postconf", "-c", str(directory), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    return result.stdout


def settings(directory: Path, *args: str) -> dict[str, str]:
    """`postconf -n` or `-P` as a dict (an empty value prints as "key =")."""
    return {key: value.strip() for key, _, value in
            (line.partition(" =") for line in postconf(directory, *args).splitlines())}


def services(directory: Path) -> dict[str, str]:
    """master.cf as `postconf -M` reads it: "name/type" -> the whole entry, whitespace normalised."""
    found = {}
    for line in postconf(directory, "-M").splitlines():
        fields = line.split()
        found[f"{fields[0]}/{fields[1]}"] = " ".join(fields)
    return found


# -- 1. the same as `mailgate postfix-config` ---------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("folder", FOLDERS)
def test_mailgate_main_settings_are_postfix_configs(folder):
    """Every mailgate setting an example carries has the value postfix-config prints for the
    example configuration; the ones its set-up leaves out are absent, not set otherwise."""
    shown = settings(EXAMPLES / folder, "-n")
    for key, value in MAILGATE_MAIN.items():
        if key in MAIN_KEYS[folder]:
            assert shown.get(key) == value, (folder, key)
        else:
            assert key not in shown, (folder, key)


@pytest.mark.e2e
@pytest.mark.parametrize("folder", FOLDERS)
def test_mailgate_services_are_postfix_configs(folder, tmp_path):
    """Each mailgate service of an example is, option for option, the one postfix-config prints
    (compared as Postfix itself reads both files)."""
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n")
    (tmp_path / "master.cf").write_text(render(EXAMPLE_CONFIG, "master"))
    expected, shown = services(tmp_path), services(EXAMPLES / folder)
    for name in SERVICES[folder]:
        assert shown.get(name) == expected[name], name


@pytest.mark.e2e
def test_sasl_submission_listener_plays_the_outbound_role():
    """Port 587 is not a postfix-config service, but must name the same role as 10025 for the milter
    and the policy service, and must only take logged-in clients over TLS."""
    options = {key: value for key, value in settings(EXAMPLES / "remote-odoo-sasl", "-P").items()
               if key.startswith("submission/inet/")}
    assert options == {
        "submission/inet/syslog_name": "postfix/submission",
        "submission/inet/smtpd_tls_security_level": "encrypt",
        "submission/inet/smtpd_sasl_auth_enable": "yes",
        "submission/inet/smtpd_tls_auth_only": "yes",
        "submission/inet/smtpd_relay_restrictions": "permit_sasl_authenticated,reject_unauth_destination,reject",
        "submission/inet/milter_macro_daemon_name": SUBMISSION_LISTENER,
        "submission/inet/smtpd_policy_service_policy_context": SUBMISSION_LISTENER,
    }


# -- 2. Postfix accepts them ----------------------------------------------------------------------------


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.e2e
def test_example_passes_postfix_check(folder, gateways):
    """Once paths are real (the lab's instance of the example, see examples_lab.rewrites), `postfix
    check` and postconf (which warns about unknown or misspelt parameters) have nothing to say."""
    pf = gateways[folder].pf
    assert isinstance(pf, ExamplePostfix)
    result = pf.check()
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    postconf(pf.config_dir, "-n")
    postconf(pf.config_dir, "-M")
    main = (pf.config_dir / "main.cf").read_text()
    assert "/run/mailgate" not in main and f"unix:{pf.lab.base}/milter.sock" in main


# -- 3. they work -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateways() -> Iterator[dict[str, LabGateway]]:
    """The three examples' Postfix instances in front of one lab (sinks, `mailgate serve`, the Odoo
    stand-in): one `mailgate serve` for all keeps the module fast. The LabGateway runs local-odoo;
    for the others, a copy of it whose `pf` is that example's instance gives the same `submit`
    and `delivery` helpers."""
    base = make_basedir()
    gw = LabGateway(base, before_start=lambda gw: setattr(gw, "pf", example_postfix(gw, "local-odoo")))
    others: list[ExamplePostfix] = []
    try:
        gw.start()
        views = {"local-odoo": gw}
        for folder in ("remote-odoo-sasl", "inbound"):
            others.append(pf := example_postfix(gw, folder))
            pf.start()
            views[folder] = copy.copy(gw)
            views[folder].pf = pf
        yield views
    finally:
        for pf in others:
            pf.stop()
        gw.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def local_gw(gateways) -> LabGateway:
    return gateways["local-odoo"]


@pytest.fixture
def sasl_gw(gateways) -> LabGateway:
    return gateways["remote-odoo-sasl"]


@pytest.fixture
def inbound_gw(gateways) -> LabGateway:
    return gateways["inbound"]


def message(header_from: str, to: str) -> bytes:
    return make_message(header_from, to, subject="example set-up")[0]


def customer() -> str:
    return f"r{uuid.uuid4().hex[:10]}@customer.example"


def raw_from(data: bytes) -> bytes:
    return re.search(rb"^From: (.*)$", data, re.M).group(1).strip()


def logs(gw: LabGateway) -> str:
    return f"--- mailgate ---\n{gw.mailgate_log()[-3000:]}\n{gw.pf.log_tail(40) if gw.pf else ''}"


@pytest.mark.e2e
def test_local_odoo_mail_leaves_through_the_relay_with_from_rewritten(local_gw):
    to = customer()
    sent = local_gw.submit(message('"Admin" <admin@example.com>', to), "admin@example.com", [to])
    sink, index = local_gw.delivery(sent.queue_id, to)
    got = local_gw.sinks[sink].messages[index]
    assert sink == "transactional" and got.tls, logs(local_gw)
    assert raw_from(got.data) == b'"Admin" <notifications@mycompany.com>'
    assert got.mail_from.startswith("bounce+") and got.mail_from.endswith("@mycompany.com")


@pytest.mark.e2e
def test_local_odoo_mass_listener_uses_the_mass_relay(local_gw):
    to = customer()
    sent = local_gw.submit(message("News <news@mycompany.com>", to), "news@mycompany.com", [to], listener="mass")
    sink, _ = local_gw.delivery(sent.queue_id, to)
    assert sink == "mass", logs(local_gw)


def sasl_client(gw: LabGateway) -> smtplib.SMTP:
    """An SMTP session to the 587-style listener, past STARTTLS (verifying the gateway's certificate)."""
    assert gw.pf is not None
    client = smtplib.SMTP("127.0.0.1", gw.pf.port("sasl"), timeout=30)
    client.ehlo("odoo.remote.example")
    assert not client.has_extn("auth"), "AUTH must not be offered before STARTTLS"
    client.starttls(context=tls_context(gw.pf.lab.certs))
    client.ehlo("odoo.remote.example")
    return client


@pytest.mark.e2e
def test_remote_odoo_logged_in_mail_is_processed_by_mailgate(sasl_gw):
    to = customer()
    with sasl_client(sasl_gw) as client:
        assert "PLAIN" in client.esmtp_features["auth"].upper().split()
        client.login(f"{SASL_LOGIN}@{SASL_REALM}", SASL_SECRET, initial_response_ok=True)
        assert client.mail("admin@example.com")[0] == 250
        assert client.rcpt(to)[0] == 250
        code, reply = client.data(message('"Admin" <admin@example.com>', to))
    assert code == 250, reply
    queue_id = re.search(rb"queued as (\w+)", reply).group(1).decode()
    sink, index = sasl_gw.delivery(queue_id, to)
    got = sasl_gw.sinks[sink].messages[index]
    assert sink == "transactional", logs(sasl_gw)
    assert raw_from(got.data) == b'"Admin" <notifications@mycompany.com>'
    assert got.mail_from.startswith("bounce+")
    assert re.search(rf"{queue_id}: role=outbound from=<admin@example.com> .*server=transactional",
                     sasl_gw.mailgate_log()), logs(sasl_gw)


@pytest.mark.e2e
def test_remote_odoo_without_login_is_refused(sasl_gw):
    """Past STARTTLS but not logged in: no relaying, and not even the alias domain (mail there
    would otherwise enter the outbound role unauthenticated)."""
    with sasl_client(sasl_gw) as client:
        assert client.mail("admin@example.com")[0] == 250
        outside = client.rcpt(customer())
        alias = client.rcpt("sales@mycompany.com")
    assert outside[0] == 554 and outside[1].startswith(b"5.7.1 ") and b"Relay access denied" in outside[1], outside
    assert alias[0] == 554 and alias[1].startswith(b"5.7.1 "), alias


@pytest.mark.e2e
def test_remote_odoo_without_tls_gets_nothing(sasl_gw):
    assert sasl_gw.pf is not None
    with smtplib.SMTP("127.0.0.1", sasl_gw.pf.port("sasl"), timeout=30) as client:
        client.ehlo("odoo.remote.example")
        code, reply = client.mail("admin@example.com")
    assert code == 530 and b"STARTTLS" in reply, reply


@pytest.mark.e2e
def test_inbound_alias_mail_reaches_odoo(inbound_gw):
    who = f"c{uuid.uuid4().hex[:8]}@customer.example"
    inbound_gw.submit(message(who, "sales@mycompany.com"), who, ["sales@mycompany.com"], listener="inbound")
    deadline = time.monotonic() + 30
    while not (calls := [c for c in inbound_gw.odoo.calls if who.encode() in c.message]):
        assert time.monotonic() < deadline, logs(inbound_gw)
        time.sleep(0.1)
    assert calls[0].model == "crm.lead"
    assert b"Delivered-To: sales@mycompany.com" in calls[0].message
    assert b"X-Mailgate-Route: alias:sales" in calls[0].message


@pytest.mark.e2e
def test_inbound_unknown_alias_is_refused_at_rcpt(inbound_gw):
    who = f"c{uuid.uuid4().hex[:8]}@customer.example"
    with pytest.raises(smtplib.SMTPResponseException) as refused:
        inbound_gw.submit(message(who, "unknown@mycompany.com"), who, ["unknown@mycompany.com"], listener="inbound")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.1.1 <unknown@mycompany.com>")


@pytest.mark.e2e
def test_example_instances_logged_no_warning(gateways):
    """Run last in this module: whatever the examples did so far (start-up included), Postfix found
    nothing to warn about in them."""
    for folder, gw in gateways.items():
        assert gw.pf is not None
        bad = [line for line in gw.pf.log_text().splitlines() if re.search(r": (warning|error|fatal|panic):", line)]
        assert not bad, (folder, bad)
