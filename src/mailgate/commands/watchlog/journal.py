"""Following the journal: Postfix's units read through `journalctl --output=json`, each entry's
microsecond time being the saved position, entries committed a batch at a time."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import threading
import time

from mailgate.commands.watchlog.parsing import LogEvent, parse_message
from mailgate.commands.watchlog.recording import CHUNK, JOURNAL, JOURNAL_BATCH, Clock, Moved, commit, position_key
from mailgate.config import Config
from mailgate.infra.logfmt import kv_line
from mailgate.store.interface import Store


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
    argv = command or journal_command(after, follow=not once)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE)
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
                    commit(store, config, key, saved, (0, last), pending, clock(), logger)
                except Moved:
                    logger.error(kv_line(None, role="watch-log", file=JOURNAL, action="stop",
                                         reason="another watch-log is following the journal"))
                    break
                saved, pending = (0, last), []
        if eof and (code := process.wait(5)) != 0:
            raise JournalError(f"{' '.join(argv)} exited with status {code}")
    finally:
        process.terminate()
        process.wait(5)
        if process.stdout is not None:
            process.stdout.close()
    return total
