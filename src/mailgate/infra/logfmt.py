"""One log line per decision, `key=value`, queue id first, like Postfix's own lines.

Monitoring greps these lines, so the format is fixed here: addresses in angle brackets, values
with spaces quoted, never a password or a message body.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable

_NEEDS_QUOTES = re.compile(r'[\s"=]')
ADDRESS_KEYS = {"from", "to", "header_from", "envelope", "orig_envelope", "sender", "rcpt"}


def _value(key: str, value: object) -> str:
    if value is None:
        return "<>" if key in ADDRESS_KEYS else "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).replace("\r", " ").replace("\n", " ")
    if key in ADDRESS_KEYS:
        return f"<{text}>"
    if _NEEDS_QUOTES.search(text) or not text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def kv_line(queue_id: str | None, **fields: object) -> str:
    """`QID: key=value key=value`, in the order given."""
    body = " ".join(f"{key}={_value(key, value)}" for key, value in fields.items())
    return f"{queue_id or 'NOQUEUE'}: {body}"


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Log to stderr as `mailgate[pid]: ...` (journald adds its own time stamp).

    The lines carry no source location, thread or multiprocessing name, so the logging module is
    told not to collect them: finding the caller walks the stack for every line, a fifth of the
    milter's Python time per message (bench/RESULTS.md)."""
    logging._srcfile = None  # the documented switch (logging's "Optimization")
    logging.logThreads = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("mailgate")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mailgate[%(process)d]: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


class TracebackStreak:
    """When a failure's traceback is worth a log: at the start of a streak of the same failure.

    A full disk or a store gone fails every message the same way; its line per message says so,
    and the traceback (which statement failed) says nothing new after the first. A streak is
    the same failure (exception type and the statement that raised it) again and again; it
    ends when `succeeded` is called, when another failure comes, or after `quiet_seconds`
    without it (for callers that never see the successes). Thread-safe: libmilter calls from a
    thread per connection."""

    def __init__(self, quiet_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._current: tuple[str, str, int] | None = None
        self._last = 0.0

    def first(self, exc: BaseException) -> bool:
        """True when `exc` starts a streak (log its traceback), False while the streak goes on."""
        frame = exc.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        where = (frame.tb_frame.f_code.co_filename, frame.tb_lineno) if frame is not None else ("", 0)
        signature = (type(exc).__name__, *where)
        now = self._clock()
        with self._lock:
            starts = signature != self._current or now - self._last > self.quiet_seconds
            self._current, self._last = signature, now
        return starts

    def succeeded(self) -> None:
        """The streak is over: the next failure logs its traceback again."""
        self._current = None


MESSAGE_FAILURES = TracebackStreak()
"""The milter's failures at the end of a message (one streak per process)."""
