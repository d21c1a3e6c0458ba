"""Every answer mailgate gives Postfix, a client or a shell, in one table (docs/rules.md, Replies).

SMTP replies (the milter), access(5) actions (the policy service), socketmap answers (the lookup
service), the reason given with a message put on hold, the reply Postfix gives when the policy
service is down (written into main.cf by `postfix-config`), the health check's answers and the
exit statuses of the commands are data here, so that an operator can read in one place what will
be said, and tests refer to the same entries instead of repeating literals. tests/test_replies.py
checks that every code agrees in class with its enhanced status code and that every entry is used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SmtpReply:
    code: str      # "451"
    status: str    # enhanced status code, "4.3.0"
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def permanent(self) -> bool:
        """A 5xx refusal: the client gives up (and its server tells the sender)."""
        return self.code.startswith("5")


SMTP = {
    # mailgate itself failed: the client must retry, nothing is accepted and lost.
    "internal_error": SmtpReply("451", "4.3.0", "mailgate: temporary internal error, try again later"),
    # Inbound, at end of message (docs/rules.md I2-I4).
    "no_route": SmtpReply("550", "5.1.1", "no such alias: no possible route for this message"),
    "catchall_direct": SmtpReply("550", "5.1.1", "this address only accepts replies to our messages"),
    "forged_bounce": SmtpReply("550", "5.7.1", "bounce address not issued by this server"),
    "loop_reject": SmtpReply("550", "5.7.1", "too many messages from this sender: mail loop suspected"),
    "loop_defer": SmtpReply("450", "4.7.1", "too many messages from this sender: try again later"),
    # Outbound, at end of message (docs/rules.md O5, `malformed_from: reject`, or no notification
    # address to replace it with): the From cannot be read as one header of mailboxes and holds an
    # address the server may not send for. 554: the transaction fails for the message's content,
    # not for a mailbox; 5.6.0 (RFC 3463 "other media error"): what is wrong is the message itself,
    # the same author in one well-formed From would be accepted (and rewritten).
    "malformed_from": SmtpReply("554", "5.6.0", "the From header must be one header of valid mailboxes"),
}

# What Postfix answers every RCPT while the policy service cannot be reached
# (`smtpd_policy_service_default_action`): defer, never accept unchecked.
POLICY_UNAVAILABLE = SmtpReply("451", "4.3.5", "mailgate policy service unavailable")

# Why a message went to Postfix's hold queue (the milter's quarantine reason, shown by postqueue).
HOLD_REASONS = {
    "loop": "mailgate: mail loop suspected",
}

# Socketmap answers that are not a route (the route itself is the transport string).
LOOKUP = {
    "malformed_request": "PERM malformed request",
    "malformed_netstring": "PERM malformed netstring",
    "too_long": "PERM request too long",
    "internal_error": "TEMP internal error",
    "unknown_map": "unknown map name",
    # An XOAUTH2 server's sasl map while no usable access token is held (docs/rules.md A1):
    # Postfix defers the message, and the token keeper is refreshing.
    "no_access_token": "TEMP no usable OAuth access token yet: refresh under way",
}

# Policy service actions (access(5) syntax). Postfix puts "<rcpt>: Recipient address rejected:"
# before the text itself, so the texts do not repeat the address.
POLICY = {
    "outside": "DUNNO",
    "accept": "DUNNO",
    "no_such_alias": "550 5.1.1 no such alias",
    "forged_bounce": "550 5.7.1 bounce address not issued by this server",
    "blacklisted": "550 5.7.1 recipient blacklisted after repeated bounces (mass mail)",
    "quota_defer": "DEFER_IF_PERMIT 4.7.1 daily sending limit reached",
    "quota_hold": "HOLD daily sending limit reached",
    "malformed_dunno": "DUNNO",
    "malformed_defer": "DEFER_IF_PERMIT 4.3.0 mailgate: malformed policy request",
    "internal_error": "DEFER_IF_PERMIT 4.3.0 mailgate: temporary internal error",
}

# What the metrics listener's /healthz says (200 with "ok", 503 with the others, each problem as
# `key: text`), and what `mailgate check-health` prints.
HEALTH = {
    "ok": "ok: milter up, store writable, configuration loaded",
    "milter_down": "the milter process is not running",
    "store_unwritable": "the store refused a write",
    "store_slow": "the store has not answered a write for",
    "config_not_loaded": "no configuration is loaded",
}

# Exit statuses. The commands' own follow sysexits.h; `deliver`'s are read by Postfix's pipe(8),
# for which only 75 (and 71) defer and every other non-zero status bounces (sys_exits.c), so
# everything that is our fault or the operator's exits 75 and only Odoo's own refusal exits 65.
EXIT = {
    "ok": 0,
    "failure": 1,          # a check failed (test-server, check-dns, explain on a bad message)
    "usage": 2,            # the command line or its arguments
    "data_error": 65,      # EX_DATAERR, pipe(8) "5.6.0": Odoo refused the message for good (bounces)
    "unavailable": 69,     # EX_UNAVAILABLE: check-health found nothing answering on listen.metrics
    "temp_failure": 75,    # EX_TEMPFAIL, pipe(8) "4.3.0": try again later (stays queued)
    "config": 78,          # EX_CONFIG: the configuration does not load
    "interrupted": 130,    # SIGINT (128 + 2)
}
