"""docs/rules.md O1-O7 as tables: every rule and example is a test, without sockets."""

from __future__ import annotations

import textwrap

import pytest

from mailgate.configfile import parse_config
from mailgate.rules.addresses import parse_mailboxes, to_wire
from mailgate.rules.filters import FromFilter
from mailgate.rules.outbound import OutboundRequest, bounce_address, decide_outbound, is_mass_mail, notification_address
from mailgate.rules.replies import SMTP
from mailgate.rules.routing import route_for_sender
from mailgate.rules.tokens import TokenSigner

SIGNER = TokenSigner(b"0123456789abcdef0123456789abcdef")


def cfg(text: str = "", **top: object):
    """A configuration from YAML text plus top-level overrides (no file checks)."""
    lines = [f"{k}: {v if v is not None else 'null'}" for k, v in top.items()]
    return parse_config(textwrap.dedent(text) + "\n" + "\n".join(lines), "<test>", check_files=False).config


def servers(*specs: tuple[str, str | None, int] | tuple[str, str | None, int, bool]) -> str:
    """YAML for servers given as (name, from_filter, priority[, active])."""
    out = ["servers:"]
    for spec in specs:
        name, flt, prio = spec[:3]
        active = spec[3] if len(spec) > 3 else True
        out += [f"  - name: {name}", f"    host: {name}.example.net",
                f"    from_filter: {flt!r}" if flt is not None else "    from_filter: null",
                f"    priority: {prio}", f"    active: {str(active).lower()}"]
    return "\n".join(out) + "\n"


def decide(config, header_from, sender=None, mass=False):
    return decide_outbound(config, OutboundRequest(header_from, sender, mass))


# ---- O1 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("default_from, alias_domain, expected", [
    ("notifications", "mycompany.com", "notifications@mycompany.com"),
    ("noreply@other.example", "mycompany.com", "noreply@other.example"),
    ("noreply@other.example", None, "noreply@other.example"),
    ("notifications", None, None),
    (None, "mycompany.com", None),
])
def test_o1_notification_address(default_from, alias_domain, expected):
    config = cfg(default_from=default_from, alias_domain=alias_domain)
    assert notification_address(config, config.domain_named(alias_domain)) == expected


@pytest.mark.parametrize("top, sender, expected", [
    ({"alias_domain": "mycompany.com"}, None, "bounce@mycompany.com"),
    ({"alias_domain": "mycompany.com", "bounce_alias": "bounces"}, "", "bounces@mycompany.com"),
    ({"alias_domain": None}, None, None),
    ({"alias_domain": "mycompany.com"}, "bounce+37-mail.mail-9@mycompany.com", "bounce+37-mail.mail-9@mycompany.com"),
    ({"alias_domain": "mycompany.com"}, "Bounce@MyCompany.com", "Bounce@MyCompany.com"),
    ({"alias_domain": "mycompany.com"}, "someone@elsewhere.example", "bounce@mycompany.com"),
])
def test_o1_bounce_address(top, sender, expected):
    config = cfg(**top)
    assert bounce_address(config, sender, config.domain_named(config.alias_domain)) == expected


def test_o1_no_notification_address_means_no_rewrite():
    config = cfg(servers(("s", "mycompany.com", 1)), default_from="notifications", alias_domain=None)
    decision = decide(config, '"Admin" <admin@example.com>')
    assert not decision.rewritten and decision.header_from == '"Admin" <admin@example.com>'
    assert decision.server_name == "s"


# ---- O2 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, address, expected", [
    ("mycompany.com", "john@mycompany.com", True),
    ("mycompany.com", "John@MyCompany.COM", True),
    ("MyCompany.com", "john@mycompany.com", True),
    ("mycompany.com", "john@sub.mycompany.com", False),
    ("sub.mycompany.com", "john@mycompany.com", False),
    ("mail.example.com", "a@mail.éxample.com", False),
    ("mail.éxample.com", "a@mail.example.com", False),
    ("john@mycompany.com", "john@mycompany.com", True),
    ("john@mycompany.com", "jane@mycompany.com", False),
    ("john@mycompany.com, other.example", "x@other.example", True),
    (" john@mycompany.com ,other.example ,", "john@mycompany.com", True),
    ("a.example,b.example", "x@c.example", False),
    ("", "anyone@anywhere.example", True),
    (None, "anyone@anywhere.example", True),
    (" , ,", "anyone@anywhere.example", True),
    ("   ", "anyone@anywhere.example", True),
])
def test_o2_from_filter(raw, address, expected):
    assert FromFilter.parse(raw).matches(address) is expected


def test_o2_only_the_address_counts_not_the_display_name():
    config = cfg(servers(("x", "x.com", 1), ("y", "y.com", 2)), alias_domain="mycompany.com")
    decision = decide(config, '"a@x.com" <b@y.com>')
    assert decision.server_name == "y" and not decision.rewritten


# ---- O3 -------------------------------------------------------------------------------------

BASE = {"alias_domain": "mycompany.com", "default_from": "notifications"}


@pytest.mark.parametrize("server_specs, header_from, server, rewritten, step", [
    # 1. address before domain, whatever the priorities
    ((("dom", "x.com", 1), ("addr", "a@x.com", 2)), "a@x.com", "addr", False, "from-address"),
    ((("dom", "x.com", 1), ("addr", "a@x.com", 2)), "b@x.com", "dom", False, "from-domain"),
    # within a step the first candidate (priority, then file order) wins
    ((("late", "x.com", 5), ("early", "x.com", 1)), "a@x.com", "early", False, "from-domain"),
    ((("first", "x.com", 1), ("second", "x.com", 1)), "a@x.com", "first", False, "from-domain"),
    # 2. the notification address, then its domain
    ((("other", "x.com", 1), ("notif", "notifications@mycompany.com", 2)), "a@y.com", "notif", True,
     "notification-address"),
    ((("other", "x.com", 1), ("comp", "mycompany.com", 2)), "a@y.com", "comp", True, "notification-domain"),
    # 3. the first unfiltered server
    ((("other", "x.com", 1), ("open", None, 2), ("open2", None, 3)), "a@y.com", "open", True, "no-filter"),
    # 4. the first server of all
    ((("x", "x.com", 3), ("z", "z.com", 2)), "a@y.com", "z", True, "fallback-first"),
    # inactive servers are never used
    ((("gone", "y.com", 1, False), ("open", None, 2)), "a@y.com", "open", True, "no-filter"),
])
def test_o3_server_choice(server_specs, header_from, server, rewritten, step):
    decision = decide(cfg(servers(*server_specs), **BASE), header_from)
    assert (decision.server_name, decision.rewritten, decision.step) == (server, rewritten, step)


def test_o3_fallback_first_logs_a_warning():
    decision = decide(cfg(servers(("x", "x.com", 1)), **BASE), "a@y.com")
    assert decision.warning and "x" in decision.warning


def test_o3_single_unfiltered_server_rewrites_even_the_company_domain():
    config = cfg(servers(("open", None, 1)), **BASE)
    assert decide(config, "jane@mycompany.com").header_from == '"jane" <notifications@mycompany.com>'
    kept = decide(config, "Notifications@MyCompany.com")
    assert not kept.rewritten and kept.header_from == "Notifications@MyCompany.com"


@pytest.mark.parametrize("header_from", ["a@x.com, b@x.com", "undisclosed-recipients:;", ""])
def test_o3_step1_skipped_without_exactly_one_address(header_from):
    config = cfg(servers(("x", "x.com", 1), ("open", None, 2)), **BASE)
    assert decide(config, header_from).server_name == "open"


def test_o3_no_filter_without_notification_keeps_from():
    config = cfg(servers(("open", None, 1)), alias_domain=None, default_from="notifications")
    decision = decide(config, "a@y.com")
    assert decision.server_name == "open" and not decision.rewritten


@pytest.mark.parametrize("default_filter, header_from, expected_from", [
    (None, '"A" <a@y.com>', '"A" <a@y.com>'),
    ("y.com", '"A" <a@y.com>', '"A" <a@y.com>'),
    ("mycompany.com", '"A" <a@y.com>', '"A" <notifications@mycompany.com>'),
])
def test_o3_step5_no_servers(default_filter, header_from, expected_from):
    config = cfg(default_from_filter=default_filter, **BASE)
    decision = decide(config, header_from)
    assert decision.server is None and decision.step == "no-servers"
    assert decision.header_from == expected_from


def test_o3_step5_without_notification_keeps_from():
    config = cfg(default_from_filter="mycompany.com", alias_domain=None)
    assert decide(config, "a@y.com").header_from == "a@y.com"


def test_o3_documented_swaps_steps_2_and_3():
    specs = servers(("open", None, 1), ("comp", "mycompany.com", 2))
    assert decide(cfg(specs, **BASE), "a@y.com").server_name == "comp"
    assert decide(cfg(specs, server_selection="documented", **BASE), "a@y.com").server_name == "open"


# ---- O4 -------------------------------------------------------------------------------------

MASS = servers(("trans", "mycompany.com", 1), ("mass", None, 2)) + "mass_mail: {server: mass}\n"


def test_o4_mass_mail_goes_to_mass_server_without_rewriting():
    decision = decide(cfg(MASS, **BASE), '"Shop" <news@brand.example>', mass=True)
    assert decision.server_name == "mass" and not decision.rewritten and decision.step == "mass"
    assert decision.envelope_from == "bounce@mycompany.com"


def test_o4_mass_envelope_follows_the_mass_servers_filter():
    config = cfg(servers(("trans", "mycompany.com", 1), ("mass", "news@brand.example", 2))
                 + "mass_mail: {server: mass}\n", **BASE)
    decision = decide(config, "News <News@brand.example>", mass=True)
    assert decision.envelope_from == "News@brand.example" and not decision.envelope_is_bounce


def test_o4_without_mass_server_mass_follows_o3():
    config = cfg(servers(("trans", "mycompany.com", 1)), **BASE)
    decision = decide(config, "a@y.com", mass=True)
    assert decision.server_name == "trans" and decision.rewritten


def test_o4_inactive_mass_server_is_no_mass_server():
    config = cfg(servers(("trans", "mycompany.com", 1), ("mass", None, 2, False))
                 + "mass_mail: {server: mass}\n", **BASE)
    assert decide(config, "a@mycompany.com", mass=True).server_name == "trans"


@pytest.mark.parametrize("listener, sasl, headers, expected", [
    ("mass", None, [], True),
    ("ORIGINATING", None, [], False),
    (None, "newsletter", [], True),
    (None, None, [("Precedence", "Bulk")], True),
    (None, None, [("Precedence", "list")], False),
    (None, None, [("X-Mailgate-Stream", "mass")], True),
    (None, None, [("X-Mailgate-Stream", "transactional")], False),
    (None, None, [("List-Unsubscribe", "<mailto:x@y>")], True),
])
def test_o4_mass_signs(listener, sasl, headers, expected):
    config = cfg(MASS.replace("mass_mail: {server: mass}", "mass_mail: {server: mass, listeners: [mass], "
                              "sasl_users: [newsletter], headers: ['Precedence: bulk', List-Unsubscribe]}"),
                 **BASE)
    assert is_mass_mail(config, listener, sasl, headers) is expected


# ---- O5 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("original, expected", [
    ('"Admin" <admin@example.com>', '"Admin" <notifications@mycompany.com>'),
    ("customer@other.example.com", '"customer" <notifications@mycompany.com>'),
    ('"Doe, John" <john@gmail.com>', '"Doe, John" <notifications@mycompany.com>'),
    ('"fake@mycompany.com" <admin@other.example.com>', '"fake@mycompany.com" <notifications@mycompany.com>'),
    ('Plain Name <p@other.example>', '"Plain Name" <notifications@mycompany.com>'),
    (r'"Say \"hi\" \\ bye" <q@other.example>', r'"Say \"hi\" \\ bye" <notifications@mycompany.com>'),
    ("=?utf-8?q?Ren=C3=A9?= <rene@other.example>", "=?utf-8?b?UmVuw6k=?= <notifications@mycompany.com>"),
    ('"Élodie" <e@other.example>', "=?utf-8?b?w4lsb2RpZQ==?= <notifications@mycompany.com>"),
])
def test_o5_encapsulation(original, expected):
    config = cfg(servers(("comp", "mycompany.com", 1)), **BASE)
    decision = decide(config, original)
    assert decision.rewritten and decision.header_from == expected
    reparsed = parse_mailboxes(decision.header_from)
    assert reparsed[0].address == "notifications@mycompany.com"
    assert reparsed[0].name == (parse_mailboxes(original)[0].name or parse_mailboxes(original)[0].local_part)


def test_o5_unparsable_from_without_an_address_is_replaced():
    config = cfg(servers(("comp", "mycompany.com", 1)), **BASE)
    decision = decide(config, "not an address at all")
    assert decision.rewritten and decision.header_from == "notifications@mycompany.com"
    assert decision.malformed == "the From cannot be parsed" and decision.reply is None


# Shapes no parser reads as mailboxes, each holding a foreign address (issue 15, item 3).
MALFORMED_FROMS = {
    "unquoted comma in the name": ("Doe, John <john@example.com>", "john"),
    "garbage after the address": ("<admin@example.com>, garbage", "admin"),
    "unclosed comment": ("Name (unclosed <a@example.com>", "a"),
    "doubled angle bracket": ("<<a@example.com>", "a"),
    "encoded word that decodes to an address and CRLF": ("=?utf-8?q?evil@example.com=0D=0A?=", "evil"),
}


@pytest.mark.parametrize("original, name", list(MALFORMED_FROMS.values()), ids=list(MALFORMED_FROMS))
def test_o5_malformed_from_holding_a_foreign_address_is_replaced(original, name):
    config = cfg(servers(("comp", "mycompany.com", 1)), **BASE)
    decision = decide(config, original)
    assert decision.rewritten and decision.header_from == f'"{name}" <notifications@mycompany.com>'
    assert any("example.com" in reason and "may not send" in reason for reason in decision.reasons)


@pytest.mark.parametrize("original", [v for v, _ in MALFORMED_FROMS.values()], ids=list(MALFORMED_FROMS))
def test_o5_malformed_from_is_refused_with_malformed_from_reject(original):
    config = cfg(servers(("comp", "mycompany.com", 1)), malformed_from="reject", **BASE)
    decision = decide(config, original)
    assert decision.reply == SMTP["malformed_from"] and not decision.rewritten
    assert str(decision.reply).startswith("554 5.6.0 ")


def test_o5_malformed_from_the_server_may_send_for_is_rewritten_not_refused():
    """`reject` refuses only what holds an address the server may not send for; O3 still
    sends such a From as the notification address (step 1 needs one well-formed From)."""
    config = cfg(servers(("comp", "mycompany.com", 1)), malformed_from="reject", **BASE)
    decision = decide(config, "Doe, Jane <jane@mycompany.com>")
    assert decision.reply is None and decision.header_from == '"jane" <notifications@mycompany.com>'


def test_o5_malformed_foreign_from_without_notification_address_is_refused():
    config = cfg(servers(("comp", "mycompany.com", 1)), alias_domain="mycompany.com", default_from=None)
    assert decide(config, "Doe, John <john@example.com>").reply == SMTP["malformed_from"]
    assert decide(config, '"John" <john@example.com>').reply is None  # well formed: kept, as Odoo does


def test_o5_malformed_from_on_the_mass_server_is_replaced_when_outside_its_filter():
    config = cfg(servers(("mass", "brand.example", 1)), mass_mail="{server: mass}", **BASE)
    assert decide(config, "Shop, The <news@brand.example>", mass=True).header_from == \
        "Shop, The <news@brand.example>"
    assert decide(config, "Shop, The <news@other.example>", mass=True).header_from == \
        '"news" <notifications@mycompany.com>'


@pytest.mark.parametrize("first, second", [
    ('"Admin" <admin@example.com>', "evil@attacker.example"),
    ('"Jane" <jane@mycompany.com>', "evil@attacker.example"),
    ('"Jane" <jane@mycompany.com>', "Doe, John <john@example.com>"),
])
def test_o5_several_from_headers_leave_as_one_rewritten_from(first, second):
    """Issue 15 item 2: every From header counts; the first is rewritten, the others deleted."""
    config = cfg(servers(("comp", "mycompany.com", 1)), **BASE)
    decision = decide_outbound(config, OutboundRequest(first, None, False, (second,)))
    name = parse_mailboxes(first)[0].name
    assert decision.rewritten and decision.header_from == f'"{name}" <notifications@mycompany.com>'
    assert decision.removed_froms == 1 and decision.malformed == "several From headers"


def test_o5_several_from_headers_the_server_may_send_for_still_leave_as_one():
    config = cfg(servers(("mass", "mycompany.com", 1)), mass_mail="{server: mass}", **BASE)
    decision = decide_outbound(config, OutboundRequest("a@mycompany.com", None, True, ("b@mycompany.com",)))
    assert not decision.rewritten and decision.header_from == "a@mycompany.com" and decision.removed_froms == 1


@pytest.mark.parametrize("header_from", [None, "", "undisclosed:;"])
def test_o5_a_from_without_an_address_becomes_the_notification_address(header_from):
    config = cfg(servers(("comp", "mycompany.com", 1)), **BASE)
    decision = decide(config, header_from)
    assert decision.rewritten and decision.header_from == "notifications@mycompany.com"


@pytest.mark.parametrize("original, name", [
    ("admin@example.com (Admin Person)", "Admin Person"),
    ("(Admin Person) admin@example.com", "Admin Person"),
    ("admin@example.com (=?utf-8?q?Ren=C3=A9_Person?=)", "René Person"),
    ('"Quoted" <admin@example.com> (a comment)', "Quoted"),
])
def test_o5_a_comment_is_the_display_name(original, name):
    """Issue 15 item 8: Odoo's getaddresses reads `a@b (Admin Person)` as "Admin Person"."""
    config = cfg(servers(("comp", "mycompany.com", 1)), **BASE)
    decision = decide(config, original)
    assert decision.rewritten and parse_mailboxes(decision.header_from)[0].name == name


def test_o5_long_non_ascii_name_is_split_into_valid_encoded_words():
    config = cfg(servers(("comp", "mycompany.com", 1)), **BASE)
    name = "Ünïcödé " * 30
    decision = decide(config, f'"{name}" <u@other.example>')
    assert all(len(word) <= 75 for word in decision.header_from.split(" ") if word.startswith("=?"))
    assert parse_mailboxes(decision.header_from)[0].name == name.strip()


# ---- O6 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("specs, header_from, sender, envelope, is_bounce", [
    ((("comp", "mycompany.com", 1),), "a@y.com", None, "bounce@mycompany.com", True),
    ((("open", None, 1),), "a@y.com", None, "bounce@mycompany.com", True),
    ((("brand", "noreply@brand.example", 1),), "NoReply@Brand.example", None, "NoReply@Brand.example", False),
    ((("brand", "brand.example", 1),), '"B" <Sales@Brand.example>', None, "Sales@Brand.example", False),
    ((("comp", "mycompany.com", 1),), "a@y.com", "bounce+12-mail.mail-3@mycompany.com",
     "bounce+12-mail.mail-3@mycompany.com", True),
    ((("brand", "brand.example", 1),), "x@brand.example", "bounce+1@mycompany.com", "x@brand.example", False),
])
def test_o6_envelope_sender(specs, header_from, sender, envelope, is_bounce):
    decision = decide(cfg(servers(*specs), **BASE), header_from, sender)
    assert (decision.envelope_from, decision.envelope_is_bounce) == (envelope, is_bounce)


def test_o6_envelope_is_the_rewritten_from_when_bounce_is_outside_the_filter():
    config = cfg(servers(("notif", "notifications@mycompany.com", 1)), **BASE)
    decision = decide(config, '"A" <a@y.com>')
    assert decision.rewritten and decision.envelope_from == "notifications@mycompany.com"


def test_o6_without_alias_domain_the_original_from_is_the_bounce():
    config = cfg(servers(("open", None, 1)), alias_domain=None)
    assert decide(config, "Ann <Ann@y.com>").envelope_from == "Ann@y.com"


def test_o6_idna_on_the_wire():
    assert to_wire("test@ééé.com") == "test@xn--9caaa.com"
    assert to_wire("plain@example.com") == "plain@example.com"


# ---- O7 -------------------------------------------------------------------------------------

ROUTED = servers(("trans", "mycompany.com", 1), ("brand", "brand.example", 2), ("mass", None, 3)) + \
    "mass_mail: {server: mass}\n"


def test_o7_token_names_the_server():
    config = cfg(ROUTED, **BASE)
    token = SIGNER.make(42, "mass", 1_800_000_000)
    route = route_for_sender(config, SIGNER, f"bounce+{token}@mycompany.com")
    assert (route.server.name, route.reason) == ("mass", "token")


@pytest.mark.parametrize("sender, server, reason", [
    ("", None, "null-sender"),
    ("<>", None, "null-sender"),
    ("@mycompany.com", None, "domain-key"),
    ("x@brand.example", "brand", "rule"),
    ("notifications@mycompany.com", "trans", "rule"),
    ("bounce+forgedtoken@mycompany.com", "trans", "rule"),
    ("someone@else.example", "trans", "rule"),
])
def test_o7_without_token(sender, server, reason):
    route = route_for_sender(cfg(ROUTED, **BASE), SIGNER, sender)
    assert (route.server.name if route.server else None, route.reason) == (server, reason)


def test_o7_same_server_as_the_milter_chose():
    """The envelope the rule produces routes back to the server the rule chose."""
    config = cfg(ROUTED, **BASE)
    for header_from in ["a@brand.example", '"X" <x@y.com>', "n@mycompany.com"]:
        decision = decide(config, header_from)
        if not decision.envelope_is_bounce:
            route = route_for_sender(config, SIGNER, decision.envelope_from)
            assert route.server.name == decision.server_name


def test_o7_no_servers_is_postfix_default_route():
    route = route_for_sender(cfg(**BASE), SIGNER, "a@mycompany.com")
    assert route.server is None and route.reason == "no-servers"


def test_o5_an_underscore_in_the_authors_domain_is_no_malformed_from():
    """Odoo stores and sends `jane@my_company.com` as written: a server whose filter lists that
    domain sends it unchanged, as Odoo would (docs/rules.md O5)."""
    config = cfg(servers(("s", "my_company.com", 1)), alias_domain="mycompany.com")
    decision = decide_outbound(config, OutboundRequest("Jane <jane@my_company.com>", None))
    assert decision.malformed is None and not decision.rewritten and decision.server_name == "s"
    hostile = decide_outbound(config, OutboundRequest("=?utf-8?q?evil@my_company.com=0D=0A?=", None))
    assert hostile.malformed is not None
