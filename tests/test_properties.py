"""Property tests over addresses, filters, encapsulation and tokens: never a traceback."""

from __future__ import annotations

import string

from hypothesis import given, settings, strategies as st

from mailgate.configfile import parse_config
from mailgate.rules.addresses import folded_mailbox, format_mailbox, parse_mailboxes, readable_addresses
from mailgate.rules.filters import FromFilter
from mailgate.rules.outbound import OutboundRequest, decide_outbound
from mailgate.rules.routing import route_for_sender
from mailgate.rules.tokens import TokenSigner, split_tokenised
from thoroughness import examples

label = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12)
domains = st.builds(lambda labels, tld: ".".join(labels + [tld]), st.lists(label, min_size=1, max_size=3),
                    st.sampled_from(["com", "org", "example", "net"]))
locals_ = st.text(string.ascii_letters + string.digits + "._+-", min_size=1, max_size=20).filter(
    lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s)
addresses = st.builds(lambda lp, d: f"{lp}@{d}", locals_, domains)
names = st.text(min_size=0, max_size=60)

CONFIG = parse_config("""
alias_domain: mycompany.com
servers:
  - {name: trans, host: t.example.net, from_filter: mycompany.com, priority: 1}
  - {name: brand, host: b.example.net, from_filter: "news@brand.example, brand.org", priority: 2}
  - {name: open, host: o.example.net, priority: 3}
mass_mail: {server: open}
""", check_files=False).config
SIGNER = TokenSigner(b"k" * 32)


@given(st.lists(st.one_of(addresses, domains), min_size=1, max_size=5), st.data())
def test_filter_matches_its_own_entries_in_any_case(parts, data):
    raw = " , ".join(p.upper() if data.draw(st.booleans()) else p for p in parts)
    flt = FromFilter.parse(raw)
    for part in parts:
        probe = part if "@" in part else f"someone@{part}"
        assert flt.matches(probe.swapcase())


@given(addresses, domains)
def test_filter_never_matches_subdomains(address, domain):
    local = address.split("@")[0]
    assert not FromFilter.parse(domain).matches(f"{local}@sub.{domain}")


@given(names.map(lambda n: n.replace("\x00", "")), addresses)
def test_format_then_parse_round_trip(name, address):
    header = format_mailbox(name, address)
    boxes = parse_mailboxes(header)
    assert boxes is not None and len(boxes) == 1
    assert boxes[0].address == address
    expected = " ".join(name.translate({c: " " for c in range(32)}).replace("\x7f", " ").split())
    assert " ".join(boxes[0].name.split()) == expected
    assert "\n" not in header and "\r" not in header


long_names = st.lists(st.one_of(names, st.sampled_from(["Jane", '"JJ"', "\\", "Zoë", "東京", " ", "N" * 90])),
                      max_size=40).map(" ".join)


@settings(max_examples=examples(300))
@given(long_names, addresses)
def test_folded_from_unfolds_to_the_same_header_and_keeps_lines_short(name, address):
    """docs/rules.md O5: folds only where the format has white space, lines within 78."""
    folded = folded_mailbox(name, address)
    assert folded.replace("\n", "") == format_mailbox(name, address)
    lines = f"From: {folded}".split("\n")
    assert all(len(line) <= 78 for line in lines if "<" not in line or len(line) - line.index("<") < 70)
    assert all(line[:1] == " " and line.strip() for line in lines[1:]) and "\r" not in folded
    boxes = parse_mailboxes(folded)
    assert boxes is not None and len(boxes) == 1 and boxes[0].address == address


@given(st.text(max_size=80), addresses, st.text(max_size=80))
def test_an_address_anywhere_in_a_value_is_read(before, address, after):
    """docs/rules.md O5: whatever surrounds it, an address set off by delimiters is found."""
    assert address in readable_addresses(f"{before} <{address}> {after}") or "@" in before + after


@settings(max_examples=examples(400))
@given(st.one_of(st.none(), st.text(max_size=200)), st.one_of(st.none(), st.text(max_size=80)), st.booleans())
def test_decide_outbound_total_on_arbitrary_input(header_from, sender, mass):
    decision = decide_outbound(CONFIG, OutboundRequest(header_from, sender, mass))
    assert decision.server is not None
    assert isinstance(decision.envelope_from, str)
    if decision.rewritten:
        assert "\n" not in decision.header_from and "notifications@mycompany.com" in decision.header_from


@given(st.integers(min_value=0, max_value=2**40 - 1), st.sampled_from(["trans", "brand", "open", None]),
       st.floats(min_value=1.6e9, max_value=4e9))
def test_token_round_trip(row, server, now):
    token = SIGNER.make(row, server, now)
    assert len(token) == 32 and token == token.lower() and token.isalnum()
    parsed = SIGNER.verify(token)
    assert parsed is not None and parsed.row_id == row
    assert SIGNER.verify(token.upper()) == parsed
    assert TokenSigner(b"z" * 32).verify(token) is None


@given(st.integers(min_value=0, max_value=2**40 - 1), st.sampled_from(["trans", None]),
       st.floats(min_value=1.6e9, max_value=4e9))
def test_a_token_verifies_only_with_the_store_it_was_issued_by(row, server, now):
    """Row ids start again at 1 in a re-created store: its tokens must not name the old store's rows."""
    this_store, other_store = TokenSigner(b"k" * 32, "a" * 32), TokenSigner(b"k" * 32, "b" * 32)
    token = this_store.make(row, server, now)
    assert this_store.verify(token) is not None and this_store.verify(token).row_id == row
    assert other_store.verify(token) is None and SIGNER.verify(token) is None
    # tokens issued before stores had an identity (version 1) still verify until they age out
    legacy = SIGNER.make(row, server, now)
    assert this_store.verify(legacy) == SIGNER.verify(legacy)


@given(st.integers(min_value=0, max_value=2**40 - 1), st.integers(min_value=0, max_value=31))
def test_tampered_tokens_are_refused(row, position):
    token = SIGNER.make(row, "trans", 1.8e9)
    flipped = token[:position] + ("a" if token[position] != "a" else "b") + token[position + 1:]
    assert SIGNER.verify(flipped) is None
    assert SIGNER.verify(token[:-1]) is None


@settings(max_examples=examples(400))
@given(st.text(max_size=120))
def test_routing_total_on_arbitrary_senders(sender):
    route_for_sender(CONFIG, SIGNER, sender)
    SIGNER.verify(sender)
    split_tokenised(sender, "bounce")
