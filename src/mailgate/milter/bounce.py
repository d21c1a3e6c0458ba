"""Delivery reports to our bounce addresses: parse, record, blacklist, pass on.

Reports reach here only through a route that has already checked the token (a forged or
foreign token is refused before this point). Every failed recipient becomes a row; the
blacklist rule runs for each counted one, in the same transaction as the rows it counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.bounceparse import BounceReport, parse_bounce
from mailgate.config import Config
from mailgate.infra.logfmt import kv_line
from mailgate.infra.runtime import Runtime
from mailgate.milter.facts import MessageFacts
from mailgate.rules.addresses import normalize
from mailgate.rules.blacklist import bounce_lock, record_and_judge
from mailgate.rules.bounces import ReportDestination, report_destination, token_is_stale
from mailgate.rules.classify import bounce_token_of
from mailgate.rules.tokens import BounceToken
from mailgate.store.interface import BounceRecord


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
    bounce address, or one recognised by its form alone)."""
    store = runtime.store
    report = parse_bounce(facts.raw_message(), bounce_alias=config.bounce_alias)
    now = runtime.clock()
    row = store.outbound_message(token.row_id) if token else None
    if row is None and report.original_message_id:
        row = store.outbound_by_message_id(report.original_message_id)
    stale = token is not None and token_is_stale(token, config.bounces, now)
    lines: list[str] = []
    with store.transaction(*(bounce_lock(normalize(r.address)) for r in report.recipients)):
        for failed in report.recipients:
            address = normalize(failed.address)
            outcome = record_and_judge(store, config.bounces, BounceRecord(
                created_at=now, recipient=address, status=failed.status, action=failed.action,
                permanent=failed.permanent, reason=failed.reason, reporting_mta=report.reporting_mta,
                remote_mta=failed.remote_mta, message=row.id if row else None,
                server=row.server if row else None, source=report.kind, stale=stale, matched=row is not None),
                now)
            lines.append(kv_line(queue_id, role="bounce", rcpt=address, status=failed.status,
                                 permanent=failed.permanent, message=row.id if row else None,
                                 server=row.server if row else None, stale=stale, bounce=outcome.bounce_id,
                                 blacklisted=outcome.blacklisted is not None))
            if outcome.blacklisted:
                lines.append(kv_line(queue_id, role="blacklist", rcpt=address, action="add",
                                     reason=outcome.blacklisted))
    original = row.envelope_from_original if row else None
    destination = report_destination(config, original)
    ours = tuple(r for r in facts.recipients if bounce_token_of(config, r) is not None)
    lines.append(kv_line(queue_id, role="bounce", report=report.kind, failed=len(report.recipients),
                         destination=destination, to=original if destination == "original" else None))
    return BounceEffects(report, destination, original if destination == "original" else None, ours, tuple(lines))
