"""The "it's our fault" alert end to end (docs/rules.md B4-B6), through the real Postfix.

Every upstream sink refuses anyone@blocking.example as from a block-listed client (554 5.7.1 ...
blocked using zen.example.net). Postfix's own reports come back through the milter: each is a
bounce with reason `blocked`, not the recipient's fault, so it never counts toward the
blacklist; the second within the window passes this module's threshold and logs one alert,
which `mailgate stats` shows.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgate.lab.gateway import BLOCKING, LabGateway

GATEWAY_EXTRA_CONFIG = "bounces: {reputation_threshold: 2, reputation_window_minutes: 1440}\n"
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]


def _send(gw: LabGateway) -> int:
    """One message to the blocked address; the id of its bounce row once the report is in."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = '"Sales" <sales@mycompany.com>', BLOCKING, "reputation e2e"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@mycompany.com>"
    msg.set_content("Hello.\n")
    sent = gw.submit(msg.as_bytes(), "sales@mycompany.com", [BLOCKING])
    gw.pf.wait_for_log(rf"{sent.queue_id}: to=<{BLOCKING}>, .*status=bounced", 30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with sqlite3.connect(gw.base / "state" / "mailgate.sqlite3") as conn:
            found = conn.execute("select b.id from bounces b join messages m on b.message = m.id "
                                 "where m.queue_id = ?", [sent.queue_id]).fetchall()
        if found:
            return found[0][0]
        time.sleep(0.2)
    raise AssertionError(f"no bounce recorded for {sent.queue_id}")


def test_block_list_refusals_alert_once_and_never_blacklist(gw):
    for _ in range(3):
        _send(gw)
    with sqlite3.connect(gw.base / "state" / "mailgate.sqlite3") as conn:
        conn.row_factory = sqlite3.Row
        bounces = [dict(r) for r in conn.execute("select * from bounces where recipient = ?", [BLOCKING])]
        listed = conn.execute("select count(*) from blacklist where address = ?", [BLOCKING]).fetchone()[0]
    assert [(b["reason"], b["hard"], b["permanent"], b["status"]) for b in bounces] == [("blocked", 0, 1, "5.7.1")] * 3
    assert "blocked using zen.example.net" in bounces[0]["diagnostic"] and listed == 0
    log = gw.mailgate_log()
    alerts = re.findall(r"event=reputation server=transactional domain=blocking.example reason=blocked count=(\d+)",
                        log)
    assert alerts == ["2"], "one line per window, at the threshold"
    stats = subprocess.run([str(Path(sys.executable).with_name("mailgate")), "stats", "--json",
                            "--config", str(gw.config_path)], capture_output=True, timeout=60, check=True)
    [alert] = json.loads(stats.stdout)["reputation"]
    assert (alert["server"], alert["domain"], alert["reason"], alert["bounces"]) == (
        "transactional", "blocking.example", "blocked", 2)
