"""The policy service's RCPT checks: our aliases, the blacklist for mass mail, the daily quota.

Refusing an unknown alias at RCPT time (550 5.1.1) tells the sender's server at once, instead
of accepting the mail and bouncing it later (backscatter). Recipients outside the alias domains
are checked only for mail leaving the gateway: mass mail to a blacklisted address is refused
when the listener or SASL user already says it is mass mail, and every leaving recipient takes
one from the daily quota, atomically, so that concurrent connections cannot overshoot it.
"""

from __future__ import annotations

from mailgate.inbound import on_alias_domain, recipient_verdict
from mailgate.logfmt import kv_line
from mailgate.policy.policyd import PolicyRequest
from mailgate.quota import WINDOW, quota_allows, quota_key, quota_limit
from mailgate.replies import POLICY
from mailgate.runtime import Runtime

DUNNO = POLICY["outside"]


class GatewayPolicy:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, request: PolicyRequest) -> str:
        if request.protocol_state.upper() != "RCPT" or not request.recipient:
            return DUNNO
        runtime = self.runtime
        config = runtime.config
        recipient = request.recipient.lower()
        verdict = recipient_verdict(config, recipient, lambda token: runtime.signer.verify(token) is not None)
        if verdict not in ("outside", "accept"):
            return self._refuse(request, verdict)
        listener = request.get("policy_context") or ""
        if listener in config.inbound_listeners or on_alias_domain(config, recipient):
            return DUNNO
        mass = listener in config.mass_mail.listeners or (request.sasl_username or None) in config.mass_mail.sasl_users
        if mass and runtime.store.blacklisted([recipient]):
            return self._refuse(request, "blacklisted")
        return self._take_quota(request, mass)

    def _take_quota(self, request: PolicyRequest, mass: bool) -> str:
        runtime = self.runtime
        config = runtime.config
        key = quota_key(config, request.sender, request.sasl_username or None)
        limit = quota_limit(config, mass)
        if key is None or limit is None:
            return DUNNO
        stream = "mass" if mass else "transactional"
        now = runtime.clock()
        with runtime.store.transaction(f"quota:{key}:{stream}"):
            allowed = quota_allows(runtime.store.quota_count(key, stream, now - WINDOW), limit)
            if allowed and not config.dry_run:
                runtime.store.quota_take(key, stream, now)
        if allowed:
            return DUNNO
        return self._refuse(request, "quota_hold" if config.quota.action == "hold" else "quota_defer",
                            quota=key, stream=stream, limit=limit)

    def _refuse(self, request: PolicyRequest, verdict: str, **extra: object) -> str:
        runtime = self.runtime
        action = POLICY[verdict]
        runtime.logger.info(kv_line(request.queue_id or None, role="policy", **{"from": request.sender or None},
                                    rcpt=request.recipient, verdict=verdict, action=action,
                                    client=request.client_address or None, **extra, dry_run=runtime.config.dry_run))
        return DUNNO if runtime.config.dry_run else action
