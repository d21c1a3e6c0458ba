"""O7: which upstream server a queued message leaves through, from its envelope sender alone.

Postfix asks at delivery time with the sender the milter set; a valid token names the server
without a database read, anything else is routed by the outbound rule applied to the sender.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.addresses import domain_of
from mailgate.config import Config, Server
from mailgate.outbound import route_sender
from mailgate.tokens import TokenSigner, server_tag, split_tokenised


@dataclass(frozen=True)
class Route:
    server: Server | None   # None: Postfix's default route
    reason: str             # null-sender | domain-key | token | token-default | rule | no-servers


def route_for_sender(config: Config, signer: TokenSigner, sender: str) -> Route:
    sender = sender.strip()
    if sender in ("", "<>"):
        return Route(None, "null-sender")
    if sender.startswith("@") or "@" not in sender:
        return Route(None, "domain-key")
    tokenised = split_tokenised(sender, config.bounce_alias)
    if tokenised and domain_of(sender) in config.alias_domain_set:
        token = signer.verify(tokenised[0])
        if token is not None:
            if token.server_tag == 0:
                return Route(None, "token-default")
            for server in config.active_servers:
                if server_tag(server.name) == token.server_tag:
                    return Route(server, "token")
    server = route_sender(config, sender)
    return Route(server, "rule" if server else "no-servers")
