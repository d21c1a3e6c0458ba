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

from mailgate.commands.watchlog.command import main_watch_log
from mailgate.commands.watchlog.files import follow
from mailgate.commands.watchlog.journal import JournalError, follow_journal, journal_command
from mailgate.commands.watchlog.parsing import LogEvent, parse_line
from mailgate.commands.watchlog.recording import EXPIRY_HORIZON, JOURNAL, derived_server, position_key, record_event

__all__ = [
    "EXPIRY_HORIZON", "JOURNAL", "JournalError", "LogEvent", "derived_server", "follow", "follow_journal",
    "journal_command", "main_watch_log", "parse_line", "position_key", "record_event",
]
