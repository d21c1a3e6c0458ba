"""The policy service's RCPT check: is this recipient one of our aliases?

Refusing an unknown alias at RCPT time (550 5.1.1) tells the sender's server at once, instead
of accepting the mail and bouncing it later (backscatter). Recipients outside the alias
domains are none of our business here: DUNNO lets Postfix's other restrictions decide.
"""

from __future__ import annotations

from mailgate.inbound import recipient_verdict
from mailgate.logfmt import kv_line
from mailgate.policy.policyd import PolicyRequest
from mailgate.replies import POLICY
from mailgate.runtime import Runtime


class RecipientPolicy:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def __call__(self, request: PolicyRequest) -> str:
        if request.protocol_state.upper() != "RCPT" or not request.recipient:
            return POLICY["outside"]
        runtime = self.runtime
        verdict = recipient_verdict(runtime.config, request.recipient,
                                    lambda token: runtime.signer.verify(token) is not None)
        action = POLICY[verdict].format(address=request.recipient)
        if verdict not in ("outside", "accept"):
            runtime.logger.info(kv_line(request.queue_id or None, role="policy", **{"from": request.sender or None},
                                        rcpt=request.recipient, verdict=verdict, action=action,
                                        client=request.client_address or None))
            if runtime.config.dry_run:
                return POLICY["accept"]
        return action
