"""The metrics listener end to end: what Postfix did through mailgate is what a scrape says.

A handful of messages of each kind go through a real Postfix; the scrape's counters move by
exactly those numbers. A refused reload, a killed milter process and a store that takes no
writes show in the metrics and in /healthz (and `mailgate check-health`).
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgate.lab.gateway import GONE, LabGateway
from mailgate.rules.replies import EXIT, HEALTH

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]

LOOP_THRESHOLD = 3
GATEWAY_EXTRA_CONFIG = f"loop: {{minutes: 120, threshold: {LOOP_THRESHOLD}}}\n"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(gw: LabGateway) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(gw.scrape()) for sample in family.samples}


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The counters that changed, by how much (histograms' buckets and sums left out)."""
    return {key: after[key] - before.get(key, 0.0) for key in after
            if key[0].endswith("_total") and after[key] != before.get(key, 0.0)}


def message(sender: str, to: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, "metrics e2e"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@metrics.example>"
    msg.set_content("Counted.\n")
    return msg.as_bytes()


def health(gw: LabGateway) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{gw.metrics_url}/healthz", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(predicate, timeout: float = 30, what: str = "condition", interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def decisions(role: str, verdict: str, reason: str, server: str = "none", mass: str = "no"):
    labels = {"role": role, "verdict": verdict, "reason": reason, "server": server, "mass": mass, "dry_run": "no"}
    return ("mailgate_decisions_total", frozenset(labels.items()))


def refusals(stage: str, reply: str):
    return ("mailgate_refusals_total", frozenset({"stage": stage, "reply": reply, "dry_run": "no"}.items()))


def test_a_scrape_counts_exactly_what_went_through(gw):
    before = samples(gw)
    for _ in range(2):
        gw.submit(message("admin@example.com", "c@customer.example"), "admin@example.com", ["c@customer.example"])
    for _ in range(3):
        gw.submit(message("jane@mycompany.com", "c@customer.example"), "jane@mycompany.com", ["c@customer.example"])
    gw.submit(message("news@mycompany.com", "c@customer.example"), "news@mycompany.com", ["c@customer.example"],
              listener="mass")
    who = f"c{uuid.uuid4().hex[:8]}@customer.example"
    for _ in range(2):
        gw.submit(message(who, "sales@mycompany.com"), who, ["sales@mycompany.com"], listener="inbound")
    for rcpt in ("nobody@mycompany.com", "bounce+aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@mycompany.com"):
        with pytest.raises(smtplib.SMTPResponseException):
            gw.submit(message(who, rcpt), who, [rcpt], listener="inbound")
    robot = f"robot{uuid.uuid4().hex[:6]}@spam.example"
    for _ in range(LOOP_THRESHOLD):
        gw.submit(message(robot, "support@mycompany.com"), robot, ["support@mycompany.com"], listener="inbound")
    with pytest.raises(smtplib.SMTPResponseException):
        gw.submit(message(robot, "support@mycompany.com"), robot, ["support@mycompany.com"], listener="inbound")
    sent = gw.submit(message("jane@mycompany.com", GONE), "jane@mycompany.com", [GONE])
    gw.pf.wait_for_log(rf"{sent.queue_id}: to=<{GONE}>, .*status=bounced", 30)
    wait_for(lambda: re.search(r"role=bounce report=\S+ failed=1 recorded=1", gw.mailgate_log()), what="the bounce")

    after = samples(gw)
    bounce = ("mailgate_bounces_recorded_total", frozenset({"reason": "userunknown", "kind": "hard"}.items()))
    assert moved(before, after) == {
        decisions("outbound", "encapsulated", "notification-domain", "transactional"): 2,
        decisions("outbound", "kept", "from-domain", "transactional"): 4,
        decisions("outbound", "kept", "mass", "mass", mass="yes"): 1,
        decisions("inbound", "deliver", "alias"): 2 + LOOP_THRESHOLD,
        decisions("inbound", "reject", "alias"): 1,
        decisions("inbound", "deliver", "bounce"): 1,
        refusals("rcpt", "no_such_alias"): 1,
        refusals("rcpt", "forged_bounce"): 1,
        refusals("end_of_message", "loop_reject"): 1,
        bounce: 1,
    }
    eom = ("mailgate_milter_end_of_message_seconds_count", frozenset({"role": "outbound"}.items()))
    assert after[eom] - before.get(eom, 0) == 7
    assert value(after, "mailgate_policy_answer_seconds_count") > value(before, "mailgate_policy_answer_seconds_count")
    assert value(after, "mailgate_lookup_duration_seconds_count", map="transport") > 0
    assert value(after, "mailgate_store_operation_duration_seconds_count", operation="record_outbound") >= 7
    assert value(after, "mailgate_milter_up") == 1 and value(after, "mailgate_config_generation") == 1


def serve_children(gw: LabGateway) -> list[int]:
    assert gw.process is not None
    text = Path(f"/proc/{gw.process.pid}/task/{gw.process.pid}/children").read_text()
    return [int(pid) for pid in text.split()]


def test_a_refused_reload_and_a_killed_milter_show_and_nothing_is_counted_twice(gw):
    assert gw.process is not None
    original = gw.config_path.read_text()
    before = samples(gw)
    gw.config_path.write_text(original + "no_such_key: 1\n")
    gw.process.send_signal(signal.SIGHUP)
    wait_for(lambda: value(samples(gw), "mailgate_config_reloads_total", result="refused")
             == value(before, "mailgate_config_reloads_total", result="refused") + 1, what="the refused reload")
    refused = samples(gw)
    assert value(refused, "mailgate_config_last_reload_ok") == 0
    assert value(refused, "mailgate_config_generation") == value(before, "mailgate_config_generation")
    gw.config_path.write_text(original)
    gw.process.send_signal(signal.SIGHUP)
    wait_for(lambda: value(samples(gw), "mailgate_config_generation")
             == value(before, "mailgate_config_generation") + 1, what="the good reload")
    assert value(samples(gw), "mailgate_config_reloads_total", result="ok") == \
        value(before, "mailgate_config_reloads_total", result="ok") + 1

    gw.submit(message("jane@mycompany.com", "c@customer.example"), "jane@mycompany.com", ["c@customer.example"])
    counted = samples(gw)
    [child] = serve_children(gw)
    os.kill(child, signal.SIGKILL)
    status, text = wait_for(lambda: (answer := health(gw))[0] == 503 and answer, interval=0.01, what="503")
    assert text == f"milter_down: {HEALTH['milter_down']}\n"
    wait_for(lambda: value(samples(gw), "mailgate_milter_restarts_total")
             == value(counted, "mailgate_milter_restarts_total") + 1, what="the restart")
    wait_for(lambda: value(samples(gw), "mailgate_milter_up") == 1 and serve_children(gw) != [child],
             what="a new milter process")
    assert moved(counted, samples(gw)) == {("mailgate_milter_restarts_total", frozenset()): 1}
    gw.submit(message("jane@mycompany.com", "c@customer.example"), "jane@mycompany.com", ["c@customer.example"])
    assert moved(counted, samples(gw)) == {("mailgate_milter_restarts_total", frozenset()): 1,
                                           decisions("outbound", "kept", "from-domain", "transactional"): 1}


def check_health(gw: LabGateway) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("mailgate")), "check-health", "--config",
                           str(gw.config_path)], capture_output=True, text=True, timeout=30)


def test_health_is_503_while_the_store_takes_no_writes_and_200_again_after(gw):
    assert health(gw) == (200, HEALTH["ok"] + "\n")
    assert check_health(gw).returncode == EXIT["ok"]
    locker = sqlite3.connect(gw.base / gw.database, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        status, text = wait_for(lambda: (answer := health(gw))[0] == 503 and answer, what="503")
        assert text.startswith("store_slow: " + HEALTH["store_slow"]), text   # waiting on the lock
        wait_for(lambda: health(gw)[1].startswith("store_unwritable: "), what="the failed write")
        failed = check_health(gw)
        assert failed.returncode == EXIT["failure"] and failed.stdout.startswith("store_"), failed
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    wait_for(lambda: health(gw)[0] == 200, what="200 again")
    assert value(samples(gw), "mailgate_store_errors_total", operation="check_writable") >= 1
