"""A reason for every failed recipient (docs/rules.md B4), from what a report says about it.

Four things say why a recipient failed, in this order of trust:

1. the enhanced status code (RFC 3463). Where it is specific (`5.1.1` bad mailbox, `5.2.2`
   mailbox full, `5.7.26` authentication failed) it decides on its own, in `DECISIVE`;
2. the diagnostic text, read with the phrase tables of `reason_phrases`, where the status is
   generic (`5.0.0`, `5.7.1`, `5.2.0`) or missing. Words of a broken path (no route, a lost
   connection, a loop, a failing DNS) are `networkerror` however long it was tried; a failure
   given up on after retries with a `4.x.x` status whose words tell nothing, or only of
   timeouts, is `expired`, as is one given up on a server that never answered and a delay
   notice's recipient. The SMTP command refines the words (before MAIL FROM: `blocked`; an
   unknown user after DATA: `filtered`, unless the words say the account does not exist), and
   words blaming our side outrank a status blaming the address;
3. the status code, in `BY_STATUS` (`5.2.1` disabled, `5.7.x` security, `5.4.x` network...),
   for a status whose text says nothing we know;
4. the SMTP reply code and the command it answered (`552` to DATA: too big; `5xx` to MAIL FROM:
   our sender refused). A bare `550` says nothing: `rejected`, never an unknown user, because an
   unknown user counts toward the blacklist and a guess must not.

Words that none of this places: `onhold` (read, undecided); nothing at all: `undefined`.
Pure: text in, a reason out.
"""

from __future__ import annotations

import re

from mailgate.rules.reason_phrases import BROKEN_PATH, NO_SUCH_ACCOUNT, only_refused, reason_of_text
from mailgate.rules.reason_vocabulary import SENDER_SIDE, Reason, is_hard

# Basic reply code (RFC 5321), as an MTA writes it before its text: "550 ", "550-", "554:".
SMTP_CODE_RE = re.compile(r"(?<![\w.#/-])([245][0-5]\d)(?=[\s:-]|$)")

# Status codes that say exactly what happened, whatever the text around them.
DECISIVE: dict[str, Reason] = {
    "1.1": "userunknown", "1.2": "hostunknown", "1.3": "userunknown", "1.4": "userunknown",
    "1.6": "hasmoved", "1.7": "rejected", "1.8": "rejected",
    "2.2": "mailboxfull", "2.3": "exceedlimit", "3.1": "systemfull", "3.4": "mesgtoobig",
    "4.3": "systemerror", "4.6": "networkerror", "4.7": "expired", "5.3": "toomanyconn",
    "7.13": "suspend", "7.23": "authfailure", "7.24": "authfailure",
    "7.25": "requireptr", "7.26": "authfailure", "7.27": "notaccept", "7.28": "spamdetected",
    "7.29": "authfailure", "7.30": "failedstarttls", "7.10": "failedstarttls", "7.11": "failedstarttls",
}
# What a status means when no word of the text is known: first by subject and detail (a
# disabled mailbox, a weak authentication), then by subject alone (`5.7.x` security...).
BY_STATUS: dict[str, Reason] = {
    "1.10": "notaccept", "2.1": "suspend", "3.2": "notaccept",
    "6.0": "contenterror", "6.1": "contenterror", "7.7": "contenterror",
    "7.8": "securityerror", "7.9": "securityerror", "7.14": "securityerror",

    "1": "userunknown", "2": "filtered", "3": "systemerror", "4": "networkerror", "5": "syntaxerror",
    "6": "contenterror", "7": "securityerror",
}
# Before MAIL FROM nothing is known of the message or its recipients: a refusal there is about
# the connecting client (our upstream's address), and a refusal after DATA of an address that
# RCPT accepted is the receiver's filter, whatever words it uses ("user unknown" included).
_BEFORE_MAIL = ("CONN", "HELO", "EHLO")
# A status blaming the address, beside words naming a block list, a spam verdict or our relay:
# MTAs reuse 5.1.x for policy refusals, and believing the status would blacklist a good address.
_RECIPIENT_SIDE = frozenset({"userunknown", "hostunknown", "hasmoved", "notaccept"})
# ...and beside words saying the mailbox is full: a full mailbox exists.
_OUTRANK_THE_ADDRESS = SENDER_SIDE | {"mailboxfull"}
_CLASS_ONLY = {"0.0"}
# Reply code (and, where it matters, the command it answered) when there is no status.
_BY_REPLY: dict[str, Reason] = {
    "421": "systemerror", "450": "systemerror", "451": "systemerror", "452": "systemfull",
    "500": "syntaxerror", "501": "syntaxerror", "502": "syntaxerror", "503": "syntaxerror", "504": "syntaxerror",
    "530": "securityerror", "535": "securityerror", "551": "hasmoved", "552": "mesgtoobig", "553": "rejected",
    "550": "rejected", "554": "rejected",
}
COMMANDS = ("CONN", "HELO", "EHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA")
_COMMAND_RE = re.compile(
    r"\b(?:after|in reply to|in response to|during|at|did not like our)\s+(?:the\s+)?(?:end\s+of\s+)?(?P<c>"
    r"helo|ehlo|starttls|auth|mail(?:\s+from)?|rcpt(?:\s+to)?|data|initial\s+connection|connect(?:ion)?)\b", re.I)
# The last client line of a session transcript (">>> DATA", "<<< 550 ..." after it).
_TRANSCRIPT_RE = re.compile(r"(?:^|\s)>>>\s*(helo|ehlo|starttls|auth|mail|rcpt|data)\b", re.I)
# Other MTAs' words for the command a refusal answered: qmail's "does not like recipient" and
# "most progress was RCPT TO response", "SMTP:RCPT host ...", Yahoo's "[RCPT_TO]", qmail's
# "sender was rejected" (MAIL FROM) and "my name was rejected" (HELO).
_NAMED_COMMAND_RES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"does not like recipient|most progress was rcpt|smtp:rcpt\b|\[rcpt_to\]", re.I), "RCPT"),
    (re.compile(r"does not like sender|but sender was rejected|most progress was mail from", re.I), "MAIL"),
    (re.compile(r"but my name was rejected", re.I), "HELO"),
)
# Postfix's words for a server that refused us in its greeting.
_REFUSED_GREETING_RE = re.compile(r"refused to talk to me", re.I)
# A name server that did not answer this time ("Host not found, try again": Postfix's words for
# DNS's TRY_AGAIN), not a domain found not to exist.
_TRY_AGAIN_RE = re.compile(r"not found, try again", re.I)
_END_OF_DATA_RE = re.compile(r"end\s+of\s+data|after\s+data|message\s+body", re.I)


def reply_code(text: str | None) -> str | None:
    """The first basic SMTP reply code in a diagnostic ("550"), or None."""
    found = SMTP_CODE_RE.search(text or "")
    return found.group(1) if found else None


def reason_and_hard(status: str | None, permanent: bool | None, diagnostic: str | None,
                    *, delayed: bool = False) -> tuple[Reason, bool]:
    """The reason and the recipient's-fault flag of a failure known only by its status and
    text (a Postfix log line, a row recorded before reasons existed)."""
    reason = classify(status, reply_code(diagnostic), smtp_command(diagnostic), diagnostic, delayed=delayed)
    return reason, is_hard(reason, permanent)


def smtp_command(text: str | None) -> str | None:
    """The SMTP command a diagnostic says it failed at (`...after RCPT TO:` -> "RCPT"), or the
    last one its session transcript shows."""
    if _REFUSED_GREETING_RE.search(text or ""):
        return "CONN"
    found = _COMMAND_RE.search(text or "")
    named = next((command for pattern, command in _NAMED_COMMAND_RES if pattern.search(text or "")), None)
    if named and not found:
        return named
    if not found:
        said = _TRANSCRIPT_RE.findall(text or "")
        return said[-1].upper() if said else None
    word = found.group("c").split()[0].upper()
    if word.startswith("CONN") or word == "INITIAL":
        return "CONN"
    return "DATA" if word == "DATA" or _END_OF_DATA_RE.search(text or "") else word


def classify(status: str | None, smtp_code: str | None, command: str | None, diagnostic: str | None,
             *, delayed: bool = False) -> Reason:
    """The reason for one recipient: the order of trust of the module docstring. `delayed`: the
    recipient of a delay notice, whose delivery time is running out (`expired`) unless its
    words say why."""
    detail = status.split(".", 1)[1] if status and status.count(".") == 2 else None
    if status and status[0] == "2":
        return "delivered"
    said = reason_of_text(diagnostic)
    if command == "MAIL" and (said in _RECIPIENT_SIDE or DECISIVE.get(detail or "") in _RECIPIENT_SIDE):
        return "rejected"          # MAIL FROM names no recipient: the refusal is of our sender
    if detail in DECISIVE:
        decided = DECISIVE[detail]
        if decided == "expired" and BROKEN_PATH.search(diagnostic or ""):
            return "networkerror"  # the time ran out because the path is broken: the words say why
        return said if decided in _RECIPIENT_SIDE and said in _OUTRANK_THE_ADDRESS else decided
    if said == "hostunknown" and (_temporary(status, code=smtp_code) or _TRY_AGAIN_RE.search(diagnostic or "")):
        return "networkerror"
    if said in ("rejected", "userunknown", "hostunknown", "systemerror") and command in _BEFORE_MAIL:
        return "blocked"
    if said == "userunknown" and command == "DATA" and not NO_SUCH_ACCOUNT.search(diagnostic or ""):
        return "filtered"
    if said in (None, "networkerror", "expired") and BROKEN_PATH.search(diagnostic or ""):
        return "networkerror"      # the path is broken: more time would not have delivered it
    if said in (None, "networkerror") and (delayed or _temporary(status, code=smtp_code)
                                           or _unanswered(status, smtp_code, said)):
        return "expired"           # given up after retries: the last attempt's network trouble is no more
    if said == "rejected" and detail in BY_STATUS and command != "MAIL" and only_refused(diagnostic):
        return BY_STATUS[detail]   # "5.7.9 Rejected": the status's detail says more than the words
    if said is not None:
        return said
    if detail and detail not in _CLASS_ONLY:
        return BY_STATUS.get(detail) or BY_STATUS.get(detail.split(".")[0], "undefined")
    reason = _by_reply(smtp_code, command)
    return "onhold" if reason == "undefined" and (diagnostic or "").strip() else reason


def _unanswered(status: str | None, code: str | None, said: Reason | None) -> bool:
    """Given up on a server that never answered: only network trouble, no code from anyone."""
    return said == "networkerror" and not status and (code or "2")[0] == "2"  # a greeting's 220 refuses nothing


def _temporary(status: str | None, *, code: str | None) -> bool:
    return (status or "")[:1] == "4" or (not status and (code or "")[:1] == "4")


def _by_reply(code: str | None, command: str | None) -> Reason:
    if code and code[0] == "5" and command in (*_BEFORE_MAIL, "MAIL"):
        return "blocked" if command != "MAIL" else "rejected"
    if code == "552" and command == "RCPT":
        return "mailboxfull"
    if code in _BY_REPLY:
        return _BY_REPLY[code]
    return "undefined"
