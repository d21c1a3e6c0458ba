"""One log line per decision, `key=value`, queue id first, like Postfix's own lines.

Monitoring greps these lines, so the format is fixed here: addresses in angle brackets, values
with spaces quoted, never a password or a message body.
"""

from __future__ import annotations

import logging
import re
import sys

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
