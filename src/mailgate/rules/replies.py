"""Every answer mailgate gives Postfix, in one table.

SMTP replies (milter), lookup answers (socketmap) and policy actions are data here, so that an
operator can read in one place what a client or Postfix will be told, and tests can refer to
the same entries instead of repeating literals.
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


SMTP = {
    # mailgate itself failed: the client must retry, nothing is accepted and lost.
    "internal_error": SmtpReply("451", "4.3.0", "mailgate: temporary internal error, try again later"),
    "store_unavailable": SmtpReply("451", "4.3.0", "mailgate: message store unavailable, try again later"),
    # Inbound, at end of message (docs/rules.md I2-I4).
    "no_route": SmtpReply("550", "5.1.1", "no such alias: no possible route for this message"),
    "catchall_direct": SmtpReply("550", "5.1.1", "this address only accepts replies to our messages"),
    "forged_bounce": SmtpReply("550", "5.7.1", "bounce address not issued by this server"),
    "loop_reject": SmtpReply("550", "5.7.1", "too many messages from this sender: mail loop suspected"),
    "loop_defer": SmtpReply("450", "4.7.1", "too many messages from this sender: try again later"),
}

# Socketmap answers that are not a route (the route itself is the transport string).
LOOKUP = {
    "malformed_request": "PERM malformed request",
    "malformed_netstring": "PERM malformed netstring",
    "too_long": "PERM request too long",
    "internal_error": "TEMP internal error",
    "unknown_map": "unknown map name",
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
