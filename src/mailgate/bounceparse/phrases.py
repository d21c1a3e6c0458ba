"""The wording of delivery reports: status codes, the one hard/soft text table, auto-replies.

Kept apart from `bounceparse` so that the judgement calls about words live in one place and can
be read (and argued about) without the MIME plumbing around them.

Permanent or not, the decision this module makes (whether the failure was the recipient's
fault is a separate question, answered by the reason: `rules.reason_vocabulary.is_hard`):

1. The enhanced status class decides: 5.x.x permanent, 4.x.x not. A DSN's own `Status` field
   outranks any wording in its diagnostic ("try again later" after a 5.7.1 stays permanent). A
   full mailbox at 5.2.2 is permanent too, as RFC 3463 says; it is not the recipient's fault
   (its reason is `mailboxfull`), so it never counts toward the blacklist by default.
2. Without an enhanced status, the basic SMTP reply code decides: 5yz permanent, 4yz not.
3. Without either, the wording of TEXT_RULES decides, and SOFT wording (a full mailbox
   included) outranks HARD wording ("recipient temporarily unavailable" is a deferral).
4. Nothing recognisable: None, "unknown".
"""

from __future__ import annotations

import re

from mailgate.rules.bounce_reasons import reply_code

HARD = "hard"
SOFT = "soft"
FULL = "full"

# The one table of diagnostic wording. Order does not matter: FULL beats everything, then SOFT,
# then HARD (see the module docstring). Patterns are searched case-insensitively.
TEXT_RULES: tuple[tuple[str, str], ...] = (
    (r"mail ?(?:box|folder) (?:is )?full|mail ?(?:box|folder).{0,20}(?:is )?full|full mailbox", FULL),
    (r"mailbox (?:\w+ ){0,3}exceeds?|メールボックス(?:の容量)?が(?:一杯|いっぱい|満杯)"
     r"|容量(?:が|を)?(?:超過|オーバー)", FULL),
    (r"over ?quota|quota (?:exceeded|exceed)|exceeds? (?:\w+ ){0,3}quota|disk quota", FULL),
    (r"insufficient (?:system )?storage|storage allocation|out of storage|mailbox size limit", FULL),
    (r"try (?:again )?later|retry later|temporar(?:il)?y|transient", SOFT),
    (r"too many (?:connections|messages|recipients)|rate.?limit|throttl|greylist|graylist", SOFT),
    (r"timed? ?out|connection (?:refused|reset|lost)|retry time(?:out)? (?:not reached|exceeded)", SOFT),
    (r"deferred|service (?:is )?(?:temporarily )?(?:not available|unavailable)|resources? unavailable", SOFT),
    (r"(?:host|server|destination) (?:is )?(?:not reachable|unreachable)|failing for a long time", SOFT),
    (r"user unknown|unknown user|no such (?:user|recipient|mailbox|address|account)", HARD),
    (r"(?:user|recipient|mailbox|address|account) (?:was )?not (?:found|known|listed)", HARD),
    (r"unknown (?:recipient|mailbox|address|local.?part)|recipientnotfound", HARD),
    (r"mailbox (?:is )?unavailable|mailbox (?:is )?disabled|account (?:is |has been )?disabled", HARD),
    (r"does not exist|doesn'?t exist|no longer (?:exists?|valid|active|in use)", HARD),
    (r"address rejected|invalid (?:recipient|address|mailbox)|not a valid (?:recipient|user|mailbox)", HARD),
    (r"no mailbox here|unrout(?:e)?able|host (?:or domain name )?not found|domain not found", HARD),
    (r"doesn'?t have an? [\w.-]+ account|is not a known user|bad destination mailbox", HARD),
    (r"permanent(?:ly)? (?:error|failure|fatal)|failed permanently|permanently rejected", HARD),
    (r"unknown host|host unknown|no mx (?:records? )?found|invalid (?:final delivery )?user ?id\b", HARD),
    (r"not listed in (?:the )?(?:[\w-]+ ){0,3}directory|見つかりません|見つからない|存在しません|存在しない", HARD),
    (r"ディレクトリのリストにありません|宛先不明", HARD),
)
_RULES = tuple((re.compile(p, re.I), verdict) for p, verdict in TEXT_RULES)

# Enhanced status (RFC 3463): class.subject.detail, not part of an IP address or version.
STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")

# Senders and subjects of delivery reports, as opposed to people and their auto-replies.
DAEMON_LOCALPARTS = {"mailer-daemon", "mailer_daemon", "maildaemon", "mail-daemon", "postmaster",
                     "post_master", "mdaemon", "mailerdaemon"}
DAEMON_NAME_RE = re.compile(r"mailer.?daemon|mail delivery (?:system|subsystem|service)|postmaster"
                            r"|mail administrator|delivery status notification", re.I)
BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|undelivered|delivery (?:status notification|failure|has failed|failed|problem|error)"
    r"|mail delivery failed|returned mail|failure notice|non.?delivery|could not be delivered"
    r"|delivery report|returning message to sender|nondeliverable|unzustellbar|non remis"
    r"|error sending|mail (?:system )?error|failed|failure|returned to sender|rejected"
    r"|エラー通知|メールエラー|配信エラー|送信エラー|不達|未配達|配送エラー", re.I)
# Report lines no person writes: a mail system's own report whatever its sender and subject
# (KDDI's au one net and ezweb: "Your mail sent on: ... Could not be delivered to: <addr>").
REPORT_BODY_RE = re.compile(r"^[ \t]*your mail sent on:.*\n[ \t]*could not be delivered to:[ \t]*<", re.I | re.M)
AUTOREPLY_SUBJECT_RE = re.compile(
    r"^\s*(?:(?:re|aw|fw|fwd)\s*:\s*)?(?:automatic reply|auto(?:matic)?[- ]?(?:reply|response|answer)"
    r"|autoreply|autoresponse|auto:|out of (?:the )?office|ooo\b|on vacation|vacation"
    r"|away from (?:the|my) office|abwesenheit|automatische antwort|r[ée]ponse automatique"
    r"|absence|respuesta autom[aá]tica|risposta automatica|fuera de la oficina|automatisch antwoord"
    r"|afwezig)", re.I)
# Header name -> pattern its value must match to mark an auto-reply (RFC 3834 and vendor ones).
AUTOREPLY_HEADERS: dict[str, re.Pattern[str]] = {
    "x-autoreply": re.compile(r"^(?!\s*(?:no|false|0)\s*$)", re.I),
    "x-autorespond": re.compile(r"", re.I),
    "x-autoresponder": re.compile(r"", re.I),
    "x-autogenerated": re.compile(r"reply", re.I),
    "x-vacation": re.compile(r"", re.I),
    "precedence": re.compile(r"auto.?reply", re.I),
    "x-precedence": re.compile(r"auto.?reply", re.I),
    "x-mailer": re.compile(r"vacation", re.I),
}
AUTO_REPLIED_RE = re.compile(r"^\s*auto-replied", re.I)

# Lines after which a report quotes the returned message (text bodies such as qmail's or Exim's).
ORIGINAL_MARKER_RE = re.compile(
    r"^[ \t]*[-=*]*[ \t]*(?:below this line is a copy of the message|this is a copy of the message"
    r"|original message follows|start of returned message|returned mail follows"
    r"|undelivered message follows|unsent message follows|message text follows|original message:"
    r"|message headers follow)"
    r"|^[ \t]*[-=]{2,}[ \t]*(?:original message|forwarded message|the header of the original message"
    r"|copy of the original message)", re.I | re.M)
# Report wording that says "still trying": a warning, not a failure.
DELAY_RE = re.compile(
    r"warning only|not yet been delivered|will (?:continue to )?be retried|still being retried"
    r"|delivery attempts will continue|has been delayed|delivery delayed|\(delay\)|delayed mail"
    r"|no action is required on your part", re.I)
REPORTING_MTA_RES = (
    re.compile(r"qmail-send program at ([\w.-]+?)\.?$", re.I | re.M),
    re.compile(r"mail system at host ([\w.-]+?)\.?$", re.I | re.M),
)
REMOTE_MTA_RES = (
    re.compile(r"\bhost\s+\[?([a-z0-9][\w-]*(?:\.[\w-]+)+)\]?", re.I),
    re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3}) does not like recipient", re.I),
    re.compile(r"remote host ([a-z0-9][\w-]*(?:\.[\w-]+)+) said", re.I),
)
# Where a report without a DSN part names a failed recipient, for reports flufl.bounce does not
# know. Each pattern has a group "a" for the address; ADDRESS is filled in below.
_A = r"(?P<a>[^\s<>\"'(),;:\[\]@]{1,64}@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)+)"
RECIPIENT_LINE_RES = tuple(re.compile(p.replace("ADDRESS", _A), re.I | re.M) for p in (
    r"^[ \t*>•-]*<?ADDRESS>?:?[ \t]*$",                       # the address alone on its line
    r"^[ \t*>•-]*<?ADDRESS>?[ \t]+(?:<[^<>\s]+>|\[[^\]\n]{1,80}\]"  # ...or followed by the same in
    r"|\([^)\n]{1,80}\)|on[ \t]+\d[^\n]{0,40})[ \t]*$",          # brackets, a [note], a date (Exchange)
    r"^[ \t]*<?ADDRESS>?:[ \t]+\S",                            # "<addr>: 550 ..." (OpenSMTPD, Postfix)
    r"rcpt to:[ \t]*<?ADDRESS>?",                               # an SMTP transcript
    r"^[ \t]*(?:[245]\d\d[ -](?:\d\.\d+\.\d+[ \t]+)?)?<ADDRESS>\.\.\.",   # Sendmail "<addr>... User unknown"
    r"\((?:generated|expanded) from:?[ \t]*<?ADDRESS>?\)",     # Exim, Sendmail aliases
    r"^[ \t]*recipient(?:[ \t]+address)?:[ \t]*<?ADDRESS>?",    # PMDF / Messaging Server lists
    r"(?:user|ユーザー)[ \t]+[^()<>\n]{1,60}?\(ADDRESS\)",        # Domino "User Name (addr) not listed"
    r"(?:rejected|unknown|invalid|failed|bad|undeliverable)[ \t]+(?:recipient|address)"
    r"(?:[ \t]+address)?:?[ \t]*<?ADDRESS>?",                   # "rejected recipient <addr>"
    r"(?:deliver\w*|sending|errors?|failed|failure|rejected|recipients?)\b[^<>\n]{0,60}?"
    r"(?:\b(?:to|for):?|:)[ \t]*<?ADDRESS>?",                    # prose: "error delivering your mail to <addr>"
))
# Report wording that says something failed: required before those patterns are trusted.
FAILURE_RE = re.compile(
    r"could not be delivered|couldn'?t be delivered|not (?:yet )?(?:been )?delivered|undeliver"
    r"|unable to deliver|fail|permanent|rejected|error|returned|unknown|no such|does not exist"
    r"|delay|aborted|could not|couldn'?t|wasn'?t able|unable"
    r"|できませんでした|できません|見つかりません|失敗|エラー", re.I)
MAX_REASON = 500
MAX_TEXT = 64 * 1024


def one_line(text: str | None, cap: int = MAX_REASON) -> str | None:
    """Whitespace folded to single spaces and capped: the reason is stored in one DB column."""
    if not text:
        return None
    folded = " ".join(text.split())
    return folded[:cap] or None


def find_status(text: str | None) -> str | None:
    """The first enhanced status code in `text`, normalised ("5.01.01" -> "5.1.1"). A failure
    code outranks a success code before it: in a session transcript "250 2.1.5 Ok" to RCPT is
    followed by the "451 4.3.0" that failed the message."""
    codes = [".".join(str(int(g)) for g in m.groups()) for m in STATUS_RE.finditer((text or "")[:MAX_TEXT])]
    return next((c for c in codes if c[0] != "2"), codes[0] if codes else None)


find_smtp_code = reply_code


def text_verdict(text: str | None) -> str | None:
    """FULL, SOFT, HARD or None for free text, with that precedence."""
    if not text:
        return None
    verdicts = {verdict for pattern, verdict in _RULES if pattern.search(text)}
    for verdict in (FULL, SOFT, HARD):
        if verdict in verdicts:
            return verdict
    return None


def is_permanent(status: str | None, text: str | None, *, smtp_code: str | None = None) -> bool | None:
    """Permanent (True), temporary (False) or unknown (None): the rules of the module docstring."""
    code = smtp_code or find_smtp_code(text)
    for leading in ((status or "")[:1], (code or "")[:1]):
        if leading in ("4", "5"):
            return leading == "5"
    verdict = text_verdict(text)
    if verdict is None:
        return None
    return verdict == HARD


def is_daemon_address(address: str | None) -> bool:
    """The sender of a delivery report (MAILER-DAEMON, postmaster) rather than of a person."""
    if address is None:
        return False
    local = address.strip().strip("<>").lower().rpartition("@")
    return (local[0] if local[1] else local[2]) in DAEMON_LOCALPARTS


def is_daemon_sender(from_header: str) -> bool:
    """A From header naming a mailer daemon, by address ("MAILER-DAEMON", bare or with a
    domain) or by display name ("Mail Delivery System")."""
    words = from_header.replace("<", " ").replace(">", " ").replace('"', " ").split()
    return any(is_daemon_address(w) for w in words) or bool(DAEMON_NAME_RE.search(from_header))
