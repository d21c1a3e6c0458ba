"""`mailgate check-dns`: do SPF, DKIM, DMARC and MX let the gateway's mail be delivered?

Mail sent through an upstream server is judged by the receiver against the alias domain's DNS:
SPF must authorise every server that sends for it (the envelope sender is `bounce+token@` that
domain), DMARC says what happens when checks fail, DKIM keys must be published, and the MX must
bring replies back to this host. Each problem becomes a `Finding` whose `fix` is the record to
publish or the change to make; the wording lives in the `TEXT` table.

SPF is evaluated the way a receiver does (RFC 7208 `check_host`, first matching term wins) for
each address of each server, through real DNS queries; the 10-lookup limit is counted over the
whole include tree, since a receiver evaluating a non-matching address walks all of it.
"""

from __future__ import annotations

import base64
import fnmatch
import ipaddress
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import dns.exception
import dns.name
import dns.resolver
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from mailgate.config import Config, Server

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOKUP_LIMIT = 10  # RFC 7208 §4.6.4
DNS_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
QUALIFIER_RESULTS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = ("all", "include", "a", "mx", "ptr", "exists", "ip4", "ip6")
LEVELS = ("OK", "WARN", "FAIL")

# Relays whose SMTP host is not where their mail leaves from: their documented include counts.
PROVIDER_INCLUDES: tuple[tuple[str, str, str], ...] = (
    ("smtp.sendgrid.net", "SendGrid", "sendgrid.net"),
    ("smtp.eu.mailgun.org", "Mailgun (EU)", "eu.mailgun.org"),
    ("smtp.mailgun.org", "Mailgun", "mailgun.org"),
    ("email-smtp.*.amazonaws.com", "Amazon SES", "amazonses.com"),
    ("smtp.office365.com", "Microsoft 365", "spf.protection.outlook.com"),
    ("*.mail.protection.outlook.com", "Microsoft 365", "spf.protection.outlook.com"),
    ("smtp.gmail.com", "Google Workspace", "_spf.google.com"),
    ("smtp-relay.gmail.com", "Google Workspace", "_spf.google.com"),
    ("smtp.postmarkapp.com", "Postmark", "spf.mtasv.net"),
    ("smtp-relay.brevo.com", "Brevo", "spf.brevo.com"),
    ("smtp-relay.sendinblue.com", "Brevo", "spf.brevo.com"),
    ("in-v3.mailjet.com", "Mailjet", "spf.mailjet.com"),
    ("smtp.mandrillapp.com", "Mandrill", "spf.mandrillapp.com"),
    ("smtp.sparkpostmail.com", "SparkPost", "sparkpostmail.com"),
    ("smtp.zoho.com", "Zoho", "zoho.com"),
    ("smtp.zoho.eu", "Zoho (EU)", "zoho.eu"),
    ("smtp.fastmail.com", "Fastmail", "spf.messagingengine.com"),
    ("ssl0.ovh.net", "OVH", "mx.ovh.com"),
    ("mail.gandi.net", "Gandi", "_mailcust.gandi.net"),
)

# Addresses that never reach the Internet as they are: SPF cannot be judged for them here.
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "100.64.0.0/10",
    "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10"))

# key -> (message, fix); both formatted with the finding's values.
TEXT: dict[str, tuple[str, str | None]] = {
    "dns-error": ("could not look up {name}: {error}", "check this host's DNS resolver, then run again"),
    "spf-missing": ("no SPF record on {domain}: receivers cannot tell which servers may send for it",
                    'publish {domain}. TXT "{proposal}"'),
    "spf-several": ("{count} SPF records on {domain}: receivers answer permerror and ignore all of them",
                    'merge them into one: {domain}. TXT "{proposal}"'),
    "spf-syntax": ("the SPF record of {domain} does not parse ({error}): receivers answer permerror",
                   "correct the record: terms are [+-~?]mechanism[:domain][/cidr] or name=value"),
    "spf-record": ("SPF record of {domain}: {record} ({lookups} of 10 DNS lookups)", None),
    "spf-lookups": ("SPF needs {lookups} DNS lookups, over the limit of 10 (RFC 7208 §4.6.4): "
                    "receivers answer permerror",
                    "replace includes by the ip4:/ip6: ranges they hold, or drop includes no server uses"),
    "spf-include-broken": ("{term} in the SPF tree cannot be used: {reason}; receivers answer permerror",
                           "remove {term}, or have {target} publish one valid SPF record"),
    "spf-all-pass": ("SPF ends in {term}: every host on the Internet may send as {domain}",
                     "end the record with ~all (or -all)"),
    "spf-all-neutral": ("SPF ends in {term}: unlisted hosts are neutral, so forgeries are not rejected",
                        "end the record with ~all (or -all)"),
    "spf-no-all": ("SPF has no final all: unlisted hosts are neutral", "end the record with ~all (or -all)"),
    "spf-covered": ("server '{server}' ({host}: {ips}) is authorised by SPF", None),
    "spf-uncovered": ("server '{server}' ({host}) is not authorised by SPF: {results}",
                      'add {terms}: {domain}. TXT "{proposal}"'),
    "spf-unknown": ("server '{server}' ({host}): SPF could not be evaluated for {results}",
                    "the record uses ptr, exists or macros, which are not evaluated here: send a test "
                    "message to a mailbox that shows Authentication-Results"),
    "spf-private": ("server '{server}' ({host}) has the private address {ips}: the public address it "
                    "sends from is not known here", "make sure SPF authorises the relay's public address"),
    "spf-unresolved": ("server '{server}': {host} has no A or AAAA record", "correct the server's host"),
    "spf-provider": ("server '{server}' ({host}) is {provider}: include:{include} is in the SPF record",
                     None),
    "spf-provider-missing": ("server '{server}' ({host}) is {provider}, whose documented SPF include "
                             "include:{include} is missing", 'add it: {domain}. TXT "{proposal}"'),
    "spf-provider-unevaluated": ("server '{server}' is {provider}: include:{include} is in the record "
                                 "but could not be evaluated ({reason})",
                                 "check {provider}'s SPF documentation for the current include"),
    "spf-no-server": ("no active server sends for {domain}: its mail leaves through Postfix's default "
                      "route", "make sure SPF authorises this host's public address"),
    "dmarc-missing": ("no DMARC record at _dmarc.{domain}: receivers apply their own policy and send "
                      "no reports", 'publish _dmarc.{domain}. TXT "{proposal}" (rua: a mailbox you read)'),
    "dmarc-several": ("{count} DMARC records at _dmarc.{where}: receivers ignore all of them",
                      "keep exactly one v=DMARC1 record"),
    "dmarc-invalid": ("the DMARC record at _dmarc.{where} has no valid policy (p={policy}): {record}",
                      'publish _dmarc.{where}. TXT "{proposal}"'),
    "dmarc-none": ("DMARC policy p=none at _dmarc.{where}: monitoring only, forged mail is delivered",
                   'once the reports show your mail passes, publish _dmarc.{where}. TXT "{proposal}"'),
    "dmarc-ok": ("DMARC policy p={policy}{pct} at _dmarc.{where}", None),
    "dkim-no-selector": ("no DKIM selector given: DKIM was not checked",
                         "pass the selector(s) your signer or upstream provider uses (--selector S)"),
    "dkim-ok": ("DKIM selector {selector}: key published at {name} ({key})", None),
    "dkim-weak": ("DKIM selector {selector}: {key} at {name}: receivers ignore RSA keys under 1024 bits",
                  "publish a 2048-bit RSA key and sign with it"),
    "dkim-missing": ("DKIM selector {selector}: no key at {name}: signatures with it fail",
                     'publish {name}. TXT "v=DKIM1; k=rsa; p=<public key>" from your DKIM signer'),
    "dkim-revoked": ("DKIM selector {selector}: the key at {name} is revoked (empty p=)",
                     "publish the current public key, or sign with another selector"),
    "dkim-invalid": ("DKIM selector {selector}: the record at {name} is not a DKIM key: {record}",
                     'publish {name}. TXT "v=DKIM1; k=rsa; p=<public key>"'),
    "mx-missing": ("no MX for {domain}: replies to the aliases fall back to its A record or bounce",
                   "publish {domain}. MX 10 {here}."),
    "mx-null": ("{domain} publishes a null MX (0 .): it accepts no mail, so replies bounce",
                "replace it: {domain}. MX 10 {here}."),
    "mx-listed": ("MX of {domain}: {mx}", None),
    "mx-here": ("MX of {domain}: {mx}; the preferred one points at this host", None),
    "mx-backup": ("MX of {domain}: {mx}; only a backup MX points at this host",
                  "give this host the lowest preference: {domain}. MX 10 {here}."),
    "mx-elsewhere": ("MX of {domain}: {mx}; none points at this host ({names})",
                     "publish {domain}. MX 10 {here}. (or relay the aliases' mail from those hosts here)"),
}


@dataclass(frozen=True)
class Finding:
    """One verdict; `fix` is the record to publish or the change to make, when there is one."""

    check: str
    level: str
    message: str
    fix: str | None = None


def _finding(check: str, level: str, text: str, /, **values: object) -> Finding:
    message, fix = TEXT[text]
    return Finding(check, level, message.format(**values), fix.format(**values) if fix else None)


class _DnsTrouble(Exception):
    """A lookup neither answered nor said "no such record" (timeout, SERVFAIL, ...)."""


class _Dns:
    """The resolver's answers as plain values, cached: the same names come up many times."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver
        self.cache: dict[tuple[str, str], list] = {}

    def query(self, name: str, rdtype: str) -> list:
        key = (name.lower().rstrip("."), rdtype)
        if key not in self.cache:
            try:
                answer = self.resolver.resolve(dns.name.from_text(key[0]), rdtype,
                                               raise_on_no_answer=False)
                self.cache[key] = list(answer.rrset or ())
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                self.cache[key] = []
            except dns.exception.DNSException as exc:
                raise _DnsTrouble(f"{key[0]} {rdtype}: {exc}") from exc
        return self.cache[key]

    def txt(self, name: str) -> list[str]:
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self.query(name, "TXT")]

    def addresses(self, name: str) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(name)]
        except ValueError:
            return [ipaddress.ip_address(r.address) for t in ("A", "AAAA") for r in self.query(name, t)]

    def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted((r.preference, str(r.exchange).rstrip(".").lower()) for r in self.query(name, "MX"))


# --- SPF ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Term:
    qualifier: str
    kind: str                 # all include a mx ptr exists ip4 ip6 redirect exp (or another modifier)
    target: str | None = None
    cidr4: int = 32
    cidr6: int = 128

    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.target or "", strict=False)


_MECHANISM = re.compile(r"^([-+~?]?)(all|include|a|mx|ptr|exists)(?::([^/]+))?"
                        r"(?:/(\d{1,2}))?(?://(\d{1,3}))?$", re.I)
_IP = re.compile(r"^([-+~?]?)(ip4|ip6):(\S+)$", re.I)
_MODIFIER = re.compile(r"^([a-z][a-z0-9_.-]*)=(.*)$", re.I)


def is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def parse_spf(record: str) -> list[_Term]:
    """The terms after `v=spf1`; ValueError names the first term a receiver cannot parse."""
    terms = []
    for word in record.split()[1:]:
        if match := _IP.match(word):
            term = _Term(match[1] or "+", match[2].lower(), match[3])
            if term.network().version != int(term.kind[-1]):
                raise ValueError(f"bad address in {word!r}")
        elif match := _MODIFIER.match(word):
            term = _Term("+", match[1].lower(), match[2])
        elif match := _MECHANISM.match(word):
            cidr4, cidr6 = int(match[4] or 32), int(match[5] or 128)
            if cidr4 > 32 or cidr6 > 128:
                raise ValueError(f"bad prefix length in {word!r}")
            term = _Term(match[1] or "+", match[2].lower(), match[3], cidr4, cidr6)
        else:
            raise ValueError(f"unknown term {word!r}")
        terms.append(term)
    return terms


def _follows_redirect(terms: list[_Term]) -> str | None:
    """RFC 7208 §6.1: redirect= counts only when the record has no `all`."""
    if any(t.kind == "all" for t in terms):
        return None
    return next((t.target for t in terms if t.kind == "redirect"), None)


class _Spf:
    """A receiver's view of one domain's SPF tree."""

    def __init__(self, dns_: _Dns) -> None:
        self.dns = dns_

    def terms(self, domain: str) -> list[_Term]:
        """The domain's parsed record; ValueError says why a receiver could not use it."""
        records = [t for t in self.dns.txt(domain) if is_spf(t)]
        if len(records) != 1:
            raise ValueError("no SPF record" if not records else f"{len(records)} SPF records")
        return parse_spf(records[0])

    def walk(self, domain: str, seen: frozenset[str] = frozenset()) -> tuple[int, set[str], list]:
        """(DNS lookups, domains reached by include/redirect, [(term, target, why unusable)])."""
        lookups, reached, broken = 0, set(), []
        terms, seen = self.terms(domain), seen | {domain.lower()}
        redirect = _follows_redirect(terms)
        for term in terms:
            if term.kind == "redirect" and term.target != redirect:
                continue
            lookups += term.kind in DNS_TERMS
            target = term.target
            if term.kind not in ("include", "redirect") or not target or "%" in target:
                continue
            reached.add(target.lower())
            label = f"{term.kind}{'=' if term.kind == 'redirect' else ':'}{target}"
            if target.lower() in seen or len(seen) > LOOKUP_LIMIT:
                why = "it loops back" if target.lower() in seen else "the chain is too deep"
                broken.append((label, target, why))
                continue
            try:
                more, further, worse = self.walk(target, seen)
            except (ValueError, _DnsTrouble) as exc:
                broken.append((label, target, str(exc)))
                continue
            lookups, reached, broken = lookups + more, reached | further, broken + worse
        return lookups, reached, broken

    def check_host(self, ip: IPAddress, domain: str, depth: int = 0) -> str:
        """RFC 7208 §4 result for `ip`, or "unknown" where ptr/exists/macros stop the evaluation."""
        if depth > LOOKUP_LIMIT:
            return "permerror"
        try:
            terms = self.terms(domain)
            for term in terms:
                if term.kind not in MECHANISMS:
                    continue
                matched = self._matches(ip, term, domain, depth)
                if isinstance(matched, str):
                    return matched
                if matched:
                    return QUALIFIER_RESULTS[term.qualifier]
            redirect = _follows_redirect(terms)
        except ValueError as exc:
            return "none" if str(exc) == "no SPF record" else "permerror"
        except _DnsTrouble:
            return "temperror"
        if redirect is None:
            return "neutral"
        result = self.check_host(ip, redirect, depth + 1)
        return "permerror" if result == "none" else result

    def _matches(self, ip: IPAddress, term: _Term, domain: str, depth: int) -> bool | str:
        if term.kind == "all":
            return True
        if term.kind in ("ip4", "ip6"):
            return ip in term.network() if ip.version == term.network().version else False
        target = term.target or domain
        if term.kind == "ptr" or "%" in target:
            return "unknown"
        if term.kind == "include":
            result = self.check_host(ip, target, depth + 1)
            if result in ("pass", "fail", "softfail", "neutral"):
                return result == "pass"
            return "permerror" if result == "none" else result
        if term.kind == "exists":
            return bool(self.dns.query(target, "A"))
        hosts = [target] if term.kind == "a" else [host for _, host in self.dns.mx(target)]
        prefix = term.cidr4 if ip.version == 4 else term.cidr6
        return any(ip in ipaddress.ip_network(f"{address}/{prefix}", strict=False)
                   for host in hosts for address in self.dns.addresses(host)
                   if address.version == ip.version)


def _with_terms(record: str, new_terms: Iterable[str]) -> str:
    """The record with terms added before its `all` (or redirect), where they still count."""
    words = record.split()
    new = [t for t in dict.fromkeys(new_terms) if t not in words]
    at = next((i for i, w in enumerate(words)
               if w.lstrip("+-~?").lower() == "all" or w.lower().startswith("redirect=")), len(words))
    return " ".join(words[:at] + new + words[at:])


def _provider(host: str) -> tuple[str, str] | None:
    for pattern, name, include in PROVIDER_INCLUDES:
        if fnmatch.fnmatch(host.lower(), pattern):
            return name, include
    return None


def _server_terms(dns_: _Dns, server: Server) -> list[str]:
    """What SPF needs for one server: the provider's include, else its addresses."""
    provider = _provider(server.host)
    if provider:
        return [f"include:{provider[1]}"]
    try:
        addresses = dns_.addresses(server.host)
    except _DnsTrouble:
        addresses = []
    return [f"ip{a.version}:{a}" for a in addresses] or [f"a:{server.host}"]


def _server_spf(spf: _Spf, record: str, domain: str, server: Server, reached: set[str],
                broken: dict[str, str]) -> Finding:
    values = {"server": server.name, "host": server.host, "domain": domain}
    provider = _provider(server.host)
    if provider:
        name, include = provider
        values.update(provider=name, include=include)
        if include not in reached:
            return _finding("spf", "FAIL", "spf-provider-missing",
                            proposal=_with_terms(record, [f"include:{include}"]), **values)
        if include in broken:
            return _finding("spf", "WARN", "spf-provider-unevaluated", reason=broken[include], **values)
        return _finding("spf", "OK", "spf-provider", **values)
    try:
        addresses = spf.dns.addresses(server.host)
    except _DnsTrouble as exc:
        return _finding("spf", "WARN", "dns-error", name=server.host, error=exc)
    if not addresses:
        return _finding("spf", "FAIL", "spf-unresolved", **values)
    ips = ", ".join(map(str, addresses))
    public = [a for a in addresses
              if not any(a in net for net in LOCAL_NETWORKS if net.version == a.version)]
    if not public:
        return _finding("spf", "WARN", "spf-private", ips=ips, **values)
    results = {a: spf.check_host(a, domain) for a in public}
    bad = {a: r for a, r in results.items() if r != "pass"}
    summary = ", ".join(f"{a} gets {r}" for a, r in bad.items())
    if not bad:
        return _finding("spf", "OK", "spf-covered", ips=ips, **values)
    if all(r in ("unknown", "temperror") for r in bad.values()):
        return _finding("spf", "WARN", "spf-unknown", results=summary, **values)
    terms = [f"ip{a.version}:{a}" for a in bad]
    return _finding("spf", "FAIL", "spf-uncovered", results=summary, terms=" ".join(terms),
                    proposal=_with_terms(record, terms), **values)


def _sends_for(server: Server, domain: str) -> bool:
    from_filter = server.from_filter
    return (from_filter.is_empty or from_filter.lists_domain(domain)
            or any(a.endswith("@" + domain) for a in from_filter.addresses))


def _check_spf(config: Config, domain: str, dns_: _Dns) -> list[Finding]:
    servers = [s for s in config.active_servers if _sends_for(s, domain.lower())]
    spf = _Spf(dns_)
    records = [t for t in dns_.txt(domain) if is_spf(t)]
    if not records:
        terms = [t for s in servers for t in _server_terms(dns_, s)] or ["mx"]
        return [_finding("spf", "FAIL", "spf-missing", domain=domain,
                         proposal=_with_terms("v=spf1 ~all", terms))]
    if len(records) > 1:
        merged = _with_terms("v=spf1 ~all", [w for r in records for w in r.split()[1:]
                                              if w.lstrip("+-~?").lower() != "all"])
        return [_finding("spf", "FAIL", "spf-several", count=len(records), domain=domain,
                         proposal=merged)]
    record = records[0]
    try:
        terms = parse_spf(record)
    except ValueError as exc:
        return [_finding("spf", "FAIL", "spf-syntax", domain=domain, error=exc)]
    lookups, reached, broken = spf.walk(domain)
    findings = [_finding("spf", "OK", "spf-record", domain=domain, record=record, lookups=lookups)]
    if lookups > LOOKUP_LIMIT:
        findings.append(_finding("spf", "FAIL", "spf-lookups", lookups=lookups))
    findings += [_finding("spf", "FAIL", "spf-include-broken", term=term, target=target, reason=why)
                 for term, target, why in broken]
    final = next((t for t in reversed(terms) if t.kind == "all"), None)
    term = f"{final.qualifier}all" if final else ""
    if final and final.qualifier in "+?":
        findings.append(_finding("spf", "WARN", "spf-all-pass" if final.qualifier == "+"
                                 else "spf-all-neutral", term=term, domain=domain))
    elif final is None and _follows_redirect(terms) is None:
        findings.append(_finding("spf", "WARN", "spf-no-all"))
    unusable = {target.lower(): why for _, target, why in broken}
    findings += [_server_spf(spf, record, domain, s, reached, unusable) for s in servers]
    if not servers:
        findings.append(_finding("spf", "WARN", "spf-no-server", domain=domain))
    return findings


# --- DMARC, DKIM, MX ---------------------------------------------------------------------------

def _tags(record: str) -> dict[str, str]:
    pairs = (part.split("=", 1) for part in record.split(";") if "=" in part)
    return {k.strip().lower(): v.strip() for k, v in pairs}


def _check_dmarc(domain: str, dns_: _Dns) -> list[Finding]:
    """The domain's record, else its parents' (receivers walk up to the organisational domain)."""
    proposal = f"v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@{domain}"
    labels = domain.split(".")
    for where in (".".join(labels[i:]) for i in range(max(1, len(labels) - 1))):
        records = [t for t in dns_.txt(f"_dmarc.{where}") if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t, re.I)]
        if records:
            break
    else:
        return [_finding("dmarc", "FAIL", "dmarc-missing", domain=domain, proposal=proposal)]
    if len(records) > 1:
        return [_finding("dmarc", "FAIL", "dmarc-several", count=len(records), where=where)]
    tags = _tags(records[0])
    policy = (tags.get("sp") if where != domain and "sp" in tags else tags.get("p", "")).lower()
    if policy not in ("none", "quarantine", "reject"):
        return [_finding("dmarc", "FAIL", "dmarc-invalid", where=where, policy=policy,
                         record=records[0], proposal=proposal)]
    if policy == "none":
        better = re.sub(r"(?i)\bp\s*=\s*none", "p=quarantine", records[0], count=1)
        return [_finding("dmarc", "WARN", "dmarc-none", where=where, proposal=better)]
    pct = f" on {tags['pct']}% of failing mail" if tags.get("pct", "100") != "100" else ""
    return [_finding("dmarc", "OK", "dmarc-ok", policy=policy, pct=pct, where=where)]


def _key_description(key_type: str, data: str) -> tuple[str, bool]:
    """("RSA 2048 bits", weak?) from the p= value; ed25519 and unreadable keys are not judged."""
    try:
        key = load_der_public_key(base64.b64decode(data))
    except (ValueError, UnsupportedAlgorithm):
        return key_type, False
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits", key.key_size < 1024
    return key_type, False


def _check_dkim(domain: str, selectors: Sequence[str], dns_: _Dns) -> list[Finding]:
    if not selectors:
        return [_finding("dkim", "WARN", "dkim-no-selector")]
    findings = []
    for selector in selectors:
        name = f"{selector}._domainkey.{domain}"
        values = {"selector": selector, "name": name}
        records = dns_.txt(name)
        if not records:
            findings.append(_finding("dkim", "FAIL", "dkim-missing", **values))
            continue
        tags = _tags(records[0])
        if tags.get("v", "DKIM1").upper() != "DKIM1" or "p" not in tags:
            findings.append(_finding("dkim", "FAIL", "dkim-invalid", record=records[0][:80], **values))
        elif not tags["p"]:
            findings.append(_finding("dkim", "FAIL", "dkim-revoked", **values))
        else:
            key, weak = _key_description(tags.get("k", "rsa"), re.sub(r"\s", "", tags["p"]))
            findings.append(_finding("dkim", "WARN" if weak else "OK",
                                     "dkim-weak" if weak else "dkim-ok", key=key, **values))
    return findings


def _check_mx(domain: str, this_host: list[str] | None, dns_: _Dns) -> list[Finding]:
    names = [n.lower().rstrip(".") for n in this_host or []]
    here = next((n for n in names if not _is_ip(n)), "<this host's name>")
    records = dns_.mx(domain)
    if not records:
        return [_finding("mx", "FAIL", "mx-missing", domain=domain, here=here)]
    if [host for _, host in records] == [""]:
        return [_finding("mx", "FAIL", "mx-null", domain=domain, here=here)]
    values = {"domain": domain, "here": here, "mx": ", ".join(f"{p} {h}" for p, h in records)}
    if not names:
        return [_finding("mx", "OK", "mx-listed", **values)]
    addresses = {a for n in names for a in _quiet_addresses(dns_, n)}

    def points_here(host: str) -> bool:
        return host in names or bool(addresses & set(_quiet_addresses(dns_, host)))

    best = records[0][0]
    if any(points_here(h) for p, h in records if p == best):
        return [_finding("mx", "OK", "mx-here", **values)]
    if any(points_here(h) for _, h in records):
        return [_finding("mx", "WARN", "mx-backup", **values)]
    return [_finding("mx", "WARN", "mx-elsewhere", names=", ".join(names), **values)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _quiet_addresses(dns_: _Dns, name: str) -> list[IPAddress]:
    """Addresses for comparing hosts; a name that does not resolve just compares by name."""
    try:
        return dns_.addresses(name)
    except _DnsTrouble:
        return []


# --- entry points ------------------------------------------------------------------------------

def check_dns(config: Config, domain: str | None = None, *,
              resolver: dns.resolver.Resolver | None = None, dkim_selectors: Sequence[str] = (),
              this_host: list[str] | None = None) -> list[Finding]:
    """All findings for `domain` (default: the alias domain), SPF then DMARC, DKIM and MX.

    `resolver` defaults to the system's; tests pass one aimed at a local server. `this_host`
    lists this gateway's names or addresses, to check that the MX brings replies here.
    Raises ValueError when there is no domain to check.
    """
    domain = (domain or config.alias_domain or "").strip().lower().rstrip(".")
    if not domain:
        raise ValueError("no domain given and the config has no alias_domain")
    dns_ = _Dns(resolver or dns.resolver.Resolver())
    checks = (("spf", lambda: _check_spf(config, domain, dns_)),
              ("dmarc", lambda: _check_dmarc(domain, dns_)),
              ("dkim", lambda: _check_dkim(domain, dkim_selectors, dns_)),
              ("mx", lambda: _check_mx(domain, this_host, dns_)))
    findings: list[Finding] = []
    for check, run in checks:
        try:
            findings += run()
        except _DnsTrouble as exc:
            name, _, error = str(exc).partition(": ")
            findings.append(_finding(check, "WARN", "dns-error", name=name, error=error))
    return findings


def render(findings: list[Finding]) -> str:
    """One line per finding with its fix below, then a count per level."""
    lines = []
    for finding in findings:
        lines.append(f"{finding.level:4}  {finding.check:5}  {finding.message}")
        if finding.fix:
            lines.append(f"{'':4}  {'':5}  fix: {finding.fix}")
    counts = {level: sum(f.level == level for f in findings) for level in LEVELS}
    lines.append(", ".join(f"{n} {level}" for level, n in counts.items() if n) or "nothing checked")
    return "\n".join(lines)


def findings_json(findings: list[Finding]) -> dict:
    """The `--json` shape: `ok` is false when any finding is a FAIL."""
    return {
        "ok": not any(f.level == "FAIL" for f in findings),
        "counts": {level: sum(f.level == level for f in findings) for level in LEVELS},
        "findings": [asdict(f) for f in findings],
    }
