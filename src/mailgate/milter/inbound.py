"""The inbound role: from gathered facts to the milter's verdict on one incoming message.

The decision is `mailgate.rules.inbound.decide_inbound`; this module runs it inside one store
transaction, so that the duplicate check, the loop counts and the row they lead to are atomic
even when several deliveries from the same sender arrive at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.infra.logfmt import kv_line
from mailgate.infra.runtime import Runtime
from mailgate.milter.bounce import BounceEffects, process_bounce
from mailgate.milter.facts import MessageFacts
from mailgate.rules.inbound import InboundDecision, decide_inbound
from mailgate.rules.message import InboundMessage
from mailgate.store import InboundRecord

ROUTE_HEADER = "X-Mailgate-Route"


@dataclass(frozen=True)
class InboundEffects:
    decision: InboundDecision
    route_header: str | None     # the X-Mailgate-Route value to add when delivering
    log_line: str
    bounce: BounceEffects | None = None
    unconfirmed_row: int | None = None  # the row to confirm once Postfix goes on (InboundRecord)


def inbound_message(facts: MessageFacts) -> InboundMessage:
    return InboundMessage(tuple(facts.headers), tuple(facts.recipients), facts.envelope_sender)


def process_inbound(runtime: Runtime, facts: MessageFacts, queue_id: str) -> InboundEffects:
    config, store = facts.config_for(runtime.config), runtime.store
    message = inbound_message(facts)
    now = runtime.clock()
    since = now - config.loop.minutes * 60
    # Across several gateways (PostgreSQL) the count and the row must be serialised per sender
    # and per Message-ID; SQLite's single writer already is.
    locks = [f"inbound:{message.sender}"] + ([f"msgid:{message.message_id}"] if message.message_id else [])
    with store.transaction(*locks):
        decision = decide_inbound(
            config, message,
            known_outbound=store.known_outbound,
            already_received=store.already_received,
            recent_count=lambda sender, key: store.recent_count(sender, key, since),
            verify_token=runtime.signer.verify)
        is_bounce = bool(decision.routes) and decision.routes[0].kind == "bounce"
        delivering = decision.action == "deliver"
        unconfirmed = None
        if not config.dry_run:
            counted = [r.key for r in decision.routes] if delivering else []
            row = store.record_inbound(InboundRecord(queue_id, message.message_id, message.sender,
                                                     ", ".join(decision.labels), decision.action, now,
                                                     confirmed=0 if delivering else 1), counted)
            unconfirmed = row if delivering else None
            if delivering and not is_bounce and message.sender:
                store.reset_bounces(message.sender, now)  # B2: the address is alive
    line = kv_line(queue_id, role="inbound", **{"from": facts.envelope_sender or None}, sender=message.sender,
                   rcpt=",".join(facts.recipients), routes=",".join(decision.labels) or None,
                   action=decision.action, reply=str(decision.reply) if decision.reply else None,
                   reason=decision.reasons[-1] if decision.reasons else None, dry_run=config.dry_run)
    header = ", ".join(decision.labels) if delivering else None
    bounce = None
    if delivering and is_bounce and not config.dry_run:
        bounce = process_bounce(runtime, config, facts, queue_id, decision.bounce_token)
    return InboundEffects(decision, header, line, bounce, unconfirmed)
