"""Odoo's own code as the oracle: for generated outbound cases, the real Odoo's choice of server,
From header and envelope sender (its `ir.mail_server` methods, in a rolled-back transaction, see
`mailgate.lab.odoo_oracle`) against `mailgate explain outbound`'s decision (`decide_outbound`).

The cases are drawn up front from a seeded generator, not by hypothesis's engine: Odoo answers
them in one batch, because starting its shell costs seconds. MAILGATE_ODOO_ORACLE_CASES sets how
many (default 300; a full run asks for 1000 or more), MAILGATE_ODOO_ORACLE_SEED the seed.

mailgate sees what Odoo hands it once it sends through mailgate: the author's From (17.0 and
18.0 with the default From cleared, README "Moving from Odoo's own mail settings") and Odoo's
bounce address as envelope sender (the author's address when there is no alias domain).
Where mailgate deliberately differs from Odoo the case would be compared with that difference
applied (none needed so far). The envelope is compared as it goes on the wire (the milter IDNA-encodes it,
`to_wire`), as Odoo's is.
"""

from __future__ import annotations

import os
import random
import textwrap
from collections import Counter
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.utils import getaddresses

import pytest

from mailgate.configfile import parse_config
from mailgate.lab.odoo_oracle import OutboundCase, ServerCase, ask_odoo_inbound, ask_odoo_outbound
from mailgate.rules.addresses import to_wire
from mailgate.rules.inbound import decide_inbound
from mailgate.rules.message import InboundMessage
from mailgate.rules.outbound import OutboundRequest, decide_outbound

pytestmark = [pytest.mark.e2e, pytest.mark.odoo(every_version=True)]

CASES = int(os.environ.get("MAILGATE_ODOO_ORACLE_CASES", "300"))
SEED = int(os.environ.get("MAILGATE_ODOO_ORACLE_SEED", "12"))

FILTERS = [None, "", "mycompany.com", "MyCompany.COM", "partner.example", "odoo@mycompany.com",
           "notifications@mycompany.com", "mycompany.com, partner.example", "partner.example,odoo@mycompany.com",
           "sub.mycompany.com", "other.example", "bücher.example", "xn--bcher-kva.example"]
SEQUENCES = [1, 5, 10, 10, 20]
AUTHORS = ["Admin <admin@example.com>", "jane@mycompany.com", '"Jane Doe" <Jane.Doe@MyCompany.com>',
           "Desk <desk@partner.example>", "odoo@mycompany.com", "x@sub.mycompany.com",
           "notifications@mycompany.com", '"Doe, John" <john@other.example>', "Büro <info@bücher.example>",
           "Zoë <zoe@example.org>"]
DEFAULT_FROMS = ["notifications", "noreply", "noreply@other.example", "notifications@mycompany.com", None]


def generate(count: int, seed: int) -> list[OutboundCase]:
    pick = random.Random(seed)
    cases = []
    for _ in range(count):
        servers = tuple(ServerCase(f"s{n}", pick.choice(FILTERS), pick.choice(SEQUENCES), pick.random() > 0.15)
                        for n in range(pick.randint(0, 4)))
        alias_domain = pick.choice(["mycompany.com", "mycompany.com", None])
        cases.append(OutboundCase(servers, alias_domain, pick.choice(DEFAULT_FROMS), pick.choice(AUTHORS)))
    return cases


def mailgate_config(case: OutboundCase):
    # Since 17.0 the default From belongs to the alias domain: without one, Odoo has none.
    default_from = case.default_from if case.alias_domain else None
    lines = [f"alias_domain: {case.alias_domain or 'null'}", f"default_from: {default_from or 'null'}", "servers:"]
    for server in case.servers:
        lines += [f"  - name: {server.name}", f"    host: {server.name}.example.net",
                  f"    from_filter: {server.from_filter!r}" if server.from_filter else "    from_filter: null",
                  f"    priority: {server.sequence}", f"    active: {str(server.active).lower()}"]
    if not case.servers:
        lines[-1] = "servers: []"
    return parse_config(textwrap.dedent("\n".join(lines)) + "\n", "<oracle>", check_files=False).config


def mailbox(value: str | None) -> tuple[str, str] | None:
    """(display name, address in lower case) of a From header, whatever its quoting."""
    if not value:
        return None
    [(name, address)] = getaddresses([str(make_header(decode_header(value)))])
    return name, Address(addr_spec=address).addr_spec.lower() if "@" in address else address.lower()


def mailgate_answer(case: OutboundCase) -> dict:
    config = mailgate_config(case)
    bounce = f"bounce@{case.alias_domain}" if case.alias_domain else to_wire(getaddresses([case.author])[0][1])
    decision = decide_outbound(config, OutboundRequest(case.author, bounce))
    return {"server": decision.server.name if decision.server else None,
            "header_from": mailbox(decision.header_from), "envelope_from": to_wire(decision.envelope_from).lower()}


def odoo_answer(raw: dict) -> dict:
    return {"server": raw["server"], "header_from": mailbox(raw["header_from"]),
            "envelope_from": (raw["envelope_from"] or "").lower()}


def test_outbound_decisions_match_odoos_own(odoo):
    cases = generate(CASES, SEED)
    answers = ask_odoo_outbound(odoo, cases)
    differences = []
    errors = [(case, raw) for case, raw in zip(cases, answers, strict=True) if "error" in raw]
    for case, raw in zip(cases, answers, strict=True):
        if "error" in raw:
            continue
        ours, theirs = mailgate_answer(case), odoo_answer(raw)
        if ours != theirs:
            differences.append((case, theirs, ours))
    report = "\n".join(f"{case}\n  odoo:     {theirs}\n  mailgate: {ours}" for case, theirs, ours in differences[:15])
    print(f"{len(cases)} cases, {len(errors)} Odoo errors, {len(differences)} differences")
    assert not errors, f"Odoo failed on {len(errors)} of {len(cases)} cases, e.g. {errors[0]}"
    assert not differences, f"{len(differences)} of {len(cases)} cases differ:\n{report}"


# -- inbound: Odoo's message_route against mailgate's routes ---------------------------------------

INBOUND_ALIASES = [{"name": "partners", "incoming_local": False}, {"name": "jobs", "incoming_local": True},
                   {"name": "commercial", "incoming_local": True}]
RECIPIENTS = ["partners@mycompany.com", "PARTNERS@MyCompany.com", "jobs@mycompany.com", "commercial@gmail.com",
              "jobs@othercompany.example", "partners@gmail.com", "catchall@mycompany.com", "bounce@mycompany.com",
              "someone@mycompany.com", "a@partner.example", "Jobs <jobs@othercompany.example>"]


def inbound_messages(count: int, seed: int) -> list[tuple[tuple[tuple[str, str], ...], str]]:
    """(headers, envelope recipient) of new messages: no references, one sender each."""
    pick = random.Random(seed)
    messages = []
    for number in range(count):
        to = pick.sample(RECIPIENTS, pick.randint(1, 2))
        cc = pick.sample(RECIPIENTS, pick.randint(0, 2))
        sender = "MAILER-DAEMON@mx.remote.example" if pick.random() < 0.05 else f"c{number}@customer.example"
        headers = [("From", sender), ("To", ", ".join(to))]
        if cc:
            headers.append(("Cc", ", ".join(cc)))
        headers += [("Subject", f"case {number}"), ("Message-ID", f"<case{number}.{seed}@customer.example>")]
        envelope = getaddresses([to[0]])[0][1]
        messages.append((tuple(headers), envelope))
    return messages


def inbound_config(allowed: str):
    aliases = "\n".join(f"  {a['name']}: {{target: 'odoo:res.partner', incoming_local: {a['incoming_local']}}}"
                        for a in INBOUND_ALIASES)
    allowed_line = f"allowed_alias_domains: [{allowed}]"
    text = f"alias_domain: mycompany.com\n{allowed_line}\naliases:\n{aliases}\n"
    return parse_config(text, "<oracle>", check_files=False).config


def mailgate_routes(config, headers, envelope) -> list[str]:
    decision = decide_inbound(config, InboundMessage(headers, (envelope,)), known_outbound=lambda ids: None,
                              already_received=lambda msgid: False, recent_count=lambda sender, route: 0,
                              verify_token=lambda text: None)
    labels = sorted(decision.labels)
    return ["catchall"] if labels and labels[0].startswith("catchall") else labels


@pytest.mark.parametrize("allowed", ["", "othercompany.example"])
def test_inbound_routes_match_odoos_message_route(odoo, allowed):
    messages = inbound_messages(max(CASES // 2, 50), SEED)
    raws = ["".join(f"{name}: {value}\n" for name, value in (("Delivered-To", envelope), *headers)) + "\nHello.\n"
            for headers, envelope in messages]
    answers = ask_odoo_inbound(odoo, {"alias_domain": "mycompany.com", "aliases": INBOUND_ALIASES,
                                      "allowed": allowed}, raws)
    config = inbound_config(allowed)
    errors = [(raw, answer) for raw, answer in zip(raws, answers, strict=True) if "error" in answer]
    assert not errors, f"Odoo failed on {len(errors)} messages, e.g. {errors[0]}"
    differences = [(raw, answer["routes"], ours) for raw, answer, (headers, envelope)
                   in zip(raws, answers, messages, strict=True)
                   if answer["routes"] != (ours := mailgate_routes(config, headers, envelope))]
    outcomes = Counter(" ".join(answer["routes"]) or "none" for answer in answers)
    print(f"{len(raws)} messages, {len(differences)} differences; Odoo's routes: {dict(outcomes)}")
    assert len(outcomes) >= 5, f"too few kinds of outcome to compare: {dict(outcomes)}"
    report = "\n".join(f"{raw.splitlines()[:4]}\n  odoo:     {theirs}\n  mailgate: {ours}"
                       for raw, theirs, ours in differences[:12])
    assert not differences, f"{len(differences)} of {len(raws)} messages differ:\n{report}"
