"""Several alias domains (docs/rules.md O1, I2, I6): each company's domain with its own bounce,
catchall and default sender; the message's domain found from the envelope, the author, or the
first; every domain's addresses known inbound; and the file's clear errors."""

from __future__ import annotations

import email

import pytest

from mailgate.commands.postfixconf import main_settings
from mailgate.configfile import ConfigError, parse_config
from mailgate.odoo.deliver import odoo_model_for
from mailgate.rules.classify import (
    bounce_token_of,
    is_catchall,
    is_plain_bounce,
    recipient_verdict,
    report_bounce_alias,
)
from mailgate.rules.delivery import delivery_transport
from mailgate.rules.inbound import decide_inbound
from mailgate.rules.message import InboundMessage
from mailgate.rules.outbound import OutboundRequest, decide_outbound, message_domain, tokenised_address
from mailgate.rules.routing import route_for_sender
from mailgate.rules.tokens import BounceToken, TokenSigner

# mycompany.com with Odoo's defaults, brand.example with its own addresses (also the e2e lab's)
ALIAS_DOMAINS = """\
alias_domains:
  - name: mycompany.com
  - name: brand.example
    bounce_alias: rebonds
    catchall_alias: contact
    default_from: hello@brand.example
"""
TWO_DOMAINS = ALIAS_DOMAINS + """\
servers:
  - {name: main, host: smtp.mycompany.com, from_filter: mycompany.com, priority: 1}
  - {name: brand, host: smtp.brand.example, from_filter: brand.example, priority: 2}
aliases:
  sales: {target: "odoo:crm.lead", domain: brand.example}
  support: {target: "odoo:helpdesk.ticket"}
"""
CONFIG = parse_config(TWO_DOMAINS, check_files=False).config
MAIN, BRAND = CONFIG.alias_domains


def problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "<test>", check_files=False)
    return [(p.line, p.key, p.message) for p in raised.value.problems if p.severity == "error"]


# ---- the configuration --------------------------------------------------------------------

def test_entries_keep_the_file_order_and_odoos_defaults():
    assert [d.name for d in CONFIG.alias_domains] == ["mycompany.com", "brand.example"]
    assert (MAIN.bounce_address, MAIN.catchall_address, MAIN.notification_address) == (
        "bounce@mycompany.com", "catchall@mycompany.com", "notifications@mycompany.com")
    assert (BRAND.bounce_address, BRAND.catchall_address, BRAND.notification_address) == (
        "rebonds@brand.example", "contact@brand.example", "hello@brand.example")
    aliases = {a.name: a.domain for a in CONFIG.aliases}
    assert aliases == {"sales": "brand.example", "support": "mycompany.com"}  # no domain: the first


def test_a_plain_name_is_an_entry_with_the_defaults():
    config = parse_config("alias_domains: [a.example, B.Example]", check_files=False).config
    assert [(d.name, d.bounce_alias, d.catchall_alias, d.default_from) for d in config.alias_domains] == [
        ("a.example", "bounce", "catchall", "notifications"), ("b.example", "bounce", "catchall", "notifications")]


def test_the_one_domain_keys_are_one_entry():
    config = parse_config("alias_domain: mycompany.com\nbounce_alias: bounces\ncatchall_alias: replies\n"
                          "default_from: noreply", check_files=False).config
    (only,) = config.alias_domains
    assert (only.name, only.bounce_alias, only.catchall_alias, only.notification_address) == (
        "mycompany.com", "bounces", "replies", "noreply@mycompany.com")


def test_the_shorthand_keeps_an_alias_on_its_own_domain_as_before():
    """Files of the one-domain form could always give an alias its own domain: that domain's
    catchall and bounce were Odoo's, with the same aliases, and its mail used the main
    notification address. It loads to exactly that."""
    config = parse_config("alias_domain: mycompany.com\naliases:\n  jobs: {target: odoo, domain: jobs.example}",
                          check_files=False).config
    main, jobs = config.alias_domains
    assert (jobs.name, jobs.bounce_address, jobs.notification_address) == (
        "jobs.example", "bounce@jobs.example", "notifications@mycompany.com")


@pytest.mark.parametrize("text, key, words", [
    ("alias_domains:\n  - name: a.example\n  - name: A.example\n", "alias_domains[1].name", "duplicate alias domain"),
    ("alias_domains: [a.example]\naliases:\n  sales: {target: odoo, domain: b.example}\n",
     "aliases.sales.domain", "not one of the alias_domains"),
    ("alias_domain: a.example\nalias_domains: [b.example]\n", "alias_domain", "alias_domains is set"),
    ("alias_domains: [b.example]\ndefault_from: hello\n", "default_from", "alias_domains is set"),
    ("alias_domains:\n  - {name: a.example, bounce_alias: mail, catchall_alias: mail}\n", "alias_domains",
     "both mail@a.example"),
    ("alias_domains: [a.example]\naliases:\n  catchall: {target: odoo}\n", "aliases.catchall",
     "catchall address of a.example"),
    ("alias_domains:\n  - {bounce_alias: b}\n", "alias_domains[0].name", "missing"),
    ("alias_domains:\n  - {name: a.example, bounce: b}\n", "alias_domains[0].bounce", "bounce_alias"),
    ("alias_domains: mycompany.com\n", "alias_domains", "expected a list"),
])
def test_clear_errors(text, key, words):
    found = problems(text)
    assert any(k == key and words in m for _, k, m in found), found


# ---- outbound: the message's domain (O1) ----------------------------------------------------

@pytest.mark.parametrize("envelope, author, expected, why", [
    ("rebonds@brand.example", "someone@gmail.example", "brand.example", "envelope"),
    ("bounce@mycompany.com", "boss@brand.example", "mycompany.com", "envelope"),
    (None, "Boss@Brand.Example", "brand.example", "author"),
    ("someone@gmail.example", "someone@gmail.example", "mycompany.com", "first"),
    (None, None, "mycompany.com", "first"),
])
def test_the_three_ways_to_find_the_domain(envelope, author, expected, why):
    domain, reason = message_domain(CONFIG, envelope, author)
    assert (domain.name if domain else None, reason) == (expected, why)


def test_no_alias_domain_is_none():
    assert message_domain(parse_config("servers: []", check_files=False).config, "a@b.example", None) == (None, "none")


@pytest.mark.parametrize("envelope, server, new_from, bounce", [
    ("rebonds@brand.example", "brand", '"Jane" <hello@brand.example>', "rebonds@brand.example"),
    ("bounce@mycompany.com", "main", '"Jane" <notifications@mycompany.com>', "bounce@mycompany.com"),
])
def test_a_foreign_author_is_encapsulated_into_its_domains_default_sender(envelope, server, new_from, bounce):
    decision = decide_outbound(CONFIG, OutboundRequest('"Jane" <jane@gmail.example>', envelope))
    assert decision.server_name == server and decision.step == "notification-domain"
    assert decision.header_from == new_from
    assert (decision.envelope_from, decision.envelope_is_bounce) == (bounce, True)
    assert decision.alias_domain is not None and decision.domain_reason == "envelope"
    assert any(r.startswith(f"alias domain {decision.alias_domain.name}: ") for r in decision.reasons)


def test_an_author_on_a_domain_keeps_their_from_and_gets_that_domains_bounce_address():
    decision = decide_outbound(CONFIG, OutboundRequest("Boss <boss@brand.example>", None))
    assert (decision.server_name, decision.rewritten, decision.bounce_address) == ("brand", False,
                                                                                   "rebonds@brand.example")


def test_the_tokenised_address_uses_the_domains_own_bounce_alias():
    assert tokenised_address(CONFIG, "rebonds@brand.example", "TOKEN") == "rebonds+TOKEN@brand.example"
    assert tokenised_address(CONFIG, "bounce@mycompany.com", "TOKEN") == "bounce+TOKEN@mycompany.com"


def test_the_transport_lookup_reads_a_token_on_each_domain():
    signer = TokenSigner(b"k" * 32)
    token = signer.make(7, "brand", 0.0)
    assert route_for_sender(CONFIG, signer, f"rebonds+{token}@brand.example").reason == "token"
    assert route_for_sender(CONFIG, signer, f"rebonds+{token}@brand.example").server.name == "brand"
    # the other domain's bounce alias is not a bounce address on this one: the rule decides
    assert route_for_sender(CONFIG, signer, f"bounce+{token}@brand.example").reason == "rule"


# ---- inbound: every domain's addresses (I2, I6) ---------------------------------------------

def test_each_domains_bounce_and_catchall_are_its_own():
    assert is_plain_bounce(CONFIG, "rebonds@brand.example") and is_plain_bounce(CONFIG, "Bounce@MyCompany.com")
    assert not is_plain_bounce(CONFIG, "bounce@brand.example")
    assert is_catchall(CONFIG, "contact@brand.example") and is_catchall(CONFIG, "catchall@mycompany.com")
    assert not is_catchall(CONFIG, "catchall@brand.example")
    assert bounce_token_of(CONFIG, "rebonds+ABC@brand.example") == "ABC"
    assert bounce_token_of(CONFIG, "bounce+ABC@brand.example") is None
    assert report_bounce_alias(CONFIG, ["rebonds+ABC@brand.example"]) == "rebonds"
    assert report_bounce_alias(CONFIG, ["bounce+ABC@mycompany.com"]) == "bounce"


@pytest.mark.parametrize("address, verdict", [
    ("contact@brand.example", "accept"), ("rebonds@brand.example", "accept"), ("sales@brand.example", "accept"),
    ("catchall@mycompany.com", "accept"), ("support@mycompany.com", "accept"),
    ("sales@mycompany.com", "no_such_alias"), ("support@brand.example", "no_such_alias"),
    ("catchall@brand.example", "no_such_alias"), ("nobody@brand.example", "no_such_alias"),
    ("rebonds+FORGED@brand.example", "forged_bounce"), ("someone@elsewhere.example", "outside"),
])
def test_the_policy_verdict_on_every_domain(address, verdict):
    assert recipient_verdict(CONFIG, address, lambda token: False) == verdict


@pytest.mark.parametrize("address, transport", [
    ("rebonds+ABC@brand.example", "mailgate-odoo:rebonds"), ("contact@brand.example", "mailgate-odoo:contact"),
    ("bounce@mycompany.com", "mailgate-odoo:bounce"), ("sales@brand.example", "mailgate-odoo:sales"),
])
def test_every_domains_addresses_go_to_odoo(address, transport):
    assert delivery_transport(CONFIG, address) == transport
    assert odoo_model_for(CONFIG, transport.partition(":")[2]) in (None, "crm.lead")


def test_a_report_to_each_domains_bounce_address_takes_the_bounce_route():
    for bounce in ("rebonds+ABC@brand.example", "bounce+ABC@mycompany.com"):
        message = InboundMessage(tuple(email.message_from_string(
            f"From: MAILER-DAEMON@remote.example\nTo: {bounce}\n\nreport").items()), (bounce,))
        decision = decide_inbound(CONFIG, message, known_outbound=lambda ids: None,
                                  already_received=lambda m: False, recent_count=lambda s, k: 0,
                                  verify_token=lambda t: BounceToken(1, 0, 0))
        assert decision.labels == ["bounce"] and decision.bounce_token == BounceToken(1, 0, 0)


SAME_NAME = """
alias_domains: [mycompany.com, brand.example]
aliases:
  sales: {target: "odoo:crm.lead"}
  sales@brand.example: {target: "odoo:helpdesk.ticket"}
  jobs: {target: "odoo:hr.applicant", domain: brand.example}
"""


def test_two_domains_may_each_have_an_alias_of_the_same_name():
    """A `name@domain` key gives an alias its domain: `sales@` of each company reaches its own
    model, Postfix handing a shared name to Odoo by its full address."""
    config = parse_config(SAME_NAME, check_files=False).config
    assert [(a.name, a.domain) for a in config.aliases] == [
        ("sales", "mycompany.com"), ("sales", "brand.example"), ("jobs", "brand.example")]
    assert delivery_transport(config, "sales@brand.example") == "mailgate-odoo:sales@brand.example"
    assert delivery_transport(config, "Sales@MyCompany.com") == "mailgate-odoo:sales@mycompany.com"
    assert delivery_transport(config, "jobs@brand.example") == "mailgate-odoo:jobs"
    assert odoo_model_for(config, "sales@brand.example") == "helpdesk.ticket"
    assert odoo_model_for(config, "sales@mycompany.com") == "crm.lead"
    assert recipient_verdict(config, "jobs@mycompany.com", lambda t: False) == "no_such_alias"


@pytest.mark.parametrize("text, key, words", [
    ("alias_domains: [a.example]\naliases:\n  sales: odoo\n  sales@a.example: odoo\n", "aliases.sales@a.example",
     "already an alias"),
    ("alias_domains: [a.example, b.example]\naliases:\n  sales@a.example: {target: odoo, domain: b.example}\n",
     "aliases.sales@a.example.domain", "the key says a.example"),
    ("alias_domains: [a.example]\naliases:\n  sales@not_a_domain: odoo\n", "aliases.sales@not_a_domain",
     "expected a domain name"),
])
def test_alias_key_errors(text, key, words):
    found = problems(text)
    assert any(k == key and words in m for _, k, m in found), found


def test_postfix_relays_every_alias_domain():
    settings = dict(main_settings(CONFIG))
    assert settings["relay_domains"].split() == ["mycompany.com", "brand.example"]
    assert "transport_maps" in settings and "smtpd_recipient_restrictions" in settings


def test_a_non_ascii_alias_domain_is_known_in_both_spellings():
    """MAIL FROM carries the ASCII (punycode) form of the domain, so reports come back to it;
    headers may carry either."""
    config = parse_config("alias_domains: [bücher.example]\naliases:\n  sales: odoo", check_files=False).config
    for domain in ("bücher.example", "xn--bcher-kva.example", "XN--BCHER-KVA.example"):
        assert is_plain_bounce(config, f"bounce@{domain}") and is_catchall(config, f"catchall@{domain}")
        assert bounce_token_of(config, f"bounce+ABC@{domain}") == "ABC"
        assert recipient_verdict(config, f"sales@{domain}", lambda t: False) == "accept"
        assert recipient_verdict(config, f"nobody@{domain}", lambda t: False) == "no_such_alias"
    signer = TokenSigner(b"k" * 32)
    token = signer.make(7, None, 0.0)
    assert route_for_sender(config, signer, f"bounce+{token}@xn--bcher-kva.example").reason == "token-default"
