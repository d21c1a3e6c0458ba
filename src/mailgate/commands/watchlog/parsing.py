"""Parsing Postfix's log: the delivery result a line holds, if any, with the time of the line
itself (a syslog stamp, Postfix's own `maillog_file`, or RFC 3339 as journalctl's short-iso
writes it). Any other line is None, never an exception: a follower must not stop on a line
that is not Postfix's."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

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


def parse_current(line: str, now: float) -> LogEvent | None:
    """A syslog stamp has no year: take this year's, or last year's if that would lie in the future
    (December's lines read in January)."""
    year = time.localtime(now).tm_year
    event = parse_line(line, year)
    if event is not None and event.at > now + 2 * 86400 and _SYSLOG.match(line):
        event = parse_line(line, year - 1)
    return event
