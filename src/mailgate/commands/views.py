"""Operator views: `mailgate bounces list|stats` and `mailgate blacklist list|add|remove|why`.

Plain aligned tables for people, `--json` (one object on stdout) for scripts. These commands
open the live store; writes (add/remove) are single statements, safe next to a running gateway.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO

from mailgate.rules.addresses import is_valid_address, normalize
from mailgate.rules.blacklist import bounce_lock
from mailgate.rules.replies import EXIT
from mailgate.store.interface import BlacklistEntry, Store, StoredBounce

_SPAN = re.compile(r"^(\d+)([dhm])$")


def default_since(since: str | None, all_time: bool, window_days: int) -> str | None:
    """What a statistics view reads without `--since`: the last `window_days` days (the
    blacklist rule's window, `bounces.window_days`) — all time grew to seconds of CPU on a store
    of a million rows; `--all` asks for all time, an explicit `--since` wins."""
    if since or all_time:
        return since
    return f"{window_days}d"


def parse_since(text: str | None, now: float) -> float:
    """`7d`, `24h`, `30m`, or a date/time (`2026-11-01`, ISO 8601); None: everything."""
    if not text:
        return 0.0
    found = _SPAN.match(text.strip())
    if found:
        return now - int(found.group(1)) * {"d": 86400, "h": 3600, "m": 60}[found.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: expected 7d, 24h, 30m or a date like 2026-11-01, got {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M")


def table(rows: Sequence[Mapping[str, Any]], columns: list[str], out: TextIO) -> None:
    if not rows:
        print("(none)", file=out)
        return
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def as_printed(record: StoredBounce | BlacklistEntry) -> dict[str, Any]:
    """A stored row as the commands print it, in `--json` too: its columns in table order, the
    flags as the 0/1 the table holds (the shape scripts have always read)."""
    return {name: int(value) if isinstance(value, bool) else value for name, value in asdict(record).items()}


def _emit(data: Any, as_json: bool, human, out: TextIO) -> int:
    if as_json:
        print(json.dumps(data, ensure_ascii=False), file=out)
    else:
        human()
    return EXIT["ok"]


def bounces_list(store: Store, since: float, address: str | None, as_json: bool, out: TextIO = sys.stdout,
                 limit: int = 200) -> int:
    bounces = store.bounce_rows(since=since, address=normalize(address) if address else None, limit=limit)
    rows = [{**as_printed(bounce), "when": _when(bounce.created_at), "kind": bounce.kind} for bounce in bounces]
    columns = ["when", "recipient", "reason", "kind", "status", "server", "message", "source", "stale", "diagnostic"]
    return _emit({"bounces": rows}, as_json, lambda: table(rows, columns, out), out)


def bounces_stats(store: Store, since: float, as_json: bool, out: TextIO = sys.stdout) -> int:
    stats: dict[str, Any] = {"since": since, **asdict(store.bounce_stats(since))}

    def human() -> None:
        print(f"# since {_when(since) if since else 'the first bounce'}", file=out)
        for title, key, columns in (("per day", "per_day", ["day", "bounces", "hard"]),
                                    ("per server", "per_server", ["server", "bounces"]),
                                    ("hard/soft", "per_kind", ["kind", "bounces"]),
                                    ("per reason", "per_reason", ["reason", "bounces", "hard"]),
                                    ("top domains", "top_domains", ["domain", "bounces"])):
            print(f"# {title}", file=out)
            table(stats[key], columns, out)
            print(file=out)
    return _emit(stats, as_json, human, out)


def blacklist_list(store: Store, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Each listed address with the bounces that put it there and their reasons (B3, B4)."""
    entries = store.blacklist_entries()
    ids = sorted({i for entry in entries for i in entry.cause_ids})
    causes = {row.id: row for row in store.bounce_rows(ids=ids)} if ids else {}
    rows = []
    for entry in entries:
        named = [causes[i] for i in entry.cause_ids if i in causes]
        rows.append({**as_printed(entry), "since": _when(entry.added_at), "bounces": len(named),
                     "reasons": _reason_counts(named),
                     "causes": [{"id": b.id, "at": b.created_at, "status": b.status, "reason": b.reason}
                                for b in named]})
    columns = ["address", "since", "source", "bounces", "reasons", "reason"]
    return _emit({"blacklist": rows}, as_json, lambda: table(rows, columns, out), out)


def _reason_counts(bounces: Sequence[StoredBounce]) -> str | None:
    """`userunknown x4, hostunknown` for the table; None when the entry names no bounce."""
    counts = Counter(b.reason or "-" for b in bounces)
    return ", ".join(r if n == 1 else f"{r} x{n}" for r, n in counts.most_common()) or None


def blacklist_change(store: Store, action: str, address: str, reason: str | None, as_json: bool,
                     out: TextIO = sys.stdout, now: float | None = None) -> int:
    address = normalize(address)
    if not is_valid_address(address):
        print(f"mailgate: not an email address: {address!r}", file=sys.stderr)
        return EXIT["usage"]
    now = time.time() if now is None else now
    with store.transaction(bounce_lock(address)):
        if action == "add":
            changed = store.blacklist_add(address, now, reason or "added by the operator", "operator", [])
        else:
            changed = store.blacklist_remove(address, now, reason or "removed by the operator")
    state = {"address": address, "action": action, "changed": changed}
    text = f"{address}: {'added to' if action == 'add' else 'removed from'} the blacklist" if changed else \
        f"{address}: {'already on' if action == 'add' else 'not on'} the blacklist"
    return _emit(state, as_json, lambda: print(text, file=out), out)


def blacklist_why(store: Store, address: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    address = normalize(address)
    history = store.blacklist_history(address)
    ids = sorted({i for entry in history for i in entry.cause_ids})
    causes = store.bounce_rows(ids=ids) if ids else []
    blacklisted = any(entry.active for entry in history)
    data = {"address": address, "blacklisted": blacklisted,
            "history": [as_printed(entry) for entry in history], "bounces": [as_printed(row) for row in causes]}

    def human() -> None:
        print(f"{address}: {'blacklisted' if blacklisted else 'not blacklisted'}", file=out)
        for entry in history:
            removed = f", removed {_when(entry.removed_at)} ({entry.removed_reason})" if entry.removed_at else ""
            print(f"  added {_when(entry.added_at)} by {entry.source}: {entry.reason}{removed}", file=out)
        if causes:
            print("  bounces that caused it:", file=out)
            for row in causes:
                print(f"    {_when(row.created_at)}  {row.status or '-'}  {row.reason or '-'}  {row.server or '-'}  "
                      f"{row.diagnostic or ''}", file=out)
    return _emit(data, as_json, human, out)
