"""`mailgate watch-log`: delivery results from Postfix's own log.

The milter sees a message leave mailgate; only Postfix knows whether the upstream server took
it. This reader follows Postfix's log (a file, or journald), records one `deliveries` row per
`status=` line, joined to the outbound message by queue id, and feeds Postfix's own bounces of
untokenised messages into the bounce records and the blacklist rule. (A tokenised message's
report comes back to our bounce address and is recorded by the milter: counting it here too
would count it twice.) A successful delivery clears the address's bounces and the rule's
blacklist entry.

Every batch of rows is committed together with the log position it reached, so a restart, a
crash or a second reader resumes exactly where the last commit stood: no line is counted twice
and none is skipped, across rotation too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable

from mailgate.addresses import normalize
from mailgate.bouncerecord import DELIVERED_REASON, bounce_lock, clear_after_delivery, record_and_judge
from mailgate.config import Config
from mailgate.logfmt import kv_line, setup_logging
from mailgate.store import open_store
from mailgate.store.records import BounceRecord, DeliveryRecord, Store

DEFAULT_LOG = "/var/log/mail.log"        # Debian's rsyslog file for the mail facility
JOURNAL = "journal:postfix*"             # what the journal reader follows, as a log_positions key
CHUNK = 1 << 16                          # bytes read (and committed) per batch: a few hundred lines,
JOURNAL_BATCH = 300                      # so that PostgreSQL holds a few hundred advisory locks at most
EXPIRY_HORIZON = 30 * 86400.0            # a queue id's deferrals older than this belong to another message

Clock = Callable[[], float]
_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), start=1)}
_SYSLOG = re.compile(r"(?P<mon>[A-Z][a-z]{2}) {1,2}(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d)(?P<frac>\.\d{1,9})? ",
                     re.ASCII)
_ISO = re.compile(r"(?P<date>\d{4}-\d\d-\d\d)[T ](?P<hms>\d\d:\d\d:\d\d)(?P<frac>\.\d{1,9})?"
                  r"(?P<tz>Z|[+-]\d\d(?::?\d\d)?)? ", re.ASCII)
_HOST_TAG = re.compile(r"(?P<host>\S+) (?P<tag>[^\s\[\]/]+(?:/[^\s\[\]/]+)+)\[\d+\]: (?P<message>.*)", re.ASCII)
_DELIVERY = re.compile(
    r"(?P<qid>[0-9A-Za-z]+): to=<(?P<to>.*?)>,(?: orig_to=<(?P<orig>.*?)>,)? relay=(?P<relay>[^,\s]+),"
    r"(?P<fields>(?: [a-z_]+=[^,\s]*,)*) dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), "
    r"status=(?P<status>sent|deferred|bounced|expired)(?: \((?P<reason>.*)\)|, .*)?", re.ASCII)
_EXPIRED = re.compile(r"(?P<qid>[0-9A-Za-z]+): from=<(?P<from>.*?)>, status=expired, returned to sender", re.ASCII)
_DELAY = re.compile(r" delay=(\d+(?:\.\d+)?),", re.ASCII)
_RELAY = re.compile(r"(?P<host>[^\[\]]+)\[[^\]]*\](?::(?P<port>\d+))?", re.ASCII)


def position_key(source: str) -> str:
    """The log_positions row of a followed file (absolute path) or of the journal. The host name
    is part of it: gateways sharing one PostgreSQL store each follow their own /var/log/mail.log."""
    return f"{socket.gethostname()}:{source if source == JOURNAL else os.path.abspath(source)}"


@dataclass(frozen=True)
class LogEvent:
    """One delivery result Postfix logged. `recipient` is None on qmgr's per-message line
    `QID: from=<…>, status=expired, returned to sender`: which recipients expired is known only
    from their earlier deferrals."""

    at: float
    host: str
    tag: str                     # syslog tag: postfix/smtp, postfix/mg-transactional/smtp, ...
    queue_id: str
    status: str                  # sent | deferred | bounced | expired
    recipient: str | None
    orig_to: str | None = None
    relay: str | None = None     # host[ip]:port, none, local, or a pipe service's name
    delay: float | None = None
    dsn: str | None = None
    reason: str | None = None
    sender: str | None = None


# -- parsing -------------------------------------------------------------------------------------

def _stamp(head: re.Match[str], year: int) -> float | None:
    """Seconds since the epoch; a stamp without a zone is the local time of the machine that wrote
    it (syslog's and Postfix's own `maillog_file` format carry neither year nor zone)."""
    frac = float(head["frac"] or 0)
    try:
        if "mon" in head.re.groupindex:
            month = _MONTHS.get(head["mon"])
            if month is None:
                return None
            moment = datetime.strptime(f"{year:04d}-{month:02d}-{int(head['day']):02d} {head['hms']}",
                                       "%Y-%m-%d %H:%M:%S")
            return time.mktime(moment.timetuple()) + frac
        moment = datetime.strptime(f"{head['date']} {head['hms']}", "%Y-%m-%d %H:%M:%S")
        zone = head["tz"]
        if not zone:
            return time.mktime(moment.timetuple()) + frac
        if zone == "Z":
            offset = timedelta(0)
        else:
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0)) * (-1 if zone[0] == "-" else 1)
        return moment.replace(tzinfo=timezone(offset)).timestamp() + frac
    except (ValueError, OverflowError):
        return None


def parse_message(message: str, at: float, host: str, tag: str) -> LogEvent | None:
    """The event in one log message (the part after `tag[pid]: `), or None if it is not one."""
    if (found := _DELIVERY.fullmatch(message)) is not None:
        delay = _DELAY.search(found["fields"] + ",")
        return LogEvent(at=at, host=host, tag=tag, queue_id=found["qid"], status=found["status"],
                        recipient=found["to"], orig_to=found["orig"], relay=found["relay"],
                        delay=float(delay.group(1)) if delay else None, dsn=found["dsn"], reason=found["reason"])
    if (found := _EXPIRED.fullmatch(message)) is not None:
        return LogEvent(at=at, host=host, tag=tag, queue_id=found["qid"], status="expired", recipient=None,
                        sender=found["from"])
    return None


def parse_line(line: str, year: int) -> LogEvent | None:
    """One log line in syslog (`Nov 25 22:13:00 host postfix/smtp[1]: …`, also Postfix's own
    `maillog_file`) or RFC 3339 form (`2026-11-25T22:13:00.123456+00:00 host …`, journalctl's
    short-iso); `year` completes syslog stamps. Anything else is None, never an exception."""
    line = line.rstrip("\r\n")
    head = _SYSLOG.match(line) or _ISO.match(line)
    if head is None:
        return None
    rest = _HOST_TAG.fullmatch(line, head.end())
    if rest is None:
        return None
    at = _stamp(head, year)
    if at is None:
        return None
    return parse_message(rest["message"], at, rest["host"], rest["tag"])


def _parse_current(line: str, now: float) -> LogEvent | None:
    """A syslog stamp has no year: take this year's, or last year's if that would lie in the future
    (December's lines read in January)."""
    year = time.localtime(now).tm_year
    event = parse_line(line, year)
    if event is not None and event.at > now + 2 * 86400 and _SYSLOG.match(line):
        event = parse_line(line, year - 1)
    return event


# -- recording -----------------------------------------------------------------------------------

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
    last = {row["recipient"]: row for row in rows}
    return [replace(event, recipient=r["recipient"], dsn=r["dsn"], reason=r["reason"], relay=r["relay"])
            for r in last.values() if r["status"] == "deferred"]


def record_event(store: Store, config: Config, event: LogEvent) -> list[tuple[int, str]]:
    """Write what one event means; returns (level, log line) pairs to emit once committed.
    Call inside `store.transaction(*lock_keys(...))`."""
    if event.recipient is None:
        return [line for each in _still_deferred(store, event) for line in record_event(store, config, each)]
    rcpt, qid = normalize(event.recipient), event.queue_id
    row = store.outbound_by_queue_id(qid)
    message = row["id"] if row else None
    server = (row or {}).get("server") or derived_server(event, config)
    tokenised = bool(row and row.get("tokenised"))
    delivery = store.record_delivery(DeliveryRecord(
        at=event.at, queue_id=qid, recipient=rcpt, relay=event.relay, status=event.status, dsn=event.dsn,
        delay=event.delay, reason=event.reason, message=message, server=server))
    lines = [(logging.DEBUG, kv_line(qid, role="delivery", rcpt=rcpt, status=event.status, dsn=event.dsn,
                                     relay=event.relay, server=server, message=message, tokenised=tokenised,
                                     delivery=delivery))]
    # A NULL flag is a row from before the flag existed: perhaps tokenised, so not counted here.
    if event.status in ("bounced", "expired") and row is not None and row.get("tokenised") == 0:
        permanent = _permanent(event.dsn)
        outcome = record_and_judge(store, config.bounces, BounceRecord(
            created_at=event.at, recipient=rcpt, status=event.dsn, action="failed", permanent=permanent,
            reason=event.reason, reporting_mta=event.host, remote_mta=_relay_host_port(event.relay)[0] or None,
            message=message, server=server, source="postfix-log"), event.at)
        lines.append((logging.INFO, kv_line(qid, role="bounce", rcpt=rcpt, status=event.dsn, permanent=permanent,
                                            message=message, server=server, source="postfix-log",
                                            bounce=outcome.bounce_id, blacklisted=outcome.blacklisted is not None)))
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


class _Moved(Exception):
    """Another reader committed from the same position first: drop this batch and look again."""


def lock_keys(store: Store, key: str, events: list[LogEvent]) -> list[str]:
    """The transaction's locks: the log position (two readers of one log take turns) and the
    bounce lock of every address whose bounces or blacklist entry the batch may change."""
    addresses = {e.recipient for e in events if e.recipient is not None and e.status != "deferred"}
    addresses |= {d.recipient for e in events if e.recipient is None for d in _still_deferred(store, e)}
    return [f"log:{key}", *{bounce_lock(normalize(a)) for a in addresses}]


def _commit(store: Store, config: Config, key: str, expected: tuple[int, int] | None, position: tuple[int, int],
            events: list[LogEvent], now: float, logger: logging.Logger) -> None:
    """The rows of a batch and the position after it, in one transaction."""
    lines: list[tuple[int, str]] = []
    with store.transaction(*lock_keys(store, key, events)):
        if store.log_position(key) != expected:
            raise _Moved
        for event in events:
            lines += record_event(store, config, event)
        store.save_log_position(key, position[0], position[1], now)
    for level, line in lines:
        logger.log(level, line)


# -- following a file ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spot:
    path: str
    inode: int
    offset: int
    finished: bool               # rotated away and the writer has moved on: a last unterminated line is whole


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _rotated(path: str, inode: int) -> str | None:
    """Where the file we were reading went (`mail.log.1`, `maillog.20261125-221300`, …): the
    sibling with its inode. A compressed copy is a new inode and is not found."""
    folder, name = os.path.split(path)
    try:
        siblings = [e for e in os.scandir(folder or ".") if e.name.startswith(name) and e.name != name]
    except OSError:
        return None
    for entry in siblings:
        try:
            if entry.is_file(follow_symlinks=False) and entry.inode() == inode:
                return entry.path
        except OSError:
            continue
    return None


def _line_ends_at(path: str, offset: int) -> bool:
    if offset == 0:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(offset - 1)
            return handle.read(1) == b"\n"
    except OSError:
        return False


def _next_spot(key: str, saved: tuple[int, int] | None, logger: logging.Logger) -> _Spot | None:
    """Where to read next. After a rotation the old file is read to its end first (found by its
    inode), but only finished once the writer has started the new one: until then it may still
    append to the old file."""
    current = _stat(key)
    if saved is None:
        return _Spot(key, current.st_ino, 0, False) if current else None
    inode, offset = saved
    if current is not None and current.st_ino == inode:
        if current.st_size < offset or not _line_ends_at(key, offset):
            logger.warning(kv_line(None, role="watch-log", file=key, action="reread",
                                   reason="the file was truncated or replaced in place"))
            return _Spot(key, inode, 0, False)
        return _Spot(key, inode, offset, False)
    old = _rotated(key, inode)
    old_stat = _stat(old) if old else None
    moved_on = current is not None and current.st_size > 0
    if old is not None and old_stat is not None and (not moved_on or old_stat.st_size > offset):
        return _Spot(old, inode, offset, moved_on)
    if current is None or not moved_on:
        return None
    if old is None:
        logger.warning(kv_line(None, role="watch-log", file=key, action="rotated",
                               reason=f"the old file (inode {inode}) is gone: lines after byte {offset} are lost"))
    return _Spot(key, current.st_ino, 0, False)


def _read_lines(spot: _Spot) -> tuple[list[str], int] | None:
    """Complete lines from the spot on (at most CHUNK bytes) and the offset after them; None if
    the file changed under us (read again next time)."""
    try:
        with open(spot.path, "rb") as handle:
            if os.fstat(handle.fileno()).st_ino != spot.inode:
                return None
            handle.seek(spot.offset)
            data = handle.read(CHUNK)
    except OSError:
        return None
    cut = data.rfind(b"\n") + 1
    if spot.finished and len(data) < CHUNK:
        cut = len(data)              # the writer has moved on: the unterminated tail is a whole line
    elif cut == 0 and len(data) == CHUNK:
        cut = len(data)              # a "line" longer than a chunk is not Postfix's: step over it
    return [raw.decode("utf-8", "replace") for raw in data[:cut].splitlines()], spot.offset + cut


def _drain(file: str, key: str, store: Store, config: Config, clock: Clock, logger: logging.Logger) -> int:
    count = 0
    while True:
        saved = store.log_position(key)
        spot = _next_spot(file, saved, logger)
        got = _read_lines(spot) if spot else None
        if spot is None or got is None or saved == (spot.inode, got[1]):
            return count
        lines, end = got
        now = clock()
        try:
            _commit(store, config, key, saved, (spot.inode, end),
                    [e for e in (_parse_current(line, now) for line in lines) if e], now, logger)
        except _Moved:
            continue
        count += len(lines)


def follow(path: str, store: Store, config: Config, *, once: bool = False, poll: float = 0.5,
           stop: threading.Event | None = None, clock: Clock = time.time,
           logger: logging.Logger | None = None) -> int:
    """Follow a Postfix log file from the saved position; `once` reads what is there and returns.
    Returns the number of lines consumed."""
    file, key = os.path.abspath(path), position_key(path)
    logger = logger or logging.getLogger("mailgate")
    total = 0
    while True:
        total += _drain(file, key, store, config, clock, logger)
        if once or (stop is not None and stop.is_set()):
            return total
        if stop is not None:
            stop.wait(poll)
        else:
            time.sleep(poll)


# -- following the journal -----------------------------------------------------------------------

def journal_command(after_usec: int, follow: bool) -> list[str]:
    """JSON, so each entry carries its own microsecond time, which is the saved position (a
    journal cursor is text and the position row holds numbers)."""
    argv = ["journalctl", "--output=json", "--no-pager", "--unit=postfix*"]
    if follow:
        argv += ["--follow", "--no-tail"]
    if after_usec:
        argv.append(f"--since=@{after_usec // 1_000_000}")
    return argv


def _journal_entry(raw: bytes) -> tuple[int, LogEvent | None] | None:
    try:
        entry = json.loads(raw)
        usec = int(entry["__REALTIME_TIMESTAMP"])
    except (ValueError, KeyError, TypeError):
        return None
    message, tag = entry.get("MESSAGE"), entry.get("SYSLOG_IDENTIFIER")
    if isinstance(message, list):          # journald gives non-UTF-8 text as a byte array
        message = bytes(b & 0xFF for b in message if isinstance(b, int)).decode("utf-8", "replace")
    if not isinstance(message, str) or not isinstance(tag, str) or "/" not in tag:
        return usec, None
    return usec, parse_message(message, usec / 1_000_000, str(entry.get("_HOSTNAME", "-")), tag)


class JournalError(RuntimeError):
    """journalctl could not be run or ended with an error (no journal, no permission)."""


def follow_journal(store: Store, config: Config, *, once: bool = False, poll: float = 0.5,
                   stop: threading.Event | None = None, clock: Clock = time.time,
                   logger: logging.Logger | None = None, command: list[str] | None = None) -> int:
    """Follow Postfix's units in journald. Entries at or before the saved time are skipped, so a
    restart resumes after the last committed entry. Returns the number of entries consumed."""
    logger = logger or logging.getLogger("mailgate")
    key = position_key(JOURNAL)
    saved = store.log_position(key)
    after = saved[1] if saved else 0
    process = subprocess.Popen(command or journal_command(after, follow=not once), stdout=subprocess.PIPE)
    assert process.stdout is not None
    pending: list[LogEvent] = []
    buffer, last, total, eof = b"", after, 0, False
    try:
        while not eof and not (stop is not None and stop.is_set()):
            ready = select.select([process.stdout], [], [], poll)[0]
            chunk = os.read(process.stdout.fileno(), CHUNK) if ready else b""
            eof = bool(ready) and not chunk
            complete, _, buffer = (buffer + chunk).rpartition(b"\n")
            for raw in complete.splitlines():
                entry = _journal_entry(raw)
                if entry is not None and entry[0] > last:
                    last, total = entry[0], total + 1
                    pending += [entry[1]] if entry[1] else []
            if last != (saved[1] if saved else 0) and (not chunk or len(pending) >= JOURNAL_BATCH):
                try:
                    _commit(store, config, key, saved, (0, last), pending, clock(), logger)
                except _Moved:
                    logger.error(kv_line(None, role="watch-log", file=JOURNAL, action="stop",
                                         reason="another watch-log is following the journal"))
                    break
                saved, pending = (0, last), []
        if eof and (code := process.wait(5)) != 0:
            raise JournalError(f"{' '.join(process.args)} exited with status {code}")
    finally:
        process.terminate()
        process.wait(5)
    return total


# -- the command ---------------------------------------------------------------------------------

def main_watch_log(config: Config, source: str | None, journal: bool, once: bool, *, debug: bool = False,
                   stop: threading.Event | None = None) -> int:
    """`mailgate watch-log [FILE|--journal] [--once]`: FILE defaults to Debian's /var/log/mail.log.
    SIGTERM and SIGINT end it after the batch in hand (its position is saved with it)."""
    if journal and source:
        print("mailgate: watch-log takes a FILE or --journal, not both", file=sys.stderr)
        return 2
    if journal and not shutil.which("journalctl"):
        print("mailgate: watch-log --journal: journalctl not found", file=sys.stderr)
        return 1
    logger = setup_logging(logging.DEBUG if debug else logging.INFO)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGINT):
            previous[number] = signal.signal(number, lambda *_: stop.set())
    store = open_store(config.database, config.database_password_file)
    try:
        if journal:
            try:
                follow_journal(store, config, once=once, stop=stop, logger=logger)
            except (JournalError, OSError) as exc:
                print(f"mailgate: watch-log --journal: {exc}", file=sys.stderr)
                return 1
            return 0
        path = source or DEFAULT_LOG
        if once and not os.path.exists(path) and store.log_position(position_key(path)) is None:
            print(f"mailgate: watch-log: no such file: {path}", file=sys.stderr)
            return 1
        follow(path, store, config, once=once, stop=stop, logger=logger)
        return 0
    finally:
        store.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
