"""`mailgate check-dns`: real dnspython queries against a local authoritative server per test."""

from __future__ import annotations

import base64
import copy
import json

import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dnsserver import DnsServer
from mailgate.commands import dnscheck
from mailgate.configfile import parse_config
from mailgate.lab.ports import free_port

CONFIG = parse_config("""
alias_domain: example.test
servers:
  - {name: transactional, host: smtp.relay.test, port: 587, from_filter: example.test}
  - {name: mass, host: smtp.sendgrid.net, port: 465, security: tls}
  - {name: partner, host: smtp.partner.test, from_filter: partner.test}
  - {name: old, host: smtp.old.test, active: false}
""", check_files=False).config

GOOD_SPF = "v=spf1 ip4:198.51.100.25 include:sendgrid.net ~all"


def _dkim_key(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


DKIM_KEY = _dkim_key(2048)

GOOD_ZONE = {
    "example.test": {"TXT": [GOOD_SPF, "site-verification=abc123"], "MX": ["10 mx.example.test."]},
    "mx.example.test": {"A": ["203.0.113.10"]},
    "smtp.relay.test": {"A": ["198.51.100.25"]},
    "smtp.partner.test": {"A": ["192.0.2.99"]},
    "smtp.old.test": {"A": ["192.0.2.98"]},
    "smtp.sendgrid.net": {"A": ["192.0.2.200"]},
    "sendgrid.net": {"TXT": ["v=spf1 ip4:167.89.0.0/17 ip4:198.21.0.0/21 ~all"]},
    "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@example.test"]},
    "s1._domainkey.example.test": {"TXT": [f"v=DKIM1; k=rsa; p={DKIM_KEY}"]},
}


@pytest.fixture
def check():
    """Serve GOOD_ZONE with `changes` applied (None deletes a name) and run check_dns on it."""
    servers: list[DnsServer] = []

    def run(changes: dict | None = None, *, selectors=("s1",), this_host=("mx.example.test",),
            domain: str | None = None) -> list[dnscheck.Finding]:
        zone = copy.deepcopy(GOOD_ZONE)
        for name, records in (changes or {}).items():
            if records is None:
                zone.pop(name, None)
            else:
                zone.setdefault(name, {}).update(records)
        server = DnsServer(zone).start()
        servers.append(server)
        findings = dnscheck.check_dns(CONFIG, domain, resolver=server.resolver(),
                                      dkim_selectors=list(selectors),
                                      this_host=list(this_host) if this_host else None)
        assert server.queries, "the checks must ask the local server"
        return findings

    yield run
    for server in servers:
        server.stop()


def _levels(findings, check_name):
    return [f.level for f in findings if f.check == check_name]


def _one(findings, check_name, level):
    matching = [f for f in findings if f.check == check_name and f.level == level]
    assert len(matching) == 1, dnscheck.render(findings)
    return matching[0]


def test_good_setup_is_all_ok(check):
    findings = check()
    assert {f.level for f in findings} == {"OK"}, dnscheck.render(findings)
    assert {f.check for f in findings} == {"spf", "dmarc", "dkim", "mx"}
    messages = "\n".join(f.message for f in findings)
    assert f"SPF record of example.test: {GOOD_SPF} (1 of 10 DNS lookups)" in messages
    assert "server 'transactional' (smtp.relay.test: 198.51.100.25) is authorised" in messages
    assert "include:sendgrid.net is in the SPF record" in messages
    assert "partner" not in messages and "'old'" not in messages  # other domain / inactive
    assert "RSA 2048 bits" in messages and "p=reject" in messages


def test_missing_spf_proposes_a_record(check):
    findings = check({"example.test": {"TXT": ["site-verification=abc123"]}})
    finding = _one(findings, "spf", "FAIL")
    assert finding.message.startswith("no SPF record on example.test")
    assert finding.fix == 'publish example.test. TXT "v=spf1 ip4:198.51.100.25 include:sendgrid.net ~all"'


def test_two_spf_records_must_be_merged(check):
    findings = check({"example.test": {"TXT": ["v=spf1 ip4:198.51.100.25 -all",
                                               "v=spf1 include:sendgrid.net ~all"]}})
    finding = _one(findings, "spf", "FAIL")
    assert finding.message.startswith("2 SPF records")
    assert finding.fix.startswith("merge them into one")
    merged = finding.fix.partition('TXT "')[2].rstrip('"').split()
    assert sorted(merged) == sorted(["v=spf1", "ip4:198.51.100.25", "include:sendgrid.net", "~all"])
    assert merged[0] == "v=spf1" and merged[-1] == "~all"


def test_spf_not_covering_an_upstream_server(check):
    findings = check({"example.test": {"TXT": ["v=spf1 ip4:198.51.100.0/28 include:sendgrid.net -all"]}})
    finding = _one(findings, "spf", "FAIL")
    assert "server 'transactional' (smtp.relay.test) is not authorised" in finding.message
    assert "198.51.100.25 gets fail" in finding.message
    assert finding.fix == ('add ip4:198.51.100.25: example.test. TXT "v=spf1 ip4:198.51.100.0/28 '
                           'include:sendgrid.net ip4:198.51.100.25 -all"')


def test_include_chain_covers_the_server(check):
    findings = check({
        "example.test": {"TXT": ["v=spf1 include:_spf.example.test include:sendgrid.net -all"]},
        "_spf.example.test": {"TXT": ["v=spf1 include:_relay.example.test -all"]},
        "_relay.example.test": {"TXT": ["v=spf1 a:smtp.relay.test/32 -all"]},
    })
    assert set(_levels(findings, "spf")) == {"OK"}, dnscheck.render(findings)
    assert "(4 of 10 DNS lookups)" in findings[0].message


def test_redirect_and_mx_cover_ipv4_and_ipv6(check):
    findings = check({
        "example.test": {"TXT": ["v=spf1 redirect=_spf.example.test"]},
        "_spf.example.test": {"TXT": ["v=spf1 mx:relay.test ip6:2001:db8:25::/48 "
                                      "include:sendgrid.net -all"]},
        "relay.test": {"MX": ["5 smtp.relay.test."]},
        "smtp.relay.test": {"A": ["198.51.100.25"], "AAAA": ["2001:db8:25::1"]},
    })
    assert set(_levels(findings, "spf")) == {"OK"}, dnscheck.render(findings)


def test_an_address_left_out_is_named(check):
    findings = check({"smtp.relay.test": {"A": ["198.51.100.25"], "AAAA": ["2001:db8:25::1"]}})
    finding = _one(findings, "spf", "FAIL")
    assert "2001:db8:25::1 gets softfail" in finding.message and "198.51.100.25" not in finding.message
    assert finding.fix.startswith("add ip6:2001:db8:25::1:")


def test_eleven_lookups_fail(check):
    includes = {f"i{n}.example.test": {"TXT": [f"v=spf1 ip4:192.0.2.{n} -all"]} for n in range(9)}
    record = ("v=spf1 " + " ".join(f"include:i{n}.example.test" for n in range(9))
              + " include:sendgrid.net a:smtp.relay.test ~all")
    findings = check({"example.test": {"TXT": [record]}, **includes})
    finding = _one(findings, "spf", "FAIL")
    assert finding.message.startswith("SPF needs 11 DNS lookups, over the limit of 10")
    assert "(11 of 10 DNS lookups)" in findings[0].message


def test_ten_lookups_pass(check):
    includes = {f"i{n}.example.test": {"TXT": [f"v=spf1 ip4:192.0.2.{n} -all"]} for n in range(8)}
    record = ("v=spf1 " + " ".join(f"include:i{n}.example.test" for n in range(8))
              + " include:sendgrid.net a:smtp.relay.test ~all")
    findings = check({"example.test": {"TXT": [record]}, **includes})
    assert set(_levels(findings, "spf")) == {"OK"}, dnscheck.render(findings)


def test_plus_all_warns(check):
    findings = check({"example.test": {"TXT": [GOOD_SPF.replace("~all", "+all")]}})
    finding = _one(findings, "spf", "WARN")
    assert finding.message == "SPF ends in +all: every host on the Internet may send as example.test"
    assert "FAIL" not in _levels(findings, "spf")


def test_question_all_warns(check):
    findings = check({"example.test": {"TXT": [GOOD_SPF.replace("~all", "?all")]}})
    assert _one(findings, "spf", "WARN").message.startswith("SPF ends in ?all")


def test_provider_include_missing(check):
    findings = check({"example.test": {"TXT": ["v=spf1 ip4:198.51.100.25 -all"]}})
    finding = _one(findings, "spf", "FAIL")
    assert "'mass' (smtp.sendgrid.net) is SendGrid" in finding.message
    assert finding.fix == 'add it: example.test. TXT "v=spf1 ip4:198.51.100.25 include:sendgrid.net -all"'


def test_provider_include_that_cannot_be_evaluated_warns(check):
    findings = check({"sendgrid.net": None})
    assert "include:sendgrid.net in the SPF tree cannot be used: no SPF record" in \
        _one(findings, "spf", "FAIL").message
    assert "could not be evaluated" in _one(findings, "spf", "WARN").message


def test_dmarc_missing(check):
    finding = _one(check({"_dmarc.example.test": None}), "dmarc", "FAIL")
    assert finding.message.startswith("no DMARC record at _dmarc.example.test")
    assert 'TXT "v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@example.test"' in finding.fix


def test_dmarc_p_none_warns(check):
    findings = check({"_dmarc.example.test": {"TXT": ["v=DMARC1; p=none; rua=mailto:d@example.test"]}})
    finding = _one(findings, "dmarc", "WARN")
    assert "p=none" in finding.message
    assert '"v=DMARC1; p=quarantine; rua=mailto:d@example.test"' in finding.fix


def test_dmarc_p_reject_is_reported(check):
    finding = _one(check(), "dmarc", "OK")
    assert finding.message == "DMARC policy p=reject at _dmarc.example.test"


def test_dkim_present_and_missing(check):
    findings = check(selectors=("s1", "s2"))
    present = _one(findings, "dkim", "OK")
    assert "key published at s1._domainkey.example.test (RSA 2048 bits)" in present.message
    missing = _one(findings, "dkim", "FAIL")
    assert missing.message.startswith("DKIM selector s2: no key at s2._domainkey.example.test")
    assert missing.fix.startswith('publish s2._domainkey.example.test. TXT "v=DKIM1; k=rsa; p=')


def test_dkim_revoked_key_fails(check):
    findings = check({"s1._domainkey.example.test": {"TXT": ["v=DKIM1; p="]}})
    assert "revoked" in _one(findings, "dkim", "FAIL").message


def test_no_selector_warns_instead_of_passing(check):
    assert _levels(check(selectors=()), "dkim") == ["WARN"]


def test_mx_missing(check):
    findings = check({"example.test": {"MX": []}}, this_host=("gw.example.test",))
    finding = _one(findings, "mx", "FAIL")
    assert finding.fix == "publish example.test. MX 10 gw.example.test."


def test_mx_pointing_elsewhere_warns(check):
    finding = _one(check(this_host=("gw.example.test", "192.0.2.7")), "mx", "WARN")
    assert "none points at this host" in finding.message and "10 mx.example.test" in finding.message
    assert finding.fix.startswith("publish example.test. MX 10 gw.example.test.")


def test_mx_pointing_here_by_name_or_address(check):
    assert _levels(check(this_host=("MX.example.test.",)), "mx") == ["OK"]
    assert _levels(check(this_host=("203.0.113.10",)), "mx") == ["OK"]


def test_only_backup_mx_here_warns(check):
    findings = check({"example.test": {"MX": ["10 mx.example.test.", "5 primary.example.test."]}})
    assert "only a backup MX" in _one(findings, "mx", "WARN").message


def test_unreachable_resolver_warns_per_check():
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], free_port()
    resolver.lifetime = resolver.timeout = 0.2
    findings = dnscheck.check_dns(CONFIG, resolver=resolver, dkim_selectors=["s1"])
    assert [(f.check, f.level) for f in findings] == [
        ("spf", "WARN"), ("dmarc", "WARN"), ("dkim", "WARN"), ("mx", "WARN")]
    assert findings[0].message.startswith("could not look up example.test TXT")


def test_no_domain_is_an_error():
    with pytest.raises(ValueError, match="no alias domain"):
        dnscheck.check_dns(parse_config("servers: []", check_files=False).config)


def test_render_and_json(check):
    findings = check({"_dmarc.example.test": None})
    text = dnscheck.render(findings)
    assert "FAIL  dmarc  no DMARC record" in text and "\n             fix: publish _dmarc" in text
    assert text.splitlines()[-1] == f"{len(findings) - 1} OK, 1 FAIL"
    data = dnscheck.findings_json(findings)
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is False and data["counts"]["FAIL"] == 1
    assert data["findings"][0].keys() == {"check", "level", "message", "fix", "domain"}
    assert {f["domain"] for f in data["findings"]} == {"example.test"}


def test_every_alias_domain_is_checked_unless_one_is_named():
    """Each alias domain has its own SPF, DMARC and MX: without a domain named, all are checked
    in order, and the report heads each domain's findings with its name."""
    two = parse_config("alias_domains: [example.test, brand.test]\nservers: []", check_files=False).config
    server = DnsServer(copy.deepcopy(GOOD_ZONE)).start()
    try:
        findings = dnscheck.check_dns(two, resolver=server.resolver())
        named = dnscheck.check_dns(two, "Brand.Test.", resolver=server.resolver())
    finally:
        server.stop()
    assert list(dict.fromkeys(f.domain for f in findings)) == ["example.test", "brand.test"]
    assert {f.domain for f in named} == {"brand.test"}
    lines = dnscheck.render(findings).splitlines()
    assert "example.test:" in lines and "brand.test:" in lines
