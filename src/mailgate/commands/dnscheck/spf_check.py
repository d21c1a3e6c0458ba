"""The SPF check: is every server that sends for the domain authorised, and what record would fix it."""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable

from mailgate.commands.dnscheck.findings import Finding, finding
from mailgate.commands.dnscheck.resolver import Dns, DnsTrouble
from mailgate.commands.dnscheck.spf import LOOKUP_LIMIT, Spf, follows_redirect, is_spf, parse_spf
from mailgate.config import Config, Server

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


def _server_terms(dns_: Dns, server: Server) -> list[str]:
    """What SPF needs for one server: the provider's include, else its addresses."""
    provider = _provider(server.host)
    if provider:
        return [f"include:{provider[1]}"]
    try:
        addresses = dns_.addresses(server.host)
    except DnsTrouble:
        addresses = []
    return [f"ip{a.version}:{a}" for a in addresses] or [f"a:{server.host}"]


def _server_spf(spf: Spf, record: str, domain: str, server: Server, reached: set[str],
                broken: dict[str, str]) -> Finding:
    values = {"server": server.name, "host": server.host, "domain": domain}
    provider = _provider(server.host)
    if provider:
        name, include = provider
        values.update(provider=name, include=include)
        if include not in reached:
            return finding("spf", "FAIL", "spf-provider-missing",
                           proposal=_with_terms(record, [f"include:{include}"]), **values)
        if include in broken:
            return finding("spf", "WARN", "spf-provider-unevaluated", reason=broken[include], **values)
        return finding("spf", "OK", "spf-provider", **values)
    try:
        addresses = spf.dns.addresses(server.host)
    except DnsTrouble as exc:
        return finding("spf", "WARN", "dns-error", name=server.host, error=exc)
    if not addresses:
        return finding("spf", "FAIL", "spf-unresolved", **values)
    ips = ", ".join(map(str, addresses))
    public = [a for a in addresses
              if not any(a in net for net in LOCAL_NETWORKS if net.version == a.version)]
    if not public:
        return finding("spf", "WARN", "spf-private", ips=ips, **values)
    results = {a: spf.check_host(a, domain) for a in public}
    bad = {a: r for a, r in results.items() if r != "pass"}
    summary = ", ".join(f"{a} gets {r}" for a, r in bad.items())
    if not bad:
        return finding("spf", "OK", "spf-covered", ips=ips, **values)
    if all(r in ("unknown", "temperror") for r in bad.values()):
        return finding("spf", "WARN", "spf-unknown", results=summary, **values)
    terms = [f"ip{a.version}:{a}" for a in bad]
    return finding("spf", "FAIL", "spf-uncovered", results=summary, terms=" ".join(terms),
                   proposal=_with_terms(record, terms), **values)


def _sends_for(server: Server, domain: str) -> bool:
    from_filter = server.from_filter
    return (from_filter.is_empty or from_filter.lists_domain(domain)
            or any(a.endswith("@" + domain) for a in from_filter.addresses))


def check_spf(config: Config, domain: str, dns_: Dns) -> list[Finding]:
    servers = [s for s in config.active_servers if _sends_for(s, domain.lower())]
    spf = Spf(dns_)
    records = [t for t in dns_.txt(domain) if is_spf(t)]
    if not records:
        proposed = [t for s in servers for t in _server_terms(dns_, s)] or ["mx"]
        return [finding("spf", "FAIL", "spf-missing", domain=domain,
                        proposal=_with_terms("v=spf1 ~all", proposed))]
    if len(records) > 1:
        merged = _with_terms("v=spf1 ~all", [w for r in records for w in r.split()[1:]
                                              if w.lstrip("+-~?").lower() != "all"])
        return [finding("spf", "FAIL", "spf-several", count=len(records), domain=domain,
                        proposal=merged)]
    record = records[0]
    try:
        terms = parse_spf(record)
    except ValueError as exc:
        return [finding("spf", "FAIL", "spf-syntax", domain=domain, error=exc)]
    lookups, reached, broken = spf.walk(domain)
    findings = [finding("spf", "OK", "spf-record", domain=domain, record=record, lookups=lookups)]
    if lookups > LOOKUP_LIMIT:
        findings.append(finding("spf", "FAIL", "spf-lookups", lookups=lookups))
    findings += [finding("spf", "FAIL", "spf-include-broken", term=term, target=target, reason=why)
                 for term, target, why in broken]
    final = next((t for t in reversed(terms) if t.kind == "all"), None)
    term = f"{final.qualifier}all" if final else ""
    if final and final.qualifier in "+?":
        findings.append(finding("spf", "WARN", "spf-all-pass" if final.qualifier == "+"
                                else "spf-all-neutral", term=term, domain=domain))
    elif final is None and follows_redirect(terms) is None:
        findings.append(finding("spf", "WARN", "spf-no-all"))
    unusable = {target.lower(): why for _, target, why in broken}
    findings += [_server_spf(spf, record, domain, s, reached, unusable) for s in servers]
    if not servers:
        findings.append(finding("spf", "WARN", "spf-no-server", domain=domain))
    return findings
