"""Why a recipient failed, in the names bounce-handling people already use (docs/rules.md B4, B5).

The names are sisimai's reason names, lower case, so that operators and tools that already speak
that vocabulary read ours without a table. Two judgements hang on a reason: whether the failure
is the recipient's fault (`is_hard`: only then may it count toward the blacklist by default) and
whether it blames our side (`SENDER_SIDE`: a block list, a spam verdict, our authentication),
which must raise an alert for the operator instead of blacklisting a good address.
"""

from __future__ import annotations

from typing import Literal, get_args

Reason = Literal[
    "userunknown", "hostunknown", "hasmoved", "mailboxfull", "mesgtoobig", "exceedlimit", "suspend",
    "notaccept", "filtered", "blocked", "spamdetected", "virusdetected", "policyviolation", "securityerror",
    "authfailure", "badreputation", "requireptr", "notcompliantrfc", "norelaying", "rejected", "toomanyconn",
    "speeding", "contenterror", "networkerror", "systemerror", "systemfull", "mailererror", "syntaxerror",
    "expired", "failedstarttls", "onhold", "undefined", "delivered", "vacation", "feedback",
]
REASONS: tuple[str, ...] = get_args(Reason)

# The address itself is wrong: it does not exist, its domain does not, it moved away.
RECIPIENT_FAULT: frozenset[str] = frozenset({"userunknown", "hostunknown", "hasmoved"})
# The refusal is about us (our IP, our domain's authentication, our relay, our sending rate),
# not about the recipient: counted per upstream server and domain for the reputation alert.
# No reason found: words read but placed nowhere (`onhold`), or nothing to read (`undefined`).
UNDECIDED: frozenset[str] = frozenset({"onhold", "undefined"})
SENDER_SIDE: frozenset[str] = frozenset({
    "blocked", "spamdetected", "badreputation", "authfailure", "requireptr", "norelaying", "securityerror",
    "policyviolation", "toomanyconn", "speeding", "failedstarttls", "notcompliantrfc"})


def is_hard(reason: str | None, permanent: bool | None) -> bool:
    """B5: the recipient's fault. An unknown user or domain or a moved mailbox always is; a
    domain that accepts no mail (`notaccept`) only when the failure was permanent, since a
    temporary "not accepting mail" is a server in maintenance."""
    if reason in RECIPIENT_FAULT:
        return True
    return reason == "notaccept" and permanent is True
