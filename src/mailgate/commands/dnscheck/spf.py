"""SPF records as a receiver reads them: parsing, and RFC 7208 `check_host` over the include tree."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailgate.commands.dnscheck.resolver import Dns, DnsTrouble, IPAddress

LOOKUP_LIMIT = 10  # RFC 7208 §4.6.4
DNS_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
QUALIFIER_RESULTS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = ("all", "include", "a", "mx", "ptr", "exists", "ip4", "ip6")


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


def follows_redirect(terms: list[_Term]) -> str | None:
    """RFC 7208 §6.1: redirect= counts only when the record has no `all`."""
    if any(t.kind == "all" for t in terms):
        return None
    return next((t.target for t in terms if t.kind == "redirect"), None)


class Spf:
    """A receiver's view of one domain's SPF tree."""

    def __init__(self, dns_: Dns) -> None:
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
        redirect = follows_redirect(terms)
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
            except (ValueError, DnsTrouble) as exc:
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
            redirect = follows_redirect(terms)
        except ValueError as exc:
            return "none" if str(exc) == "no SPF record" else "permerror"
        except DnsTrouble:
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
