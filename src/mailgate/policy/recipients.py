"""The policy service's RCPT checks: our aliases, the blacklist for mass mail, the daily quota.

Refusing an unknown alias at RCPT time (550 5.1.1) tells the sender's server at once, instead
of accepting the mail and bouncing it later (backscatter). Recipients outside the alias domains
are checked only for mail leaving the gateway: mass mail to a blacklisted address is refused
when the listener or SASL user already says it is mass mail, and every leaving recipient takes
one from the daily quota, atomically, so that concurrent connections cannot overshoot it.

The quota is the only write, one per leaving recipient. The policy server hands `answer_all`
every request that arrived in one turn of its event loop, and their claims are counted and
taken in one transaction (in arrival order, so each claim sees the ones before it): the same
exact count as a transaction per recipient, for one commit per turn instead of one per
recipient.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from mailgate.config import Config
from mailgate.infra.logfmt import kv_line
from mailgate.infra.runtime import Runtime
from mailgate.policy.attributes import PolicyRequest
from mailgate.rules.classify import on_alias_domain, recipient_verdict
from mailgate.rules.quota import WINDOW, QuotaClaim, quota_allows, quota_claim
from mailgate.rules.replies import POLICY

DUNNO = POLICY["outside"]


class GatewayPolicy:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, request: PolicyRequest) -> str:
        return self.answer_all([request])[0]

    def answer_all(self, requests: Sequence[PolicyRequest]) -> list[str]:
        """The action for each request, the quota claims among them in one transaction."""
        config = self.runtime.config
        actions: list[str] = []
        claims: list[tuple[int, PolicyRequest, QuotaClaim]] = []
        for request in requests:
            outcome = self._screen(config, request)
            if isinstance(outcome, QuotaClaim):
                claims.append((len(actions), request, outcome))
                actions.append(DUNNO)
            else:
                actions.append(outcome)
        if claims:
            try:
                granted = self._take_quota(config, [claim for _, _, claim in claims])
            except Exception as exc:  # the store failed (locked past its busy timeout, gone, ...)
                return self._defer_claims(actions, claims, exc)
            for (index, request, claim), allowed in zip(claims, granted, strict=True):
                if not allowed:
                    actions[index] = self._refuse(
                        request, "quota_hold" if config.quota.action == "hold" else "quota_defer",
                        quota=claim.key, stream=claim.stream, limit=claim.limit)
        return actions

    def _defer_claims(self, actions: list[str], claims: list[tuple[int, PolicyRequest, QuotaClaim]],
                      exc: Exception) -> list[str]:
        """Defer the requests whose quota could not be taken; the others keep their answers.

        A failure to take the quota is the store's, the same for every claim of the batch:
        answering them again one by one would only wait for the same lock once more per claim
        (a batch of n behind a held lock would take n + 1 busy timeouts instead of one)."""
        self.runtime.logger.error(kv_line(None, role="error", event="quota", error=type(exc).__name__,
                                          detail=str(exc), claims=len(claims)),
                                  exc_info=True)  # the traceback: which statement failed
        for index, request, _ in claims:
            actions[index] = self._log_verdict(request, "internal_error")
        return actions

    def _screen(self, config: Config, request: PolicyRequest) -> str | QuotaClaim:
        """Every check before the quota: the action when one decides, else the quota claim."""
        if request.protocol_state.upper() != "RCPT" or not request.recipient:
            return DUNNO
        runtime = self.runtime
        recipient = request.recipient.lower()
        verdict = recipient_verdict(config, recipient, lambda token: runtime.signer.verify(token) is not None)
        if verdict not in ("outside", "accept"):
            return self._refuse(request, verdict)
        listener = request.get("policy_context") or ""
        if listener in config.inbound_listeners or on_alias_domain(config, recipient):
            return DUNNO
        sasl_user = request.sasl_username or None
        mass = listener in config.mass_mail.listeners or sasl_user in config.mass_mail.sasl_users
        if mass and runtime.store.blacklisted([recipient]):
            return self._refuse(request, "blacklisted")
        claim = quota_claim(config, request.sender, sasl_user, mass)
        return DUNNO if claim is None else claim

    def _take_quota(self, config: Config, claims: list[QuotaClaim]) -> list[bool]:
        """Whether each claim is within its limit; those that are, are taken. One transaction
        holding every claim's lock: each counter is read once and followed in process for the
        claims after it, and written once with what the batch took from it."""
        store = self.runtime.store
        now = self.runtime.clock()
        counts: dict[tuple[str, str], int] = {}
        taken: Counter[tuple[str, str]] = Counter()
        granted: list[bool] = []
        with store.transaction(*{claim.lock_key for claim in claims}):
            for claim in claims:
                counter = (claim.key, claim.stream)
                if counter not in counts:
                    counts[counter] = store.quota_count(claim.key, claim.stream, now - WINDOW)
                allowed = quota_allows(counts[counter], claim.limit)
                if allowed and not config.dry_run:
                    counts[counter] += 1
                    taken[counter] += 1
                granted.append(allowed)
            for (key, stream), count in taken.items():
                store.quota_take(key, stream, now, count)
        return granted

    def _refuse(self, request: PolicyRequest, verdict: str, **extra: object) -> str:
        action = self._log_verdict(request, verdict, **extra)
        return DUNNO if self.runtime.config.dry_run else action

    def _log_verdict(self, request: PolicyRequest, verdict: str, **extra: object) -> str:
        """One `role=policy` line for a recipient not simply let through; returns the action."""
        runtime = self.runtime
        action = POLICY[verdict]
        runtime.logger.info(kv_line(request.queue_id or None, role="policy", **{"from": request.sender or None},
                                    rcpt=request.recipient, verdict=verdict, action=action,
                                    client=request.client_address or None, **extra, dry_run=runtime.config.dry_run))
        return action
