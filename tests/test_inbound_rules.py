"""docs/rules.md I1-I4 as tables, with sample messages inline, without sockets."""

from __future__ import annotations

import email

import pytest

from mailgate.configfile import parse_config
from mailgate.rules.inbound import decide_inbound, find_routes, thread_target
from mailgate.rules.message import InboundMessage
from mailgate.rules.tokens import BounceToken

VALID_TOKEN = BounceToken(row_id=1, server_tag=0, issued_day=0)  # what the signer returns for a token it issued

CONFIG_TEXT = """
alias_domain: mycompany.com
allowed_alias_domains: [mycompany.com, othercompany.example]
aliases:
  sales: {target: "odoo:crm.lead"}
  support: {target: "odoo:helpdesk.ticket"}
  jobs: {target: "odoo:hr.applicant", incoming_local: true}
  commercial: {target: "odoo:crm.lead", incoming_local: true}
"""
CONFIG = parse_config(CONFIG_TEXT, check_files=False).config
OUTBOUND = {"<1700000000.1-openerp-42-crm.lead@mycompany.com>", "<plain-sent-1@mycompany.com>",
            "<1700000100.2-openerp-42-crm.lead@mycompany.com>", "<1700000200.3-openerp-reply_to@mycompany.com>"}


def config(extra: str = ""):
    return parse_config(CONFIG_TEXT + extra, check_files=False).config


def msg(text: str, rcpts: tuple[str, ...] = ()) -> InboundMessage:
    parsed = email.message_from_string(text.lstrip())
    return InboundMessage(tuple((k, str(v)) for k, v in parsed.items()), rcpts)


def known(ids: list[str]) -> str | None:
    return next((i for i in ids if i in OUTBOUND), None)


def decide(message: InboundMessage, cfg=CONFIG, seen=(), counts=None, token_ok=True):
    counts = counts or {}
    return decide_inbound(cfg, message, known_outbound=known, already_received=lambda m: m in seen,
                          recent_count=lambda s, k: counts.get((s, k), 0),
                          verify_token=lambda t: VALID_TOKEN if token_ok else None)


@pytest.mark.parametrize("text, rcpts, expected", [
    # I2.1 bounce: the bounce address, mailer-daemon, a delivery report; Cc alone never
    ("From: x@remote.example\nTo: bounce@mycompany.com\n\nb", (), ["bounce"]),
    ("From: MAILER-DAEMON@remote.example\nTo: someone@mycompany.com\n\nb", (), ["bounce"]),
    ("From: postmaster@remote.example\nTo: sales@mycompany.com\n"
     "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b--", (), ["bounce"]),
    ("From: x@remote.example\nTo: sales@mycompany.com\nCc: bounce@mycompany.com\n\nb", (), ["alias:sales"]),
    ("From: x@remote.example\nTo: undisclosed-recipients:;\n\nb", ("bounce@mycompany.com",), ["bounce"]),
    # a malformed report type still shows a delivery report, as Odoo reads it
    ("From: relay@remote.example\nTo: sales@mycompany.com\n"
     "Content-Type: multipart/report: report-type=delivery-status; boundary=b\n\n--b--", (), ["bounce"]),
    # I2.2 reply to a message that went out through the gateway, even to the catchall
    ("From: c@customer.example\nTo: catchall@mycompany.com\n"
     "References: <other@x> <1700000000.1-openerp-42-crm.lead@mycompany.com>\n\nr", (),
     ["reply:<1700000000.1-openerp-42-crm.lead@mycompany.com>"]),
    ("From: c@customer.example\nTo: catchall@mycompany.com\nIn-Reply-To: <plain-sent-1@mycompany.com>\n\nr", (),
     ["reply:<plain-sent-1@mycompany.com>"]),
    # ... but a "to" alias of another target makes it new mail for that alias
    ("From: c@customer.example\nTo: support@mycompany.com\n"
     "References: <1700000000.1-openerp-42-crm.lead@mycompany.com>\n\nr", (), ["alias:support"]),
    ("From: c@customer.example\nTo: sales@mycompany.com\n"
     "References: <1700000000.1-openerp-42-crm.lead@mycompany.com>\n\nr", (),
     ["reply:<1700000000.1-openerp-42-crm.lead@mycompany.com>"]),
    # ... and only the aliases of other targets route it: a same-target alias beside them does not
    ("From: c@customer.example\nTo: sales@mycompany.com, support@mycompany.com\n"
     "In-Reply-To: <1700000000.1-openerp-42-crm.lead@mycompany.com>\n\nr", (), ["alias:support"]),
    ("From: c@customer.example\nTo: support@mycompany.com\nCc: sales@mycompany.com\n"
     "References: <1700000000.1-openerp-42-crm.lead@mycompany.com>\n\nr", (), ["alias:support"]),
    # an id folded over two lines by the sender's client still names the thread
    ("From: c@customer.example\nTo: nobody@mycompany.com\n"
     "References: <a1@x.example>\n <1700000000.1-openerp-42-\n crm.lead@mycompany.com>\n\nr", (),
     ["reply:<1700000000.1-openerp-42-crm.lead@mycompany.com>"]),
    # answers to a message posted with "reply to a new thread" (a `reply_to` id) are new mail
    ("From: c@customer.example\nTo: sales@mycompany.com\n"
     "In-Reply-To: <1700000200.3-openerp-reply_to@mycompany.com>\n\nr", (), ["alias:sales"]),
    # References naming a message we never sent is no reply
    ("From: c@customer.example\nTo: sales@mycompany.com\nReferences: <unknown@x>\n\nr", (), ["alias:sales"]),
    # I2.3 catchall direct write
    ("From: c@customer.example\nTo: catchall@mycompany.com\n\nhello", (), ["catchall"]),
    # I2.4 aliases: full address anywhere among the recipients, one route per alias
    ("From: c@customer.example\nTo: a@partner.example\nCc: sales@mycompany.com, support@mycompany.com\n\nx", (),
     ["alias:sales", "alias:support"]),
    ("From: c@customer.example\nTo: sales@mycompany.com\nResent-To: sales@mycompany.com\n\nx", (), ["alias:sales"]),
    # incoming_local: local part on an allowed domain only
    ("From: c@customer.example\nTo: jobs@othercompany.example\n\nx", (), ["alias:jobs"]),
    ("From: c@customer.example\nTo: someone@mycompany.com\nCc: commercial@gmail.com\n\nx", (), []),
    ("From: c@customer.example\nTo: someone@mycompany.com\nCc: sales@gmail.com\n\nx", (), []),
    # I2.6 catchall among other addresses
    ("From: c@customer.example\nTo: catchall@mycompany.com, nobody@mycompany.com\n\nx", (), ["catchall"]),
    # envelope recipients count as "to"
    ("From: c@customer.example\nTo: list@lists.example\n\nx", ("support@mycompany.com",), ["alias:support"]),
    # I2.7 no route
    ("From: c@customer.example\nTo: nobody@mycompany.com\n\nx", (), []),
])
def test_route_order(text, rcpts, expected):
    routes, _, _ = find_routes(CONFIG, msg(text, rcpts), known)
    assert [r.label for r in routes] == expected


def test_an_explicitly_empty_allowed_list_lets_incoming_local_aliases_match_on_any_domain():
    """docs/rules.md I2: `allowed_alias_domains` empty means no restriction, as Odoo's empty
    mail.catchall.domain.allowed; left out, it is the alias domains (the commercial@gmail.com
    guard). Full-address aliases never match on another domain either way."""
    cc_gmail = msg("From: c@customer.example\nTo: someone@mycompany.com\n"
                   "Cc: commercial@gmail.com, sales@gmail.com\n\nx")
    unrestricted = parse_config(CONFIG_TEXT.replace("allowed_alias_domains: [mycompany.com, othercompany.example]",
                                                    "allowed_alias_domains: []"), check_files=False).config
    left_out = parse_config(CONFIG_TEXT.replace("allowed_alias_domains: [mycompany.com, othercompany.example]\n", ""),
                            check_files=False).config
    assert [r.label for r in find_routes(unrestricted, cc_gmail, known)[0]] == ["alias:commercial"]
    assert find_routes(left_out, cc_gmail, known)[0] == []
    assert unrestricted.accepted_domain_set == left_out.accepted_domain_set == {"mycompany.com"}


def test_fallback_before_catchall_any():
    cfg = config("fallback_target: \"odoo:mail.channel\"\n")
    routes, _, _ = find_routes(cfg, msg("From: c@x.example\nTo: catchall@mycompany.com, n@mycompany.com\n\nx"), known)
    assert [r.label for r in routes] == ["fallback:odoo:mail.channel"]


def test_no_route_is_refused_550_511():
    decision = decide(msg("From: c@customer.example\nTo: nobody@mycompany.com\n\nx"))
    assert decision.action == "reject" and str(decision.reply).startswith("550 5.1.1 ")


@pytest.mark.parametrize("setting, action", [("pass", "deliver"), ("reject", "reject")])
def test_catchall_direct_write(setting, action):
    decision = decide(msg("From: c@customer.example\nTo: catchall@mycompany.com\n\nhello"),
                      cfg=config(f"catchall_direct_write: {setting}\n"))
    assert decision.action == action
    if action == "reject":
        assert str(decision.reply).startswith("550 5.1.1 ") and "only accepts replies" in str(decision.reply)


def test_forged_bounce_token_is_refused():
    message = msg("From: MAILER-DAEMON@remote.example\nTo: x@customer.example\n\nb", ("bounce+abcdef@mycompany.com",))
    decision = decide(message, token_ok=False)
    assert decision.action == "reject" and str(decision.reply).startswith("550 5.7.1 ")
    assert decide(message, token_ok=True).action == "deliver"


def test_duplicate_message_id_is_dropped():
    message = msg("From: c@customer.example\nTo: catchall@mycompany.com\nMessage-ID: <dup-1@customer.example>\n\nx")
    assert decide(message).action == "deliver"
    decision = decide(message, seen={"<dup-1@customer.example>"})
    assert decision.action == "drop" and any("duplicate" in r for r in decision.reasons)


@pytest.mark.parametrize("headers", [
    "References: <123-loop-detection-bounce-email@mycompany.com>\n",
    "In-Reply-To: <123-loop-detection-bounce-email@mycompany.com>\n",
    "References: <first@customer.example>\nIn-Reply-To: <123-loop-detection-bounce-email@mycompany.com>\n",
])
def test_reply_to_loop_notice_is_dropped(headers):
    message = msg(f"From: c@customer.example\nTo: sales@mycompany.com\n{headers}\nx")
    assert decide(message).action == "drop"


@pytest.mark.parametrize("headers, seen", [
    # X-Odoo-Message-Id naming a message already received, or one Odoo sent through us (its own
    # mail coming back, e.g. an alias among a notification's recipients)
    ("Message-ID: <fresh-9@relay.example>\nX-Odoo-Message-Id: <dup-7@customer.example>\n",
     ("<dup-7@customer.example>",)),
    ("Message-ID: <fresh-9@relay.example>\nX-Odoo-Message-Id: <plain-sent-1@mycompany.com>\n", ()),
])
def test_duplicates_include_what_odoo_already_holds(headers, seen):
    decision = decide(msg(f"From: staff@mycompany.com\nTo: sales@mycompany.com\n{headers}\nx"), seen=seen)
    assert decision.action == "drop"


SALES = "From: Robot <robot@spam.example>\nTo: sales@mycompany.com\n\nx"


@pytest.mark.parametrize("count, action", [(0, "deliver"), (19, "deliver"), (20, "reject"), (35, "reject")])
def test_loop_guard_threshold_on_alias_target(count, action):
    decision = decide(msg(SALES), counts={("robot@spam.example", "odoo:crm.lead"): count})
    assert decision.action == action
    if action == "reject":
        assert str(decision.reply).startswith("550 5.7.1 ")


@pytest.mark.parametrize("setting, action, reply", [("defer", "defer", "450 4.7.1 "), ("hold", "hold", None)])
def test_loop_actions(setting, action, reply):
    decision = decide(msg(SALES), cfg=config(f"loop: {{action: {setting}}}\n"),
                      counts={("robot@spam.example", "odoo:crm.lead"): 20})
    assert decision.action == action
    assert str(decision.reply or "").startswith(reply or "")


def test_loop_guard_counts_per_alias_target_not_per_address():
    """commercial and sales share a target: counts on one are counts on the other."""
    message = msg("From: robot@spam.example\nTo: commercial@mycompany.com\n\nx")
    decision = decide(message, counts={("robot@spam.example", "odoo:crm.lead"): 20})
    assert decision.action == "reject"


@pytest.mark.parametrize("thread", ["<1700000000.1-openerp-42-crm.lead@mycompany.com>",
                                    "<1700000100.2-openerp-42-crm.lead@mycompany.com>"])
def test_loop_guard_counts_replies_per_thread(thread):
    """Per record, as Odoo: answers to two different notifications of lead 42 count together."""
    message = msg(f"From: robot@spam.example\nTo: catchall@mycompany.com\nReferences: {thread}\n\nx")
    assert decide(message, counts={("robot@spam.example", "odoo:crm.lead/42"): 19}).action == "deliver"
    assert decide(message, counts={("robot@spam.example", "odoo:crm.lead/42"): 20}).action == "reject"


def test_loop_guard_counts_replies_to_other_messages_per_message_id():
    message = msg("From: robot@spam.example\nTo: catchall@mycompany.com\nReferences: <plain-sent-1@mycompany.com>\n\nx")
    assert decide(message, counts={("robot@spam.example", "<plain-sent-1@mycompany.com>"): 20}).action == "reject"


def test_loop_guard_one_looping_route_refuses_the_whole_message():
    """Odoo ignores the message when any one of its routes loops, even if the others do not."""
    message = msg("From: robot@spam.example\nTo: sales@mycompany.com, support@mycompany.com\n\nx")
    decision = decide(message, counts={("robot@spam.example", "odoo:crm.lead"): 25})
    assert decision.action == "reject" and str(decision.reply).startswith("550 5.7.1 ")
    assert decide(message, counts={("robot@spam.example", "odoo:crm.lead"): 19}).action == "deliver"


@pytest.mark.parametrize("extra, text", [
    ("loop: {allowed_senders: [robot@spam.example]}\n", SALES),
    ("", "To: sales@mycompany.com\n\nno From at all"),
])
def test_loop_guard_exemptions(extra, text):
    counts = {("robot@spam.example", "odoo:crm.lead"): 100, (None, "odoo:crm.lead"): 100}
    assert decide(msg(text), cfg=config(extra), counts=counts).action == "deliver"


def test_thread_target_from_odoo_message_id():
    assert thread_target("<1700000000.1-openerp-42-crm.lead@mycompany.com>") == "odoo:crm.lead"
    assert thread_target("<CAF=abc@mail.gmail.com>") is None
