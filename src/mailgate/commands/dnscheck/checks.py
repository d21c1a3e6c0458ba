"""`check_dns`: run SPF, DMARC, DKIM and MX on one domain or every alias domain, a DNS failure
becoming a warning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import dns.resolver

from mailgate.commands.dnscheck.dmarc_dkim_mx import check_dkim, check_dmarc, check_mx
from mailgate.commands.dnscheck.findings import Finding, finding
from mailgate.commands.dnscheck.resolver import Dns, DnsTrouble
from mailgate.commands.dnscheck.spf_check import check_spf
from mailgate.config import Config


def check_dns(config: Config, domain: str | None = None, *,
              resolver: dns.resolver.Resolver | None = None, dkim_selectors: Sequence[str] = (),
              this_host: list[str] | None = None) -> list[Finding]:
    """All findings for `domain`, or for every alias domain in turn when none is given: SPF,
    then DMARC, DKIM and MX, each finding naming its domain.

    `resolver` defaults to the system's; tests pass one aimed at a local server. `this_host`
    lists this gateway's names or addresses, to check that the MX brings replies here.
    Raises ValueError when there is no domain to check.
    """
    wanted = (domain or "").strip().lower().rstrip(".")
    domains = [wanted] if wanted else [d.lower() for d in config.alias_domain_names]
    if not domains:
        raise ValueError("no domain given and the config has no alias domain")
    dns_ = Dns(resolver or dns.resolver.Resolver())
    return [replace(found, domain=name) for name in domains
            for found in _check_one(config, name, dns_, dkim_selectors, this_host)]


def _check_one(config: Config, domain: str, dns_: Dns, dkim_selectors: Sequence[str],
               this_host: list[str] | None) -> list[Finding]:
    checks = (("spf", lambda: check_spf(config, domain, dns_)),
              ("dmarc", lambda: check_dmarc(domain, dns_)),
              ("dkim", lambda: check_dkim(domain, dkim_selectors, dns_)),
              ("mx", lambda: check_mx(domain, this_host, dns_)))
    findings: list[Finding] = []
    for check, run in checks:
        try:
            findings += run()
        except DnsTrouble as exc:
            name, _, error = str(exc).partition(": ")
            findings.append(finding(check, "WARN", "dns-error", name=name, error=error))
    return findings
