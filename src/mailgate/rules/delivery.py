"""Where Postfix delivers accepted inbound mail (transport_maps through the lookup service's
`delivery` map, docs/rules.md I5): Odoo through the pipe, or another Postfix transport.
"""

from __future__ import annotations

from mailgate.config import Config
from mailgate.rules.addresses import normalize
from mailgate.rules.classify import alias_for_address, is_any_bounce_address, is_catchall, on_alias_domain

ODOO_TRANSPORT = "mailgate-odoo"  # the pipe(8) service running `mailgate deliver --alias ${nexthop}`


def target_transport(target: str, name: str) -> str:
    """`odoo:MODEL` (or `odoo`) goes to Odoo through the pipe; anything else is a Postfix transport."""
    if target == "odoo" or target.startswith("odoo:"):
        return f"{ODOO_TRANSPORT}:{name}"
    return target


def delivery_transport(config: Config, address: str) -> str | None:
    """transport_maps for accepted inbound mail: where Postfix delivers one recipient.

    The policy service has already refused what has no route, so every address on an alias
    domain has an answer here; None (NOTFOUND) leaves other domains to Postfix.
    """
    if not on_alias_domain(config, address):
        return None
    domain = config.domain_named(normalize(address).rpartition("@")[2])
    if domain is not None and is_any_bounce_address(config, address):  # tokenised, Odoo's own or plain
        return target_transport("odoo", domain.bounce_alias)
    if domain is not None and is_catchall(config, address):
        return target_transport("odoo", domain.catchall_alias)
    alias = alias_for_address(config, address)
    if alias is not None:
        shared = alias.name in config.shared_alias_names
        return target_transport(alias.target, alias.address if shared else alias.name)
    if config.fallback_target:
        return target_transport(config.fallback_target, "fallback")
    return None
