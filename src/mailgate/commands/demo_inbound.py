"""`mailgate demo`'s second half: mail coming in from outside, and what the gateway counted.

After the outbound examples, the demo plays the other direction through Postfix's public
listener: a customer's reply to one of the messages just sent reaches the Odoo stand-in on its
thread, a new mail to an alias reaches it at once, an unknown alias and a looping robot are
refused with their replies, and a delivery report comes back and is recorded as a bounce. Then a
short table of what `serve`'s metrics counted.
"""

from __future__ import annotations

import re
import smtplib
import sqlite3
import time
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from typing import TextIO, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from mailgate.lab.gateway import GONE, LabGateway
from mailgate.lab.odoo_stub import StubCall

DEMO_LOOP_THRESHOLD = 3
DEMO_CONFIG = f"loop: {{minutes: 120, threshold: {DEMO_LOOP_THRESHOLD}}}\n"
"""Appended to the lab's configuration: a loop threshold of 3 (Odoo's default is 20) so that the
demo shows a loop refused after a few messages."""

Found = TypeVar("Found")


def _wait(find: Callable[[], Found | None], timeout: float = 30) -> Found:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.1)
    raise TimeoutError("the demo waited in vain: see the logs (mailgate demo --keep)")


def _message(sender: str, to: str, subject: str, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@customer.example>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Sent from outside by `mailgate demo`.\n")
    return msg.as_bytes()


def _reached_odoo(gw: LabGateway, marker: str) -> StubCall:
    return _wait(lambda: next((c for c in gw.odoo.calls if marker.encode() in c.message), None))


def _route(call: StubCall) -> str:
    found = re.search(rb"^X-Mailgate-Route: (.*)$", call.message, re.M)
    return found.group(1).decode().strip() if found else "-"


def _refused(gw: LabGateway, data: bytes, sender: str, rcpt: str) -> str:
    try:
        gw.submit(data, sender, [rcpt], listener="inbound")
    except smtplib.SMTPResponseException as exc:
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        return f"{exc.smtp_code} {text}"
    return "accepted (not expected)"


def run_inbound(gw: LabGateway, replied_message_id: str, out: TextIO) -> None:
    print("Inbound: mail from outside on the public listener [inbound]\n", file=out)
    customer = "customer1@customer.example"
    gw.submit(_message(customer, "catchall@mycompany.com", "Re: mailgate demo", In_Reply_To=replied_message_id,
                       References=replied_message_id), customer, ["catchall@mycompany.com"], listener="inbound")
    call = _reached_odoo(gw, "Re: mailgate demo")
    print(f"a. a customer's reply to message 1  -> Odoo, route {_route(call)} (its thread)", file=out)

    prospect = "prospect@customer.example"
    gw.submit(_message(prospect, "sales@mycompany.com", "A question about prices"), prospect,
              ["sales@mycompany.com"], listener="inbound")
    call = _reached_odoo(gw, "A question about prices")
    print(f"b. a new mail to sales@             -> Odoo, route {_route(call)}, model {call.model}", file=out)

    reply = _refused(gw, _message(prospect, "nobody@mycompany.com", "Hello?"), prospect, "nobody@mycompany.com")
    print(f"c. a mail to nobody@ (no alias)     -> refused at RCPT: {reply}", file=out)

    robot = "autoresponder@robot.example"
    for number in range(DEMO_LOOP_THRESHOLD):
        gw.submit(_message(robot, "support@mycompany.com", f"Auto-reply {number}"), robot, ["support@mycompany.com"],
                  listener="inbound")
    reply = _refused(gw, _message(robot, "support@mycompany.com", "Auto-reply again"), robot,
                     "support@mycompany.com")
    print(f"d. an autoresponder's message {DEMO_LOOP_THRESHOLD + 1} to support@ (loop threshold "
          f"{DEMO_LOOP_THRESHOLD} in the demo's config, Odoo's default is 20)\n"
          f"                                    -> refused at end of data: {reply}", file=out)

    sent = gw.submit(_message("jane@mycompany.com", GONE, "To an address that no longer exists"),
                     "jane@mycompany.com", [GONE])
    assert gw.pf is not None  # the demo started the gateway
    gw.pf.wait_for_log(rf"{sent.queue_id}: to=<{re.escape(GONE)}>, .*status=bounced", 30)
    status, reason, fault, diagnostic = _wait(lambda: _bounce(gw))
    print(f"e. mail to {GONE} bounced upstream; the delivery report came back to its bounce address\n"
          f"                                    -> recorded as a bounce: {status} {reason} ({fault}): "
          f"{diagnostic}\n", file=out)


def _bounce(gw: LabGateway) -> tuple[str, str, str, str] | None:
    """The bounce's status, reason (docs/rules.md B4), whose fault (B5) and what the report said."""
    with sqlite3.connect(gw.base / gw.database) as db:
        row = db.execute("select status, reason, hard, diagnostic from bounces where recipient = ? "
                         "order by id desc limit 1", (GONE,)).fetchone()
    if not row:
        return None
    return str(row[0]), str(row[1]), "hard: the recipient's fault" if row[2] else "soft", str(row[3])


def summary(gw: LabGateway, out: TextIO) -> None:
    """What the running gateway's metrics counted, one line per series."""
    rows: list[tuple[str, float]] = []
    for family in text_string_to_metric_families(gw.scrape()):
        if family.name not in ("mailgate_decisions", "mailgate_refusals", "mailgate_bounces_recorded"):
            continue
        for sample in family.samples:
            if sample.value:
                labels = sample.labels
                what = (f"{labels['role']} {labels['verdict']} ({labels['reason']}"
                        f"{', ' + labels['server'] if labels.get('server', 'none') != 'none' else ''})"
                        if family.name == "mailgate_decisions" else
                        f"refused at {labels['stage']}: {labels['reply']}" if family.name == "mailgate_refusals"
                        else f"bounce {labels['reason']} ({labels['kind']})")
                rows.append((what, sample.value))
    width = max((len(what) for what, _ in rows), default=10)
    print(f"What {gw.metrics_url}/metrics counted:", file=out)
    for what, count in rows:
        print(f"  {what:<{width}}  {count:>4.0f}", file=out)
    print(file=out)
