"""The socketmap lookup service: Postfix's questions in, routes and credentials out.

Maps served:
- `transport` (sender_dependent_default_transport_maps): `mg-NAME:[host]:port` for the server
  the sender routes to, NOTFOUND for Postfix's default route.
- `delivery` (transport_maps): where accepted inbound mail for an alias-domain recipient goes,
  e.g. `mailgate-odoo:sales` (the pipe to Odoo) or the alias's own Postfix transport.
- `sasl-NAME` (smtp_sasl_password_maps of the server's transport): `user:password`, so that the
  password stays in its own file and never enters Postfix's configuration; for a server with
  `auth: xoauth2`, `user:<current access token>` (Cyrus's XOAUTH2 plugin sends the password as
  the bearer token), or TEMP while there is no usable token (docs/rules.md A1).

Answers are shared, immutable `SocketmapReply` objects made once per configuration (the socket
server keeps their wire form), so a lookup allocates nothing it does not have to.
"""

from __future__ import annotations

import logging
import time

from mailgate.config import Config, Server
from mailgate.infra.logfmt import kv_line
from mailgate.infra.metrics import LOOKUP_SECONDS
from mailgate.infra.runtime import Runtime
from mailgate.policy.socketmap import SocketmapReply
from mailgate.rules.delivery import delivery_transport
from mailgate.rules.replies import LOOKUP
from mailgate.rules.routing import PerConfig, route_for_sender

SASL_PREFIX = "sasl-"
NOTFOUND = SocketmapReply.notfound()
UNKNOWN_MAP = SocketmapReply.perm(LOOKUP["unknown_map"])
NO_ACCESS_TOKEN = SocketmapReply(*LOOKUP["no_access_token"].split(" ", 1))
DELIVERY_CACHE_SIZE = 4096
"""Recipients whose delivery answer is remembered: Postfix's resolver keeps only its last answer,
so the same alias addresses are asked for every message (a stream of unknown addresses only
restarts the cache)."""


class LookupAnswers:
    """One configuration's answers: the transport reply per server, the delivery replies seen."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.transport = {server.name: SocketmapReply.ok(server.transport) for server in config.servers}
        self.delivery: dict[str, SocketmapReply] = {}

    def delivery_reply(self, recipient: str) -> SocketmapReply:
        reply = self.delivery.get(recipient)
        if reply is None:
            transport = delivery_transport(self.config, recipient)
            reply = NOTFOUND if transport is None else SocketmapReply.ok(transport)
            if len(self.delivery) >= DELIVERY_CACHE_SIZE:
                self.delivery.clear()
            self.delivery[recipient] = reply
        return reply


lookup_answers: PerConfig[LookupAnswers] = PerConfig(LookupAnswers)


class LookupService:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.timers = {name: LOOKUP_SECONDS.child(name) for name in ("transport", "delivery")}
        self.sasl_timer, self.unknown_timer = LOOKUP_SECONDS.child("sasl"), LOOKUP_SECONDS.child("unknown")

    def __call__(self, mapname: str, key: str) -> SocketmapReply:
        start = time.perf_counter()
        try:
            return self.answer(mapname, key)
        finally:
            timer = self.timers.get(mapname) or (self.sasl_timer if mapname.startswith(SASL_PREFIX)
                                                 else self.unknown_timer)
            timer.observe(time.perf_counter() - start)

    def answer(self, mapname: str, key: str) -> SocketmapReply:
        runtime = self.runtime
        config = runtime.config
        if mapname == "transport":
            route = route_for_sender(config, runtime.signer, key)
            if runtime.logger.isEnabledFor(logging.DEBUG):
                runtime.logger.debug(kv_line(None, role="lookup", sender=key, reason=route.reason,
                                             server=route.server.name if route.server else None))
            if route.server is None:
                return NOTFOUND
            return lookup_answers(config).transport[route.server.name]
        if mapname == "delivery":
            return lookup_answers(config).delivery_reply(key)
        if mapname.startswith(SASL_PREFIX):
            server = config.server_named(mapname[len(SASL_PREFIX):])
            if server is not None and server.oauth is not None:
                return self._bearer(server)
            credentials = runtime.passwords.get(mapname[len(SASL_PREFIX):])
            if credentials is None:
                return NOTFOUND
            return SocketmapReply.ok(f"{credentials[0]}:{credentials[1]}")
        return UNKNOWN_MAP

    def _bearer(self, server: Server) -> SocketmapReply:
        """`user:token` for Cyrus's XOAUTH2 plugin; TEMP until the keeper holds a usable token."""
        token = self.runtime.tokens.current(server) if self.runtime.tokens is not None else None
        if token is None:
            return NO_ACCESS_TOKEN
        return SocketmapReply.ok(f"{server.username}:{token}")
