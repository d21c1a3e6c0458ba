"""The command line of `mailgate watch-log`: a file or the journal, signals that end it between
batches, and the messages an operator sees when it cannot start."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading

from mailgate.commands.watchlog.files import follow
from mailgate.commands.watchlog.journal import JournalError, follow_journal
from mailgate.commands.watchlog.recording import position_key
from mailgate.config import Config
from mailgate.infra.logfmt import setup_logging
from mailgate.rules.replies import EXIT
from mailgate.store import open_store

DEFAULT_LOG = "/var/log/mail.log"        # Debian's rsyslog file for the mail facility


def main_watch_log(config: Config, source: str | None, journal: bool, once: bool, *, debug: bool = False,
                   stop: threading.Event | None = None) -> int:
    """`mailgate watch-log [FILE|--journal] [--once]`: FILE defaults to Debian's /var/log/mail.log.
    SIGTERM and SIGINT end it after the batch in hand (its position is saved with it)."""
    if journal and source:
        print("mailgate: watch-log takes a FILE or --journal, not both", file=sys.stderr)
        return EXIT["usage"]
    if journal and not shutil.which("journalctl"):
        print("mailgate: watch-log --journal: journalctl not found", file=sys.stderr)
        return EXIT["failure"]
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
                return EXIT["failure"]
            return EXIT["ok"]
        path = source or DEFAULT_LOG
        if once and not os.path.exists(path) and store.log_position(position_key(path)) is None:
            print(f"mailgate: watch-log: no such file: {path}", file=sys.stderr)
            return EXIT["failure"]
        follow(path, store, config, once=once, stop=stop, logger=logger)
        return EXIT["ok"]
    finally:
        store.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
