"""The DNS queries the checks make, through dnspython, as plain cached values."""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.name
import dns.resolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DnsTrouble(Exception):
    """A lookup neither answered nor said "no such record" (timeout, SERVFAIL, ...)."""


class Dns:
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
                raise DnsTrouble(f"{key[0]} {rdtype}: {exc}") from exc
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
