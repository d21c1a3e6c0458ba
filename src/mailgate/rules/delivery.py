"""Where Postfix delivers accepted inbound mail (transport_maps through the lookup service's
`delivery` map, docs/rules.md I5): Odoo through the pipe, or another Postfix transport.
"""

from __future__ import annotations

from mailgate.config import Config
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
    if is_any_bounce_address(config, address):   # tokenised, Odoo's own form or plain: Odoo's bounce route
        return target_transport("odoo", config.bounce_alias)
    if is_catchall(config, address):
        return target_transport("odoo", config.catchall_alias)
    alias = alias_for_address(config, address)
    if alias is not None:
        return target_transport(alias.target, alias.name)
    if config.fallback_target:
        return target_transport(config.fallback_target, "fallback")
    return None
