"""`check_dns`: run SPF, DMARC, DKIM and MX on one domain, a DNS failure becoming a warning."""

from __future__ import annotations

from collections.abc import Sequence

import dns.resolver

from mailgate.commands.dnscheck.dmarc_dkim_mx import check_dkim, check_dmarc, check_mx
from mailgate.commands.dnscheck.findings import Finding, finding
from mailgate.commands.dnscheck.resolver import Dns, DnsTrouble
from mailgate.commands.dnscheck.spf_check import check_spf
from mailgate.config import Config


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
    dns_ = Dns(resolver or dns.resolver.Resolver())
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
