"""The outbound role: from gathered facts to the changes the milter applies.

The decision itself is `mailgate.rules.outbound.decide_outbound`; this module adds what needs the
runtime (the message row, the signed token) and says which milter actions follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.infra.logfmt import kv_line
from mailgate.infra.runtime import Runtime
from mailgate.milter.facts import MessageFacts
from mailgate.rules.addresses import folded_mailbox, normalize, parse_mailboxes, to_wire
from mailgate.rules.outbound import (
    OutboundDecision,
    OutboundRequest,
    decide_outbound,
    is_mass_mail,
    tokenised_address,
)
from mailgate.rules.replies import SmtpReply
from mailgate.store import OutboundRecord
from mailgate.store.groupcommit import OutboundWriter

STREAM_HEADER = "X-Mailgate-Stream"


@dataclass(frozen=True)
class OutboundEffects:
    decision: OutboundDecision
    new_header_from: str | None      # chgheader From, 1 (addheader when there is none), folded
    new_envelope: str | None         # chgfrom
    drop_stream_headers: int         # internal header removed before the message leaves
    row_id: int | None               # None: refused, nothing recorded
    log_line: str
    removed_recipients: tuple[str, ...] = ()   # blacklisted recipients of mass mail (delrcpt)
    discard: bool = False                      # mass mail left with no recipient
    blacklist_lines: tuple[str, ...] = ()
    drop_more_froms: int = 0                   # From headers 2.. deleted (docs/rules.md O5)
    add_header_from: bool = False              # the message had no From: new_header_from is added
    mass: bool = False                         # recognised as mass mail (docs/rules.md O2)

    @property
    def refusal(self) -> SmtpReply | None:
        return self.decision.reply


def process_outbound(runtime: Runtime, facts: MessageFacts, queue_id: str,
                     writer: OutboundWriter | None = None) -> OutboundEffects:
    """`writer`: the milter's group-commit writer (`mailgate.store.groupcommit`); without one
    (tests, tools) the row is written and the blacklist read here, in a transaction of their own."""
    config = facts.config_for(runtime.config)
    mass = is_mass_mail(config, facts.listener, facts.sasl_user, facts.headers)
    froms = facts.header_values("From")
    decision = decide_outbound(config, OutboundRequest(froms[0] if froms else None, facts.envelope_sender, mass,
                                                       tuple(froms[1:])))
    if decision.reply is not None:
        return _refused(facts, queue_id, decision, mass, config.dry_run)
    now = runtime.clock()
    record = OutboundRecord(
        queue_id=queue_id, message_id=facts.first_header("Message-ID"),
        envelope_from_original=facts.envelope_sender, envelope_from=decision.envelope_from,
        header_from_before=decision.original_from, header_from_after=decision.header_from,
        server=decision.server_name, mass=mass, listener=facts.listener, sasl_user=facts.sasl_user,
        created_at=now, tokenised=decision.envelope_is_bounce and bool(facts.envelope_sender),
        recipient_digests=runtime.signer.recipient_digests(facts.recipients))
    normalized = [normalize(r) for r in facts.recipients]
    if writer is not None:
        row_id, blocked = writer.record(record, normalized)
    else:
        row_id = runtime.store.record_outbound(record)
        blocked = runtime.store.blacklisted(normalized)
    if decision.envelope_is_bounce:
        token = runtime.signer.make(row_id, decision.server_name, now)
        wire = to_wire(tokenised_address(config, decision.envelope_from, token))
    else:
        wire = to_wire(decision.envelope_from)
    if not facts.envelope_sender:
        wire = ""  # RFC 5321 4.5.5: a report keeps its null sender, or reports could loop
    new_envelope = wire if wire and wire != facts.envelope_sender else None
    line = kv_line(queue_id, role="outbound", **{"from": facts.envelope_sender or None},
                   header_from=_address_of(decision.header_from), rewritten=decision.rewritten,
                   **_from_repairs(decision),
                   envelope=wire or None, server=decision.server_name, reason=decision.step, mass=mass,
                   listener=facts.listener, row=row_id,
                   domain=decision.alias_domain.name if decision.alias_domain else None,
                   domain_by=decision.domain_reason if decision.alias_domain else None, dry_run=config.dry_run)
    removed, blacklist_lines = _blacklisted(blocked, facts, queue_id, mass)
    new_from = decision.new_from
    return OutboundEffects(decision, folded_mailbox(new_from.name, new_from.address) if new_from else None,
                           new_envelope, len(facts.header_values(STREAM_HEADER)), row_id, line, removed,
                           bool(removed) and len(removed) == len(facts.recipients), blacklist_lines,
                           decision.removed_froms, new_from is not None and not froms, mass)


def _from_repairs(decision: OutboundDecision) -> dict[str, object]:
    """The log's `malformed_from=` (why the From was not one well-formed header) and
    `froms_removed=` (From headers deleted), only on the lines where they happened."""
    fields: dict[str, object] = {"malformed_from": decision.malformed, "froms_removed": decision.removed_froms}
    return {key: value for key, value in fields.items() if value}


def _refused(facts: MessageFacts, queue_id: str, decision: OutboundDecision, mass: bool,
             dry_run: bool) -> OutboundEffects:
    """docs/rules.md O5: a malformed From the server may not send for, and that is not replaced,
    refuses the message at end of data; nothing is recorded, the client's server tells the author."""
    reply = decision.reply
    assert reply is not None
    line = kv_line(queue_id, role="outbound", **{"from": facts.envelope_sender or None}, action="reject",
                   reply=f"{reply.code} {reply.status}", malformed_from=decision.malformed,
                   server=decision.server_name, reason=decision.step, mass=mass, listener=facts.listener,
                   dry_run=dry_run)
    return OutboundEffects(decision, None, None, 0, None, line, mass=mass)


def _blacklisted(blocked: set[str], facts: MessageFacts, queue_id: str,
                 mass: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Mass mail loses its blacklisted recipients; transactional mail is never blocked, only logged."""
    if not blocked:
        return (), ()
    hits = tuple(r for r in facts.recipients if normalize(r) in blocked)
    action = "removed" if mass else "logged"
    lines = tuple(kv_line(queue_id, role="blacklist", rcpt=r, action=action, mass=mass) for r in hits)
    if mass and len(hits) == len(facts.recipients):
        lines += (kv_line(queue_id, role="blacklist", action="discard", reason="no recipient left"),)
    return (hits if mass else ()), lines


def _address_of(header: str | None) -> str | None:
    boxes = parse_mailboxes(header)
    return ", ".join(b.address for b in boxes) if boxes else header
