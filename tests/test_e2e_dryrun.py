"""`dry_run: true` end to end: every decision is logged as it would be applied, nothing is changed
or refused — for a first rollout on a live server."""

from __future__ import annotations

import re
import time
import uuid

import pytest

from faultlab import make_message
from mailgate.lab.gateway import GONE

GATEWAY_EXTRA_CONFIG = "dry_run: true\nloop: {threshold: 1}\n"
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]


def message(header_from: str, to: str) -> bytes:
    return make_message(header_from, to, subject="dry run")[0]


def test_outbound_is_logged_not_changed(gw):
    to = f"r{uuid.uuid4().hex[:6]}@customer.example"
    sent = gw.submit(message('"Admin" <admin@example.com>', to), "admin@example.com", [to])
    sink, index = gw.delivery(sent.queue_id, to)
    got = gw.sinks[sink].messages[index]
    assert got.mail_from == "admin@example.com"
    assert re.search(rb'^From: "Admin" <admin@example.com>', got.data, re.M)
    assert re.search(rf"{sent.queue_id}: role=outbound .*header_from=<notifications@mycompany.com> rewritten=yes "
                     r".*dry_run=yes", gw.mailgate_log())


def test_inbound_refusals_are_logged_not_applied(gw):
    sender = f"robot{uuid.uuid4().hex[:6]}@spam.example"
    unknown = gw.submit(message(sender, "nobody@mycompany.com"), sender, ["nobody@mycompany.com"],
                        listener="inbound")
    assert unknown.queue_id
    assert re.search(rf"role=policy from=<{sender}> rcpt=<nobody@mycompany.com> verdict=no_such_alias .*dry_run=yes",
                     gw.mailgate_log())
    for _ in range(3):  # threshold 1: a live gateway would refuse the second and third
        gw.submit(message(sender, "sales@mycompany.com"), sender, ["sales@mycompany.com"], listener="inbound")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len([c for c in gw.odoo.calls if sender.encode() in c.message]) < 3:
        time.sleep(0.2)
    assert len([c for c in gw.odoo.calls if sender.encode() in c.message]) == 3


def test_blacklisted_mass_recipient_still_receives_in_dry_run(gw):
    import subprocess
    import sys
    from pathlib import Path
    subprocess.run([str(Path(sys.executable).with_name("mailgate")), "blacklist", "add", GONE,
                    "--config", str(gw.config_path)], check=True, capture_output=True, timeout=60)
    sent = gw.submit(message("News <news@mycompany.com>", GONE), "news@mycompany.com", [GONE], listener="mass")
    assert sent.queue_id, "a dry run refuses nothing at RCPT"
    assert re.search(rf"role=policy from=<news@mycompany.com> rcpt=<{GONE}> verdict=blacklisted .*dry_run=yes",
                     gw.mailgate_log())
