"""`mailgate demo`: the newcomer's first command.

It starts a private loopback Postfix wired to `mailgate serve` (the lab gateway: embedded SQLite,
an example config, local sinks as upstream servers, a stand-in for Odoo), sends a handful of
typical messages and prints, per message, what mailgate decided and where the message landed;
then mail from outside (`mailgate.commands.demo_inbound`) and what the metrics counted. Nothing
outside a temporary directory is touched; no port below 1024 is opened.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from email.message import EmailMessage

from mailgate.commands.demo_inbound import DEMO_CONFIG, run_inbound, summary
from mailgate.lab.gateway import LabGateway
from mailgate.lab.postfix import make_basedir
from mailgate.rules.replies import EXIT


@dataclass(frozen=True)
class Example:
    title: str
    header_from: str
    sender: str
    listener: str = "submission"
    via_sendmail: bool = False


EXAMPLES = (
    Example("author outside every filter", '"Admin" <admin@example.com>', "admin@example.com"),
    Example("author on the company domain", '"Jane Doe" <jane@mycompany.com>', "jane@mycompany.com"),
    Example("Odoo's own bounce address as sender", '"Sales" <sales@mycompany.com>',
            "bounce+991-mail.mail-17@mycompany.com"),
    Example("author a partner server may send for", '"Partner Desk" <desk@partner.example>',
            "desk@partner.example"),
    Example("newsletter on the mass listener", '"Newsletter" <news@mycompany.com>', "news@mycompany.com",
            listener="mass"),
    Example("local cron job through sendmail", '"Cron" <cron@example.com>', "cron@example.com",
            via_sendmail=True),
)


def _message(example: Example, to: str) -> tuple[bytes, str]:
    msg = EmailMessage()
    msg["From"] = example.header_from
    msg["To"] = to
    msg["Subject"] = f"mailgate demo: {example.title}"
    msg["Message-ID"] = msgid = f"<{uuid.uuid4().hex}@demo.example>"
    msg.set_content("This message was sent by `mailgate demo`.\n")
    return msg.as_bytes(), msgid


def _raw_header(data: bytes, name: str) -> str:
    found = re.search(rb"^" + name.encode() + rb": (.*)$", data, re.M | re.I)
    return found.group(1).decode(errors="replace").strip() if found else "-"


def run_demo(keep: bool = False, out=sys.stdout) -> int:
    if os.geteuid() != 0 or not shutil.which("postfix"):
        print("mailgate demo needs root and Debian's postfix package (see the README's first command).",
              file=sys.stderr)
        return EXIT["failure"]
    base = make_basedir("mgdemo")
    gateway = LabGateway(base, DEMO_CONFIG)
    print(f"Starting a private Postfix and `mailgate serve` under {base} ...", file=out)
    try:
        gateway.start()
        print("Upstream servers (local sinks): " + ", ".join(
            f"{name} (127.0.0.1:{sink.port}, {sink.security})" for name, sink in gateway.sinks.items()
            if name != "default"), file=out)
        print(f"Config: {gateway.config_path}\nMetrics while the demo runs: {gateway.metrics_url}/metrics "
              f"(health: {gateway.metrics_url}/healthz)\n", file=out)
        print("Outbound: mail from Odoo and local programs\n", file=out)
        message_ids = [_run_example(gateway, number, example, out) for number, example in enumerate(EXAMPLES, 1)]
        run_inbound(gateway, message_ids[0], out)
        summary(gateway, out)
        if keep:
            assert gateway.pf is not None  # set by gateway.start()
            print(f"mailgate's log: {gateway.log_path}\nPostfix's log:  {gateway.pf.maillog}\n"
                  f"The store:      {base / 'state' / 'mailgate.sqlite3'} (tables messages, inbound_messages, "
                  f"bounces)", file=out)
            if sys.stdin.isatty():
                input(f"The gateway runs on ({gateway.metrics_url}/metrics); press Enter to stop it. ")
        else:
            print("Run `mailgate demo --keep` to keep the logs, the config and the SQLite file.", file=out)
        return EXIT["ok"]
    finally:
        gateway.stop()
        if keep:
            print(f"Kept {base}", file=out)
        else:
            shutil.rmtree(base, ignore_errors=True)


def _run_example(gateway: LabGateway, number: int, example: Example, out) -> str:
    """Send one example and say where it landed; returns its Message-ID."""
    to = f"customer{number}@customer.example"
    data, msgid = _message(example, to)
    if example.via_sendmail:
        assert gateway.pf is not None  # run_demo started the gateway
        gateway.pf.sendmail(example.sender, [to], data)
        queue_id = gateway.pf.wait_for_log(rf"(\w+): message-id={re.escape(msgid)}", 30).group(1)
    else:
        queue_id = gateway.submit(data, example.sender, [to], listener=example.listener).queue_id
    sink_name, index = gateway.delivery(queue_id, to)
    got = gateway.sinks[sink_name].messages[index]
    decision = re.search(rf"{queue_id}: (role=outbound .*)$", gateway.mailgate_log(), re.M)
    print(f"{number}. {example.title}  [{'sendmail' if example.via_sendmail else example.listener}]", file=out)
    print(f"   sent:     From: {example.header_from}   MAIL FROM:<{example.sender}>", file=out)
    print(f"   decided:  {decision.group(1) if decision else '(no decision logged)'}", file=out)
    security = "TLS" if got.tls else "plain"
    auth = f", AUTH {got.auth_user}" if got.auth_user else ""
    print(f"   landed:   server '{sink_name}' ({security}{auth}) as From: {_raw_header(got.data, 'From')}", file=out)
    print(f"             MAIL FROM:<{got.mail_from}>\n", file=out)
    return msgid
