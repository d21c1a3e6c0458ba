"""Odoo's own code as the oracle: for generated outbound cases, the real Odoo's choice of server,
From header and envelope sender (its `ir.mail_server` methods, in a rolled-back transaction, see
`mailgate.lab.odoo_oracle`) against `mailgate explain outbound`'s decision (`decide_outbound`).

The cases are drawn up front from a seeded generator, not by hypothesis's engine: Odoo answers
them in one batch, because starting its shell costs seconds. MAILGATE_ODOO_ORACLE_CASES sets how
many (default 300; a full run asks for 1000 or more), MAILGATE_ODOO_ORACLE_SEED the seed.

mailgate sees what Odoo hands it once it sends through mailgate: the author's From (17.0 and 18.0
with the default From cleared, README "Moving from Odoo's own mail settings") and Odoo's bounce
address as envelope sender (the author's address when there is no alias domain). Where mailgate
deliberately differs from Odoo (inbound: a tokenised bounce address, docs/rules.md I2) the message
is compared with that difference taken out: it must then route as Odoo did. The envelope is compared
as it goes on the wire (the milter IDNA-encodes it, `to_wire`), as Odoo's is.
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
from mailgate.rules.replies import SMTP
from mailgate.rules.tokens import TokenSigner

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
SIGNER = TokenSigner(b"oracle-secret-of-32-bytes-length", "oracle")
TOKEN_ADDRESSES = [f"bounce+{SIGNER.make(41, 's1', 1.8e9)}@mycompany.com",   # mailgate's, valid
                   f"bounce+{SIGNER.make(41, 's1', 1.8e9)[:-2]}zz@mycompany.com",   # forged
                   "bounce+12-res.partner-3@mycompany.com"]   # Odoo's own form (16 and older)
RECIPIENTS = ["partners@mycompany.com", "PARTNERS@MyCompany.com", "jobs@mycompany.com", "commercial@gmail.com",
              "jobs@othercompany.example", "partners@gmail.com", "catchall@mycompany.com", "bounce@mycompany.com",
              "someone@mycompany.com", "a@partner.example", "Jobs <jobs@othercompany.example>"]
NEUTRAL = "nobody@elsewhere.example"
"""What a token address is replaced by to show that it is the only difference: no alias, catchall
or bounce address anywhere, for Odoo as for mailgate."""
THREADS = [{"model": "res.partner", "message_id": "<1733.1-openerp-7001-res.partner@mycompany.com>"},
           {"model": "mail.blacklist", "message_id": "<1733.2-openerp-7002-mail.blacklist@mycompany.com>"},
           {"model": "res.partner", "message_id": "<1733.3-openerp-7003-res.partner@mycompany.com>"}]
KNOWN = [thread["message_id"] for thread in THREADS]   # in the order sent: the last is the most recent
REFERENCES = [*KNOWN, "<never-sent.1@customer.example>", "<1733.9-openerp-reply_to@mycompany.com>"]


def thread_headers(pick: random.Random) -> list[tuple[str, str]]:
    """In-Reply-To and/or References naming known and unknown Message-IDs, or nothing (new mail)."""
    if pick.random() < 0.5:
        return []
    refs = " ".join(pick.sample(REFERENCES, pick.randint(1, 3)))
    kind = pick.choice(["References", "In-Reply-To", "both"])
    if kind == "both":
        return [("In-Reply-To", refs.split()[-1]), ("References", refs)]
    return [(kind, refs.replace(" ", "\n ") if pick.random() < 0.3 else refs)]


def inbound_messages(count: int, seed: int) -> list[tuple[tuple[tuple[str, str], ...], str]]:
    """(headers, envelope recipient) of generated messages: new mail and replies, one sender each."""
    pick = random.Random(seed)
    messages = []
    for number in range(count):
        to = pick.sample(RECIPIENTS, pick.randint(1, 2))
        if pick.random() < 0.12:
            to.insert(pick.randint(0, len(to)), pick.choice(TOKEN_ADDRESSES))
        cc = pick.sample(RECIPIENTS, pick.randint(0, 2))
        sender = "MAILER-DAEMON@mx.remote.example" if pick.random() < 0.05 else f"c{number}@customer.example"
        headers = [("From", sender), ("To", ", ".join(to))]
        if cc:
            headers.append(("Cc", ", ".join(cc)))
        headers += [("Subject", f"case {number}"), ("Message-ID", f"<case{number}.{seed}@customer.example>"),
                    *thread_headers(pick)]
        envelope = getaddresses([to[0]])[0][1]
        messages.append((tuple(headers), envelope))
    return messages


def inbound_config(allowed: str):
    aliases = "\n".join(f"  {a['name']}: {{target: 'odoo:res.partner', incoming_local: {a['incoming_local']}}}"
                        for a in INBOUND_ALIASES)
    allowed_line = f"allowed_alias_domains: [{allowed}]"
    text = f"alias_domain: mycompany.com\n{allowed_line}\naliases:\n{aliases}\n"
    return parse_config(text, "<oracle>", check_files=False).config


def known_outbound(ids: list[str]) -> str | None:
    """The store's answer when THREADS went out through the gateway: the most recent named."""
    sent = [message_id for message_id in KNOWN if message_id in ids]
    return sent[-1] if sent else None


def mailgate_routes(config, headers, envelope) -> list[str]:
    decision = decide_inbound(config, InboundMessage(headers, (envelope,)), known_outbound=known_outbound,
                              already_received=lambda msgid: False, recent_count=lambda sender, route: 0,
                              verify_token=SIGNER.verify)
    if decision.reply == SMTP["forged_bounce"]:
        return ["refused:forged_bounce"]
    labels = sorted(decision.labels)
    return ["catchall"] if labels and labels[0].startswith("catchall") else labels


def without_tokens(headers, envelope):
    """The message with every token address (mailgate's or Odoo's old form) replaced by NEUTRAL."""
    def neutral(text: str) -> str:
        for address in TOKEN_ADDRESSES:
            text = text.replace(address, NEUTRAL)
        return text
    return tuple((name, neutral(value)) for name, value in headers), neutral(envelope)


def documented_difference(config, headers, envelope, odoo_routes: list[str], ours: list[str]) -> str | None:
    """docs/rules.md I2, "Differs from Odoo": a token address in "to" makes the message a bounce
    (or, forged, a refusal) for mailgate; Odoo 17 and later know only the plain bounce address and
    route the same message as ordinary mail. The difference is that, and only that, when mailgate
    routes the message like Odoo once the token addresses are replaced by a neutral address."""
    if ours not in (["bounce"], ["refused:forged_bounce"]):
        return None
    return "I2 token address" if mailgate_routes(config, *without_tokens(headers, envelope)) == odoo_routes else None


@pytest.mark.parametrize("allowed", ["", "othercompany.example"])
def test_inbound_routes_match_odoos_message_route(odoo, allowed):
    messages = inbound_messages(max(CASES // 2, 50), SEED)
    raws = ["".join(f"{name}: {value}\n" for name, value in (("Delivered-To", envelope), *headers)) + "\nHello.\n"
            for headers, envelope in messages]
    answers = ask_odoo_inbound(odoo, {"alias_domain": "mycompany.com", "aliases": INBOUND_ALIASES,
                                      "allowed": allowed, "threads": THREADS}, raws)
    config = inbound_config(allowed)
    errors = [(raw, answer) for raw, answer in zip(raws, answers, strict=True) if "error" in answer]
    assert not errors, f"Odoo failed on {len(errors)} messages, e.g. {errors[0]}"
    differences, documented = [], Counter()
    for raw, answer, (headers, envelope) in zip(raws, answers, messages, strict=True):
        ours = mailgate_routes(config, headers, envelope)
        if answer["routes"] == ours:
            continue
        why = documented_difference(config, headers, envelope, answer["routes"], ours)
        if why:
            documented[why] += 1
        else:
            differences.append((raw, answer["routes"], ours))
    outcomes = Counter((" ".join(answer["routes"]) or "none").split(":")[0] for answer in answers)
    print(f"{len(raws)} messages, {len(differences)} differences, documented ones {dict(documented)}; "
          f"Odoo's routes: {dict(outcomes)}")
    assert {"reply", "alias", "bounce", "catchall", "none"} <= set(outcomes), f"too few kinds: {dict(outcomes)}"
    report = "\n".join(f"{raw.splitlines()[:8]}\n  odoo:     {theirs}\n  mailgate: {ours}"
                       for raw, theirs, ours in differences[:12])
    assert not differences, f"{len(differences)} of {len(raws)} messages differ:\n{report}"
