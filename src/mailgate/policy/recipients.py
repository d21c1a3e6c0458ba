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

Only mail that is sent pays (docs/rules.md Q). What a transaction took stays pending until
Postfix's END-OF-MESSAGE request for it (`smtpd_end_of_data_restrictions`, same `instance`)
keeps it; a transaction that ends otherwise (RSET, QUIT, a refusal at DATA, a 4xx the client
will retry) is given back when Postfix tells so: by sending a request with another `instance`
on the same connection (SMTPD_POLICY_README: the previous delivery is then "either completed or
aborted"), or by closing the connection. A give-back is a decrement under the same lock as the
takes, in the batch's transaction, before its takes: exact across gateways. Should Postfix come
back with END-OF-MESSAGE for a transaction given back at a close (it reconnects when we closed
an idle connection), it is taken again. Claims stay taken when the service stops or crashes, or
when a give-back fails: the count errs towards too many, never too few.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Sequence

from mailgate.config import Config
from mailgate.infra.logfmt import TracebackStreak, kv_line
from mailgate.infra.metrics import POLICY_SECONDS, REFUSALS, bound, yes_no
from mailgate.infra.runtime import Runtime
from mailgate.policy.attributes import PolicyRequest
from mailgate.rules.classify import on_alias_domain, recipient_verdict
from mailgate.rules.quota import (
    WINDOW,
    QuotaClaim,
    quota_allows,
    quota_claim,
    quota_lock_key,
    recipients_to_give_back,
)
from mailgate.rules.replies import POLICY
from mailgate.store.interface import QuotaBatch, QuotaTake

DUNNO = POLICY["outside"]
POLICY_TIMER = POLICY_SECONDS.child()


END_OF_MESSAGE = "END-OF-MESSAGE"
REMEMBERED_CLOSES = 4096
"""Transactions given back at a connection's close, remembered in case Postfix finishes one of
them on a new connection; a few thousand cover every smtpd process of a busy gateway."""

Taken = Counter[tuple[str, str, float]]
"""Recipients taken, per counter (quota key, stream) and minute (its start, as a time)."""


class _Transaction:
    """One SMTP transaction's pending takes, on one policy connection."""

    __slots__ = ("instance", "taken")

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.taken: Taken = Counter()


def _locks(taken: Taken) -> tuple[str, ...]:
    """The lock keys of the counters in `taken`."""
    return tuple({quota_lock_key(key, stream) for key, stream, _ in taken})


def _takes(taken: Taken) -> tuple[QuotaTake, ...]:
    """`taken` as the store's (key, stream, at, recipients) rows."""
    return tuple((key, stream, minute, count) for (key, stream, minute), count in taken.items())


class GatewayPolicy:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._open: dict[int, _Transaction] = {}
        """Per policy connection, its current transaction (requests without a connection, e.g. a
        direct call, keep what they take at once)."""
        self._closed: OrderedDict[str, Taken] = OrderedDict()
        self._failures = TracebackStreak()

    def __call__(self, request: PolicyRequest) -> str:
        return self.answer_all([request])[0]

    def answer_all(self, requests: Sequence[PolicyRequest]) -> list[str]:
        """The action for each request; the batch's give-backs and quota claims in one transaction.
        Each request's answer took the batch's time (mailgate_policy_answer_seconds)."""
        start = time.perf_counter()
        try:
            return self._answer_all(requests)
        finally:
            elapsed = time.perf_counter() - start
            for _ in requests:
                POLICY_TIMER.observe(elapsed)

    def _answer_all(self, requests: Sequence[PolicyRequest]) -> list[str]:
        config = self.runtime.config
        actions: list[str] = []
        claims: list[tuple[int, PolicyRequest, QuotaClaim]] = []
        owners: list[_Transaction | None] = []
        give_back: Taken = Counter()
        retake: Taken = Counter()
        for request in requests:
            transaction = self._follow(request, give_back, retake) if request.connection else None
            outcome = self._screen(config, request)
            if isinstance(outcome, QuotaClaim):
                claims.append((len(actions), request, outcome))
                owners.append(transaction)
                actions.append(DUNNO)
            else:
                actions.append(outcome)
        if claims or give_back or retake:
            now = self.runtime.clock()
            try:
                granted = self._take_quota(config, [claim for _, _, claim in claims], now, give_back, retake)
            except Exception as exc:  # the store failed (locked past its busy timeout, gone, ...)
                return self._defer_claims(actions, claims, exc, give_back)
            self._failures.succeeded()
            minute = now // 60 * 60
            for (index, request, claim), allowed, owner in zip(claims, granted, owners, strict=True):
                if not allowed:
                    actions[index] = self._refuse(
                        request, "quota_hold" if config.quota.action == "hold" else "quota_defer",
                        quota=claim.key, stream=claim.stream, limit=claim.limit)
                elif owner is not None and not config.dry_run:
                    owner.taken[(claim.key, claim.stream, minute)] += 1
        return actions

    def connection_closed(self, connection: int) -> None:
        """Postfix closed a policy connection (or we closed an idle one): its transaction, if it
        had not reached END-OF-MESSAGE, is over, and what it took is given back."""
        transaction = self._open.pop(connection, None)
        if transaction is None or not transaction.taken:
            return
        self._closed[transaction.instance] = transaction.taken
        while len(self._closed) > REMEMBERED_CLOSES:
            self._closed.popitem(last=False)
        self._log_returned(transaction.instance, transaction.taken, "connection_closed")
        try:
            self.runtime.store.quota_batch(QuotaBatch(_locks(transaction.taken), give_backs=_takes(transaction.taken)))
        except Exception as exc:
            self._log_give_back_failure(exc, transaction.taken)

    def _follow(self, request: PolicyRequest, give_back: Taken, retake: Taken) -> _Transaction:
        """The request's transaction on its connection. A new `instance` ends the one before
        (its pending takes go to `give_back`); END-OF-MESSAGE keeps the takes, but for the
        recipients Postfix refused after taking them, and takes again what a close gave back."""
        instance = request.instance
        transaction = self._open.get(request.connection)
        if transaction is None or transaction.instance != instance:
            if transaction is not None and transaction.taken:
                give_back.update(transaction.taken)
                self._log_returned(transaction.instance, transaction.taken, "new_transaction")
            transaction = self._open[request.connection] = _Transaction(instance)
        if request.protocol_state.upper() == END_OF_MESSAGE:
            pending = transaction.taken
            returned_at_close = self._closed.pop(instance, None) if self._closed else None
            if returned_at_close:
                retake.update(returned_at_close)
                pending = pending + returned_at_close
            accepted = request.recipient_count  # 0: not sent (a client older than Postfix 2.3): keep all
            excess = recipients_to_give_back(sum(pending.values()), accepted) if accepted else 0
            if excess:
                refused: Taken = Counter()
                for counter, count in pending.items():
                    refused[counter] = min(excess, count)
                    excess -= refused[counter]
                    if not excess:
                        break
                give_back.update(refused)
                self._log_returned(instance, refused, "refused_after_rcpt")
            transaction.taken = Counter()
        return transaction

    def _log_returned(self, instance: str, taken: Taken, reason: str) -> None:
        """One line per counter a transaction gives back: what the operator sees of a retry."""
        for (key, stream, _), count in taken.items():
            self.runtime.logger.info(kv_line(None, role="policy", event="quota_returned", quota=key, stream=stream,
                                             recipients=count, reason=reason, instance=instance))

    def _log_give_back_failure(self, exc: Exception, taken: Taken) -> None:
        """One line: the recipients stay taken (too many counted, never too few)."""
        self.runtime.logger.error(kv_line(None, role="error", event="quota_return", error=type(exc).__name__,
                                          detail=str(exc), recipients=sum(taken.values()), kept=True))

    def _defer_claims(self, actions: list[str], claims: list[tuple[int, PolicyRequest, QuotaClaim]],
                      exc: Exception, give_back: Taken) -> list[str]:
        """Defer the requests whose quota could not be taken; the others keep their answers.

        A failure to take the quota is the store's, the same for every claim of the batch:
        answering them again one by one would only wait for the same lock once more per claim
        (a batch of n behind a held lock would take n + 1 busy timeouts instead of one)."""
        self.runtime.logger.error(kv_line(None, role="error", event="quota", error=type(exc).__name__,
                                          detail=str(exc), claims=len(claims)),
                                  exc_info=self._failures.first(exc))  # which statement failed, once a streak
        if give_back:
            self._log_give_back_failure(exc, give_back)
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

    def _take_quota(self, config: Config, claims: list[QuotaClaim], now: float,
                    give_back: Taken, retake: Taken) -> list[bool]:
        """Whether each claim is within its limit; those that are, are taken. One store call, one
        transaction holding every counter's lock (`QuotaBatch`): what ended transactions give back
        goes first (a client's retry then finds the room its aborted attempt took), each counter is
        counted once and taken once with what its claims take; here each claim is judged in turn
        from its counter's count, the claims before it taken (on PostgreSQL the whole batch is one
        round trip the event loop waits for)."""
        wanted: Counter[tuple[str, str]] = Counter()
        limits: dict[tuple[str, str], int] = {}
        for claim in claims:
            wanted[(claim.key, claim.stream)] += 0 if config.dry_run else 1
            limits[(claim.key, claim.stream)] = claim.limit
        locks = _locks(give_back) + _locks(retake) + tuple({claim.lock_key for claim in claims})
        counts = self.runtime.store.quota_batch(QuotaBatch(
            locks, give_backs=_takes(give_back), retakes=_takes(retake),
            claims=tuple((key, stream, wanted[(key, stream)], limit) for (key, stream), limit in limits.items()),
            at=now, since=now - WINDOW))
        granted: list[bool] = []
        for claim in claims:
            counter = (claim.key, claim.stream)
            allowed = quota_allows(counts[counter], claim.limit)
            if allowed and not config.dry_run:
                counts[counter] += 1
            granted.append(allowed)
        return granted

    def _refuse(self, request: PolicyRequest, verdict: str, **extra: object) -> str:
        action = self._log_verdict(request, verdict, **extra)
        return DUNNO if self.runtime.config.dry_run else action

    def _log_verdict(self, request: PolicyRequest, verdict: str, **extra: object) -> str:
        """One `role=policy` line for a recipient not simply let through; returns the action."""
        runtime = self.runtime
        action = POLICY[verdict]
        bound(REFUSALS, "rcpt", verdict, yes_no(runtime.config.dry_run)).inc()
        runtime.logger.info(kv_line(request.queue_id or None, role="policy", **{"from": request.sender or None},
                                    rcpt=request.recipient, verdict=verdict, action=action,
                                    client=request.client_address or None, **extra, dry_run=runtime.config.dry_run))
        return action
