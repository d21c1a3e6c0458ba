"""Which addresses are Odoo's (docs/rules.md I1, I2, I6, I7): the catchall and bounce addresses of
every alias domain (each with its own aliases), tokenised bounce addresses, aliases by full
address or local part, the policy service's verdict on one RCPT, and which milter role a
message takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from mailgate.config import Alias, AliasDomain, Config
from mailgate.rules.addresses import normalize
from mailgate.rules.tokens import is_odoo_bounce_suffix, split_tokenised

RecipientVerdict = Literal["outside", "accept", "no_such_alias", "forged_bounce"]


def is_catchall(config: Config, address: str) -> bool:
    """Some alias domain's catchall address (each domain has its own catchall alias)."""
    local, _, domain = normalize(address).rpartition("@")
    found = config.domain_named(domain)
    return found is not None and local == found.catchall_alias


def bounce_parts(config: Config, address: str) -> tuple[str, AliasDomain] | None:
    """(suffix, domain) of `<bounce_alias>+<suffix>@<alias domain>`, where the bounce alias is
    that domain's own, else None."""
    domain = config.domain_named(normalize(address).rpartition("@")[2])
    if domain is None:
        return None
    parts = split_tokenised(address, domain.bounce_alias)
    return (parts[0], domain) if parts else None


def _bounce_suffix(config: Config, address: str) -> str | None:
    parts = bounce_parts(config, address)
    return parts[0] if parts else None


def bounce_token_of(config: Config, address: str) -> str | None:
    """The token of `bounce+TOKEN@alias-domain`, or None when the address is not one. Odoo's own
    form (`bounce+991-mail.mail-17@`, T1) is not a token: it is never ours, nor forged."""
    suffix = _bounce_suffix(config, address)
    if suffix is None or is_odoo_bounce_suffix(suffix):
        return None
    return suffix


def is_odoo_own_bounce(config: Config, address: str) -> bool:
    """`<bounce_alias>+<mail.mail id>[-<model>-<res_id>]@<alias domain>`: the bounce address Odoo
    16 and older put in mail sent before the cut-over to mailgate. Reports to it are Odoo's, and
    are passed on to Odoo as addressed (docs/rules.md I2.1, I5, I6)."""
    suffix = _bounce_suffix(config, address)
    return suffix is not None and is_odoo_bounce_suffix(suffix)


def is_any_bounce_address(config: Config, address: str) -> bool:
    """The plain bounce address, or `<bounce_alias>+anything@<alias domain>`: Odoo's bounce
    address with or without a suffix (O1), whatever the suffix holds."""
    return is_plain_bounce(config, address) or _bounce_suffix(config, address) is not None


def report_bounce_alias(config: Config, recipients: list[str]) -> str:
    """The bounce alias of the alias domain a report is addressed to (the first recipient that
    is one of our bounce addresses): the report's parser leaves that address out of the failed
    recipients. The first domain's when none is."""
    for recipient in recipients:
        domain = config.domain_named(normalize(recipient).rpartition("@")[2])
        if domain is not None and is_any_bounce_address(config, recipient):
            return domain.bounce_alias
    return config.bounce_aliases[0]


def is_plain_bounce(config: Config, address: str) -> bool:
    """Some alias domain's bounce address, exact: what Odoo 17+ puts in MAIL FROM."""
    local, _, domain = normalize(address).rpartition("@")
    found = config.domain_named(domain)
    return found is not None and local == found.bounce_alias


def alias_for_address(config: Config, address: str) -> Alias | None:
    """An alias by its full address, or an `incoming_local` alias by local part on an allowed
    domain (on any domain when `allowed_alias_domains: []` says there is no restriction)."""
    address = normalize(address)
    alias = config.alias_at(address)
    if alias is not None:
        return alias
    local, _, domain = address.rpartition("@")
    if config.incoming_local_anywhere or domain in config.accepted_domain_set:
        for alias in config.aliases:
            if alias.incoming_local and alias.name == local:
                return alias
    return None


def on_alias_domain(config: Config, address: str) -> bool:
    domain = normalize(address).rpartition("@")[2]
    return domain in config.accepted_domain_set


def recipient_verdict(config: Config, address: str, token_valid: Callable[[str], bool]) -> RecipientVerdict:
    """I6: what the policy service says of one RCPT: `outside`, `accept`, `no_such_alias`, `forged_bounce`.

    Only addresses on the alias domains (and the allowed alias domains) are judged; with a
    fallback target every address there is accepted, since Odoo would route it to the fallback.
    """
    if not on_alias_domain(config, address):
        return "outside"
    token = bounce_token_of(config, address)
    if token is not None:
        return "accept" if token_valid(token) else "forged_bounce"
    if (is_catchall(config, address) or is_plain_bounce(config, address) or is_odoo_own_bounce(config, address)
            or alias_for_address(config, address)):
        return "accept"
    return "accept" if config.fallback_target else "no_such_alias"


def takes_inbound_role(config: Config, listener: str | None, envelope_sender: str, recipients: list[str]) -> bool:
    """I7: mail on an inbound listener, or a delivery report (null sender) to our bounce addresses.

    The second case is Postfix's own reports on mail it could not deliver upstream: they are
    made inside Postfix (non_smtpd_milters, `internal_mail_filter_classes = bounce`) and reach
    the milter on the submission side, but they are inbound reports all the same.
    """
    if listener in config.inbound_listeners:
        return True
    return (not envelope_sender and bool(recipients)
            and all(is_any_bounce_address(config, r) for r in recipients))
