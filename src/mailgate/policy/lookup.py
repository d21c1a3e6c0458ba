"""The socketmap lookup service: Postfix's questions in, routes and credentials out.

Maps served:
- `transport` (sender_dependent_default_transport_maps): `mg-NAME:[host]:port` for the server
  the sender routes to, NOTFOUND for Postfix's default route.
- `delivery` (transport_maps): where accepted inbound mail for an alias-domain recipient goes,
  e.g. `mailgate-odoo:sales` (the pipe to Odoo) or the alias's own Postfix transport.
- `sasl-NAME` (smtp_sasl_password_maps of the server's transport): `user:password`, so that the
  password stays in its own file and never enters Postfix's configuration.
"""

from __future__ import annotations

from mailgate.inbound import delivery_transport
from mailgate.logfmt import kv_line
from mailgate.policy.socketmap import SocketmapReply
from mailgate.replies import LOOKUP
from mailgate.routing import route_for_sender
from mailgate.runtime import Runtime

SASL_PREFIX = "sasl-"


class LookupService:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, mapname: str, key: str) -> SocketmapReply:
        runtime = self.runtime
        if mapname == "transport":
            route = route_for_sender(runtime.config, runtime.signer, key)
            if runtime.logger.isEnabledFor(10):
                runtime.logger.debug(kv_line(None, role="lookup", sender=key, reason=route.reason,
                                             server=route.server.name if route.server else None))
            if route.server is None:
                return SocketmapReply.notfound()
            return SocketmapReply.ok(route.server.transport)
        if mapname == "delivery":
            transport = delivery_transport(runtime.config, key)
            return SocketmapReply.notfound() if transport is None else SocketmapReply.ok(transport)
        if mapname.startswith(SASL_PREFIX):
            credentials = runtime.passwords.get(mapname[len(SASL_PREFIX):])
            if credentials is None:
                return SocketmapReply.notfound()
            return SocketmapReply.ok(f"{credentials[0]}:{credentials[1]}")
        return SocketmapReply.perm(LOOKUP["unknown_map"])
