"""A server's `from_filter` (docs/rules.md O2): the addresses and domains it may send for.

Matching is exact and case-insensitive: no subdomains, no parents, no wildcards. A filter of only
spaces and commas is empty, and an empty filter matches every address.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.rules.addresses import domain_of, normalize


@dataclass(frozen=True)
class FromFilter:
    raw: str | None
    addresses: tuple[str, ...]
    domains: tuple[str, ...]

    @classmethod
    def empty(cls) -> FromFilter:
        return cls(None, (), ())

    @classmethod
    def parse(cls, raw: str | None) -> FromFilter:
        """Split a comma list into address parts (with `@`) and domain parts (without)."""
        parts = [normalize(p) for p in (raw or "").split(",")]
        parts = [p for p in parts if p]
        return cls(raw if parts else None,
                   tuple(p for p in parts if "@" in p),
                   tuple(p for p in parts if "@" not in p))

    @property
    def is_empty(self) -> bool:
        return not self.addresses and not self.domains

    def lists_address(self, address: str | None) -> bool:
        return bool(address) and normalize(address) in self.addresses

    def lists_domain(self, domain: str | None) -> bool:
        return bool(domain) and normalize(domain) in self.domains

    def matches(self, address: str | None) -> bool:
        """Odoo's `_match_from_filter`: may a server with this filter send as `address`?"""
        if self.is_empty:
            return True
        return self.lists_address(address) or self.lists_domain(domain_of(address))

    def __str__(self) -> str:
        return ",".join(self.addresses + self.domains)
