"""Recording a batch: one `deliveries` row per attempt, the bounce records and blacklist rule fed
from Postfix's own bounces, and the log position after the batch, all in one transaction under
the locks of the position and of every address it touches. That is what makes a restart, a
crash or a second reader resume exactly where the last commit stood."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import replace

from mailgate.commands.watchlog.parsing import LogEvent
from mailgate.config import Config
from mailgate.infra.logfmt import kv_line
from mailgate.rules.addresses import normalize
from mailgate.rules.blacklist import DELIVERED_REASON, bounce_lock, clear_after_delivery, record_and_judge
from mailgate.rules.bounce_reasons import reason_and_hard
from mailgate.rules.reputation import alert_fields, alerts_after
from mailgate.rules.retention import EXPIRY_HORIZON
from mailgate.store.interface import BounceRecord, DeliveryRecord, Store

JOURNAL = "journal:postfix*"             # what the journal reader follows, as a log_positions key
CHUNK = 1 << 16                          # bytes read (and committed) per batch: a few hundred lines,
JOURNAL_BATCH = 300                      # so that PostgreSQL holds a few hundred advisory locks at most

Clock = Callable[[], float]
_RELAY = re.compile(r"(?P<host>[^\[\]]+)\[[^\]]*\](?::(?P<port>\d+))?", re.ASCII)


def position_key(source: str) -> str:
    """The log_positions row of a followed file (absolute path) or of the journal. The host name
    is part of it: gateways sharing one PostgreSQL store each follow their own /var/log/mail.log."""
    return f"{socket.gethostname()}:{source if source == JOURNAL else os.path.abspath(source)}"


def _relay_host_port(relay: str | None) -> tuple[str, int | None]:
    """`host[ip]:port` as (host, port); ("", None) for `none`, `local` or a pipe service."""
    found = _RELAY.fullmatch(relay or "")
    if found is None:
        return "", None
    return found["host"].lower(), int(found["port"]) if found["port"] else None


def derived_server(event: LogEvent, config: Config) -> str | None:
    """The upstream server of a message mailgate has no row for: a transport named `mg-NAME`
    in the relay (pipe-style) or the syslog tag (`-o syslog_name=postfix/mg-NAME`), else the one
    configured server whose host and port the relay names."""
    for part in [event.relay or "", *event.tag.split("/")[:-1]]:
        if part.startswith("mg-") and len(part) > 3:
            return part[3:]
    host, port = _relay_host_port(event.relay)
    names = {s.name for s in config.servers if s.host.lower().strip("[]") == host and s.port == port}
    return names.pop() if len(names) == 1 else None


def _permanent(dsn: str | None) -> bool | None:
    return {"5": True, "4": False}.get((dsn or " ")[0])


def _still_deferred(store: Store, event: LogEvent) -> list[LogEvent]:
    """The recipients whose last recorded attempt for this queue id was a deferral: the ones an
    expiry returns to the sender."""
    rows = store.deliveries_of(event.queue_id, event.at - EXPIRY_HORIZON)
    last = {row.recipient: row for row in rows}
    return [replace(event, recipient=r.recipient, dsn=r.dsn, reason=r.reason, relay=r.relay)
            for r in last.values() if r.status == "deferred"]


def record_event(store: Store, config: Config, event: LogEvent) -> list[tuple[int, str]]:
    """Write what one event means; returns (level, log line) pairs to emit once committed.
    Call inside `store.transaction(*lock_keys(...))`."""
    if event.recipient is None:
        return [line for each in _still_deferred(store, event) for line in record_event(store, config, each)]
    rcpt, qid = normalize(event.recipient), event.queue_id
    row = store.outbound_by_queue_id(qid)
    message = row.id if row else None
    server = (row.server if row else None) or derived_server(event, config)
    tokenised = bool(row and row.tokenised)
    delivery = store.record_delivery(DeliveryRecord(
        at=event.at, queue_id=qid, recipient=rcpt, relay=event.relay, status=event.status, dsn=event.dsn,
        delay=event.delay, reason=event.reason, message=message, server=server))
    lines = [(logging.DEBUG, kv_line(qid, role="delivery", rcpt=rcpt, status=event.status, dsn=event.dsn,
                                     relay=event.relay, server=server, message=message, tokenised=tokenised,
                                     delivery=delivery))]
    # A NULL flag is a row from before the flag existed: perhaps tokenised, so not counted here.
    if event.status in ("bounced", "expired") and row is not None and row.tokenised is False:
        permanent = _permanent(event.dsn)
        reason, hard = reason_and_hard(event.dsn, permanent, event.reason)
        outcome = record_and_judge(store, config.bounces, BounceRecord(
            created_at=event.at, recipient=rcpt, status=event.dsn, action="failed", permanent=permanent,
            reason=reason, reporting_mta=event.host, remote_mta=_relay_host_port(event.relay)[0] or None,
            message=message, server=server, source="postfix-log", diagnostic=event.reason, hard=hard), event.at)
        if outcome.repeat:   # B1: a message fails once per recipient (a report on it came first)
            lines.append((logging.INFO, kv_line(qid, role="bounce", rcpt=rcpt, status=event.dsn, message=message,
                                                source="postfix-log", action="ignored", reason="recorded already")))
            return lines
        lines.append((logging.INFO, kv_line(qid, role="bounce", rcpt=rcpt, status=event.dsn, permanent=permanent,
                                            message=message, server=server, source="postfix-log",
                                            bounce=outcome.bounce_id, blacklisted=outcome.blacklisted is not None,
                                            reason=reason, hard=hard)))
        lines += [(logging.WARNING, kv_line(qid, **alert_fields(alert)))
                  for alert in alerts_after(store, config.bounces, [reason], event.at)]
        if outcome.blacklisted:
            lines.append((logging.INFO, kv_line(qid, role="blacklist", rcpt=rcpt, action="add",
                                                reason=outcome.blacklisted)))
    elif event.status == "sent":
        cleared = clear_after_delivery(store, rcpt, event.at)
        if cleared.reset:
            lines.append((logging.INFO, kv_line(qid, role="bounce", rcpt=rcpt, action="reset",
                                                reason=DELIVERED_REASON)))
        if cleared.unblacklisted:
            lines.append((logging.INFO, kv_line(qid, role="blacklist", rcpt=rcpt, action="remove",
                                                reason=DELIVERED_REASON)))
    return lines


class Moved(Exception):
    """Another reader committed from the same position first: drop this batch and look again."""


def lock_keys(store: Store, key: str, events: list[LogEvent]) -> list[str]:
    """The transaction's locks: the log position (two readers of one log take turns) and the
    bounce lock of every address whose bounces or blacklist entry the batch may change."""
    addresses = {e.recipient for e in events if e.recipient is not None and e.status != "deferred"}
    addresses |= {d.recipient for e in events if e.recipient is None for d in _still_deferred(store, e)
                  if d.recipient is not None}
    return [f"log:{key}", *{bounce_lock(normalize(a)) for a in addresses}]


def commit(store: Store, config: Config, key: str, expected: tuple[int, int] | None, position: tuple[int, int],
           events: list[LogEvent], now: float, logger: logging.Logger) -> None:
    """The rows of a batch and the position after it, in one transaction."""
    lines: list[tuple[int, str]] = []
    with store.transaction(*lock_keys(store, key, events)):
        if store.log_position(key) != expected:
            raise Moved
        for event in events:
            lines += record_event(store, config, event)
        store.save_log_position(key, position[0], position[1], now)
    for level, line in lines:
        logger.log(level, line)
