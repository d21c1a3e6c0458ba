"""docs/rules.md O7: which upstream server a queued message leaves through, from its envelope sender alone.

Postfix asks at delivery time with the sender the milter set; a valid token names the server
without a database read, anything else is routed by the outbound rule applied to the sender.

qmgr asks once per message, so this is the lookup service's hot path: everything that depends
on the configuration alone (which server a token's tag names, the alias domains, the answer for
a sender without a token) is computed once per `Config` object and reused until a reload swaps
the object (`PerConfig`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from mailgate.config import Config, Server
from mailgate.rules.outbound import route_sender
from mailgate.rules.tokens import TokenSigner, server_tag, split_tokenised

View = TypeVar("View")
RouteReason = Literal["null-sender", "domain-key", "token", "token-default", "rule", "no-servers"]

PLAIN_ROUTE_CACHE_SIZE = 4096
"""Senders without a token whose route is remembered: Odoo's few sending addresses, not a
stranger's stream of made-up ones (the cache starts over when full)."""


class PerConfig(Generic[View]):
    """`build(config)` computed once per configuration object and reused while it is current.

    Keyed by identity, not equality: comparing or hashing a whole `Config` would cost more
    than the views save, and a reload always makes a new object. The last few objects are
    kept (a test or a tool may hold two configurations at once); the views of a replaced
    configuration are dropped once it falls out of the list.
    """

    KEEP = 4

    def __init__(self, build: Callable[[Config], View]) -> None:
        self._build = build
        self._entries: list[tuple[Config, View]] = []
        self._lock = threading.Lock()
        self.__doc__ = build.__doc__

    def __call__(self, config: Config) -> View:
        entries = self._entries
        if entries and entries[0][0] is config:
            return entries[0][1]
        with self._lock:
            for held, view in self._entries:
                if held is config:
                    return view
            view = self._build(config)
            self._entries = [(config, view), *self._entries[: self.KEEP - 1]]
            return view


@dataclass(frozen=True)
class Route:
    server: Server | None   # None: Postfix's default route
    reason: RouteReason


NULL_SENDER = Route(None, "null-sender")
DOMAIN_KEY = Route(None, "domain-key")
TOKEN_DEFAULT = Route(None, "token-default")
NO_SERVERS = Route(None, "no-servers")


class RoutingView:
    """What routing needs from one configuration, precomputed: routes are shared, immutable
    objects, so a lookup allocates nothing."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Tags are 32-bit hashes: on the (unlikely) collision of two active servers the first
        # in Odoo's order wins, as the old linear search did.
        self.token_routes: dict[int, Route] = {}
        for server in config.active_servers:
            self.token_routes.setdefault(server_tag(server.name), Route(server, "token"))
        self.plain_routes: dict[str, Route] = {}

    def rule_route(self, sender: str) -> Route:
        """The outbound rule for a sender without a (valid) token."""
        server = route_sender(self.config, sender)
        return Route(server, "rule") if server is not None else NO_SERVERS


routing_view: PerConfig[RoutingView] = PerConfig(RoutingView)


def route_for_sender(config: Config, signer: TokenSigner, sender: str) -> Route:
    view = routing_view(config)
    known = view.plain_routes.get(sender)
    if known is not None:
        return known
    address = sender.strip()
    if address in ("", "<>"):
        return NULL_SENDER
    if address.startswith("@") or "@" not in address:
        return DOMAIN_KEY
    _, _, domain = address.rpartition("@")
    alias_domain = config.domain_named(domain)
    tokenised = split_tokenised(address, alias_domain.bounce_alias) if alias_domain else None
    if tokenised is None:
        # No token: the answer depends on the configuration alone, and the same few senders
        # come back all day.
        route = view.rule_route(address)
        plain = view.plain_routes
        if len(plain) >= PLAIN_ROUTE_CACHE_SIZE:
            plain.clear()
        plain[sender] = route
        return route
    token = signer.verify(tokenised[0])
    if token is not None:
        if token.server_tag == 0:
            return TOKEN_DEFAULT
        token_route = view.token_routes.get(token.server_tag)
        if token_route is not None:
            return token_route
    return view.rule_route(address)
