"""Delivery reports to our bounce addresses: parse, record, blacklist, pass on.

Reports reach here only through a route that has already checked the token (a forged or
foreign token is refused before this point). A report's address is in the Return-Path every
recipient of a message sees, so anyone can send one and list whom they like: a failed recipient
is written only when the message it is tied to was sent to it, once per message and recipient
(docs/rules.md B1); the rest is counted in one summary line. The blacklist rule runs for each
counted one, in the same transaction as the rows it counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.bounceparse import BounceReport, parse_bounce
from mailgate.config import Config
from mailgate.infra.logfmt import kv_line
from mailgate.infra.metrics import BOUNCES, REPUTATION_ALERTS, bounce_labels, bound
from mailgate.infra.runtime import Runtime
from mailgate.milter.facts import MessageFacts
from mailgate.rules.addresses import normalize
from mailgate.rules.blacklist import bounce_lock, record_and_judge
from mailgate.rules.bounces import ReportDestination, report_destination, screen_failed, token_is_stale
from mailgate.rules.classify import bounce_token_of, is_odoo_own_bounce, report_bounce_alias
from mailgate.rules.reputation import alert_fields, alerts_after
from mailgate.rules.tokens import BounceToken
from mailgate.store.interface import BounceRecord, StoredOutbound


@dataclass(frozen=True)
class BounceEffects:
    report: BounceReport
    destination: ReportDestination
    original: str | None          # Odoo's own bounce address, when the report goes back to it
    bounce_recipients: tuple[str, ...]   # our bounce addresses among the envelope recipients
    log_lines: tuple[str, ...]


def process_bounce(runtime: Runtime, config: Config, facts: MessageFacts, queue_id: str,
                   token: BounceToken | None) -> BounceEffects:
    """`token`: the bounce token the inbound decision verified (None for a report to the plain
    bounce address or to Odoo's own pre-token form, or one recognised by its form alone)."""
    store = runtime.store
    report = parse_bounce(facts.raw_message(), bounce_alias=report_bounce_alias(config, facts.recipients))
    now = runtime.clock()
    # Odoo's own form names a mail.mail of Odoo's, sent before the cut-over: no row of ours.
    to_odoo_own = token is None and any(is_odoo_own_bounce(config, r) for r in facts.recipients)
    row = store.outbound_message(token.row_id) if token else None
    if row is None and report.original_message_id and not to_odoo_own:
        row = store.outbound_by_message_id(report.original_message_id)
    stale = token is not None and token_is_stale(token, config.bounces, now)
    addresses = [normalize(failed.address) for failed in report.recipients]
    known = row.recipient_count if row else None   # None: no row, or one from before recipients were kept
    screen = screen_failed(addresses, known, lambda candidates: _sent_to(runtime, row, candidates))
    lines: list[str] = []
    recorded: list[str] = []
    written = repeats = 0
    counted: list[tuple[str, str]] = []   # counted once the transaction has committed
    with store.transaction(*(bounce_lock(addresses[i]) for i in screen.recorded)):
        for index in screen.recorded:
            failed, address = report.recipients[index], addresses[index]
            record = BounceRecord(
                created_at=now, recipient=address, status=failed.status, action=failed.action,
                permanent=failed.permanent, reason=failed.reason, reporting_mta=report.reporting_mta,
                remote_mta=failed.remote_mta, message=row.id if row else None,
                server=row.server if row else None, source=report.kind, stale=stale, matched=known is not None,
                diagnostic=failed.diagnostic, hard=failed.hard)
            outcome = record_and_judge(store, config.bounces, record, now)
            if outcome.repeat:
                repeats += 1
                continue
            written += 1
            counted.append(bounce_labels(record))
            recorded.append(failed.reason)
            lines.append(kv_line(queue_id, role="bounce", rcpt=address, status=failed.status,
                                 permanent=failed.permanent, message=row.id if row else None,
                                 server=row.server if row else None, stale=stale, bounce=outcome.bounce_id,
                                 blacklisted=outcome.blacklisted is not None, reason=failed.reason,
                                 hard=failed.hard))
            if outcome.blacklisted:
                lines.append(kv_line(queue_id, role="blacklist", rcpt=address, action="add",
                                     reason=outcome.blacklisted))
        alerts = alerts_after(store, config.bounces, recorded, now)
        lines += [kv_line(queue_id, **alert_fields(alert)) for alert in alerts]
    for labels in counted:
        bound(BOUNCES, *labels).inc()
    for alert in alerts:
        bound(REPUTATION_ALERTS, alert.server, alert.domain, alert.reason).inc()
    original = row.envelope_from_original if row else None
    destination = report_destination(config, original, to_odoo_own)
    ours = tuple(r for r in facts.recipients if bounce_token_of(config, r) is not None)
    ignored = screen.not_recipients + screen.repeated + screen.over_limit + repeats
    why: dict[str, object] = {"not_recipients": screen.not_recipients, "repeated": screen.repeated + repeats,
                              "over_limit": screen.over_limit} if ignored else {}
    if to_odoo_own:
        why["odoo_own"] = True
    lines.append(kv_line(queue_id, role="bounce", report=report.kind, failed=len(report.recipients),
                         recorded=written, ignored=ignored, **why,
                         destination=destination, to=original if destination == "original" else None))
    return BounceEffects(report, destination, original if destination == "original" else None, ours, tuple(lines))


def _sent_to(runtime: Runtime, row: StoredOutbound | None, addresses: list[str]) -> set[str]:
    """Those of the addresses the message was sent to (its recipients are kept as digests)."""
    if row is None:
        return set()
    digests = {runtime.signer.recipient_digest(address): address for address in addresses}
    return {digests[digest] for digest in runtime.store.sent_to(row.id, list(digests))}
