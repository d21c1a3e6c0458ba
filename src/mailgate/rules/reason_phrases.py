"""The wording receiving servers use when their status code says little (docs/rules.md B4).

A `5.7.1` or a bare `550` may mean an unknown user, a spam filter, a block list or a relay
refusal; only the text tells them apart. Each entry is one reason and the phrases that name it,
written from what the common MTAs and mailbox providers actually say (Postfix, Exim, Sendmail,
Exchange and Office 365, Gmail, Yahoo, qmail, Japanese carriers). Entries are tried in order and
the first that matches wins, so the specific ones (a block list, a relay refusal) come before the
broad ones (an unknown user, a plain refusal). Patterns are searched case-insensitively in the
diagnostic folded to one line.
"""

from __future__ import annotations

import re

from mailgate.rules.reason_vocabulary import Reason

# "550 : User unknown" and "<>: User unknown" leave the address out on purpose (`filtered`
# below): the unknown-user phrases read only a reply that names whom it refused.
_NAMED = r"(?<![245]\d\d : )(?<![245]\d\d: : )(?<!<>: )"
PHRASES: tuple[tuple[Reason, tuple[str, ...]], ...] = (
    # A list or group refusing our sender, and a receiver refusing our From's domain: about the
    # sender, whatever they say of addresses that do not exist ("the group may not exist").
    ("rejected", (
        r"(?:don'?t|not) have permission to post",
        r"group you tried to contact",
        r"groups\.google\.com/support",               # the same refusal in any language links its help
        r"(?:sender|from:?) (?:address )?domain (?:is )?(?:invalid|not found|unknown|does not exist)",
        r"provide a valid from",
        r"(?<!ip )(?<!ip)address (?:that |which )?(?:has been |is )?(?:black|block) ?listed",
    )),
    # A relay that refuses us only for want of authentication asks for it: not a relay refusal.
    ("securityerror", (
        r"turn on (?:smtp )?authentication",
        r"relay (?:[\w.]+ ){0,3}without authentication",
    )),
    # A spam verdict said as the reason outranks advice about authentication around it.
    ("spamdetected", (
        r"(?:rejected|refused|blocked) (?:\w+ ){0,2}(?:due to|because of|as) (?:a )?spam\b",
        r"due to spam classification",
    )),
    ("norelaying", (
        r"not configured to relay",
        r"relay(?:ing)? (?:access )?(?:denied|not permitted|not allowed|prohibited)",
        r"not (?:permitted|allowed|authori[sz]ed) to relay",
        r"unable to relay",
        r"relay not permitted",
        r"we do not relay",
        r"no relaying",
        r"relaying (?:mail )?(?:to \S+ )?(?:is )?not allowed",
    )),
    ("failedstarttls", (
        r"must issue a starttls",
        r"starttls (?:is )?required",
        r"tls (?:is )?required",
        r"requires? (?:a )?(?:secure|encrypted|tls) (?:connection|channel)",
        r"tls handshake failed",
        r"encryption required",
        r"cannot start tls",
        r"starttls failed",
    )),
    ("requireptr", (
        r"ip name lookup failed",
        r"reverse (?:dns|lookup|hostname)",
        r"\bptr\b",
        r"rdns",
        r"no (?:dns )?(?:hostname|name) for (?:your )?ip",
        r"cannot find your hostname",
        r"client host rejected: cannot find",
        r"hostname (?:does not|doesn'?t) resolve",
        r"not resolve to the ip",
        r"mismatch(?:es)? (?:the )?(?:client|connecting) ip",
    )),
    ("authfailure", (
        r"fails? to pass (?:\w+ ){0,3}authentication",
        r"does not have authentication information",
        r"\bspf\b",
        r"\bdmarc\b",
        r"\bdkim\b",
        r"sender policy framework",
        r"not (?:pass|passed) (?:the )?authentication",
        r"unauthenticated (?:email|mail)\b",
        r"sender (?:domain )?(?:is )?not authenticated",
        r"authentication (?:checks? )?(?:failed|failure)",
        r"5\.7\.2[3-7]\b",
    )),
    ("securityerror", (
        r"unauthenticated senders?",
        r"authentication (?:is )?required",
        r"auth(?:entication)? (?:credentials )?invalid",
        r"invalid credentials",
        r"sasl",
        r"not authenticated",
        r"must (?:be )?authenticate",
        r"sender address (?:rejected: )?not owned",
        r"certificate",
        r"security (?:policy|error)",
    )),
    ("badreputation", (
        r"reputation",
        r"(?:user|recipient|spam) complaints",
        r"sender score",
        r"low (?:sender )?score",
        r"(?:ip|domain) (?:has a )?poor",
    )),
    ("notcompliantrfc", (
        r"(?:multiple|duplicate) (?:[\w-]+ ){0,3}(?:in )?(?:from|to|date|subject|message-id)\b",
        r"rfc ?(?:2822|5322|822|5321|1123)(?!\s*;)",  # not "rfc822;", a DSN's address type
        r"not (?:rfc[- ]?)?compliant",
        r"malformed (?:header|message)",
        r"(?:multiple|duplicate|missing|invalid) (?:[\w-]+ )?(?:header|message-id|from|date)\b",
        r"header (?:is )?(?:malformed|invalid)",
        r"8-?bit data",
        r"bare (?:lf|linefeed|newline)s?",
    )),
    ("virusdetected", (
        r"virus",
        r"malware",
        r"infected",
        r"trojan",
        r"worm\b",
        r"phishing",
        r"malicious",
    )),
    # Our host named as the one refused outranks the words saying why (spam, usually).
    ("blocked", (
        r"ip (?:address )?(?:is |has been )?(?:blocked|banned|blacklisted)",
        r"client host (?:\[[^\]]*\] )?(?:is )?blocked",
    )),
    ("spamdetected", (
        r"(?:black|block) ?listed (?:url|uri|link|domain in (?:the )?(?:message|body))",
        r"\bur[ib]bl\b",
        r"\bsurbl\b",
        r"\bspam\b",
        r"unsolicited",
        r"bulk mail",
        r"junk mail",
        r"spamassassin",
        r"spam ?score",
        r"classified as (?:spam|junk)",
        r"\bube\b",
        r"\buce\b",
        r"looks like (?:spam|junk)",
        r"content (?:looks|seems) suspicious",
    )),
    ("blocked", (
        r"not accepting connections",
        r"block ?list",
        r"black ?list",
        r"\bdnsbl\b",
        r"\brbl\b",
        r"(?<!not )listed (?:at|on|in|by) (?!(?:the )?(?:[\w-]+ )?directory)",
        r"blocked using",
        r"spamhaus\.org/query",
        r"smtp server of your (?:isp|provider)",
        r"ip (?:address )?(?:is |has been )?(?:blocked|banned|blacklisted|rejected)",
        r"client host (?:\[[^\]]*\] )?(?:is )?(?:blocked|rejected)",
        r"access denied.{0,40}(?:ip|network|host)",
        r"poor reputation network",
        r"connection (?:refused|rejected) (?:from|for) (?:your )?ip",
        r"banned",
        r"denied by policy.{0,20}ip",
        r"messages from \S+ weren'?t sent",
        r"invalid ip",
        r"your (?:ip|network|server)\b.{0,40}(?:block|ban|denied|not allowed)",
        r"\(s3150\)",
        r"\bs3140\b",
    )),
    ("toomanyconn", (
        r"frequency limit",
        r"connection rate",
        r"too many (?:connections|concurrent|sessions|simultaneous)",
        r"connection limit",
        r"too many recipients(?! (?:this|per|an|in the last) (?:hour|day|minute))",
        r"recipients? limit",
        r"maximum (?:number of )?recipients",
        r"too many rcpt",
    )),
    ("speeding", (
        r"too many (?:recipients|messages) (?:this|per|an|in the last) (?:hour|day|minute)",
        r"rate ?limit",
        r"too (?:many|much) (?:mail|messages|emails)",
        r"sending (?:too fast|rate)",
        r"throttl",
        r"slow down",
        r"temporarily deferred due to (?:unexpected volume|user complaints)",
        r"unexpected volume",
        r"receiving mail (?:at a rate|too fast)",
        r"too fast",
        r"exceeded (?:the )?(?:hourly|daily|sending) (?:rate|limit|quota)",
    )),
    ("policyviolation", (
        r"content presents a potential",
        r"polic(?:y|ies)",
        r"prohibited",
        r"not accepted for policy",
        r"violat",
        r"header error",
    )),
    ("mesgtoobig", (
        r"message (?:is )?too (?:big|large)",
        r"(?:message|mail) size (?:limit|exceed)",
        r"exceeds? (?:the )?(?:maximum|max|fixed|size) (?:message )?(?:size|length)",
        r"size limit",
        r"message length exceeds",
        r"line (?:length )?limit exceeded",
        r"line too long",
        r"too large",
        r"file too big",
    )),
    ("exceedlimit", (
        r"exceeds? (?:the )?(?:recipient'?s? )?(?:limit|quota for)",
        r"limit exceeded",
    )),
    ("mailboxfull", (
        r"mail ?(?:box|folder) (?:is )?full",
        r"mail ?(?:box|folder)[^.]{0,20}full",
        r"full mailbox",
        r"over ?quota",
        r"quota (?:exceeded|exceed)",
        r"exceeds? (?:\w+ ){0,3}quota",
        r"disk quota",
        r"storage allocation",
        r"out of storage",
        r"mailbox size limit",
        r"mailbox (?:\w+ ){0,3}exceeds?",
        r"メールボックス(?:の容量)?が(?:一杯|いっぱい|満杯)",
        r"容量(?:が|を)?(?:超過|オーバー)",
    )),
    ("hasmoved", (
        r"has moved",
        r"moved to",
        r"no longer (?:at|with) this",
        r"forwarding address",
        r"changed (?:his|her|their) address",
    )),
    ("suspend", (
        r"(?:account|mailbox|user|address)\b[^\n;]{0,40}?"
        r"(?:disabled|suspended|inactive|deactivated|locked|expired|frozen|blocked|on hold)",
        r"(?:disabled|suspended|inactive|deactivated) (?:account|mailbox|user)",
        r"not (?:an )?active",
        r"(?:mailbox|account|user|recipient) (?:is )?temporarily unavailable",
    )),
    ("hostunknown", (
        r"host (?:or domain name )?not found",
        r"host [\w-]+(?:\.[\w-]+)+ not found",
        r"domain not found",
        r"unknown host",
        r"host unknown",
        r"unrout(?:e)?able (?:address|domain)",
        r"domain (?:does not|doesn'?t) exist",
        r"name (?:or service )?not known",
        r"nxdomain",
        r"unknown domain",
        r"no such domain",
        r"domain (?:is )?(?:not )?(?:valid|invalid)",
        r"invalid domain",
        r"unresolvable",
        r"dns lookup failed",
    )),
    ("notaccept", (
        r"(?:couldn'?t|could not|cannot|unable to) find (?:a|any) mail exchanger",
        r"no mx (?:records? )?(?:found|for)",
        r"(?:record )?indicated no smtp service",
        r"does not accept (?:e-?)?mail",
        r"not accept(?:ing)? (?:any )?(?:e-?)?mail",
        r"null mx",
        r"accepts no mail",
        r"no mail (?:service|accepted)",
    )),
    ("userunknown", (
        _NAMED + r"user unknown",
        r"unknown user",
        r"no such (?:user|recipient|mailbox|address|account|person)",
        _NAMED + r"(?:user|recipient|mailbox|address|account)(?: name)? (?:was |is )?"
        r"(?:not (?:found|known|listed|valid|exist)|unknown|invalid)",
        r"unknown (?:recipient|mailbox|address|local.?part)",
        r"recipientnotfound",
        r"does not exist",
        r"doesn'?t exist",
        r"no longer (?:exists?|valid|active|in use)",
        r"invalid (?:recipient|address|mailbox)",
        r"not a valid (?:recipient|user|mailbox)",
        r"no mailbox",
        r"bad destination mailbox",
        r"doesn'?t have an? [\w.-]+ account",
        r"is not a known user",
        r"not listed in (?:the )?(?:[\w-]+ ){0,3}directory",
        r"mailbox (?:is )?unavailable",
        r"unknown or illegal alias",
        r"recipient address rejected: access denied",
        r"address rejected(?!:\s*\w)",
        r"recipient (?:address )?rejected(?!:\s*\w)",
        r"undeliverable address",
        r"invalid (?:final delivery )?user ?id\b",
        r"no such local user",
        r"no valid recipients",
        r"address (?:wasn'?t|was not) found",
        r"address (?:couldn'?t|could not) be found",
        r"unrouteable address",
        r"見つかりません",
        r"見つからない",
        r"存在しません",
        r"存在しない",
        r"ディレクトリのリストにありません",
        r"宛先不明",
    )),
    ("filtered", (
        r"(?<![\w>])[245]\d\d:?\s+:\s+user unknown",
        r"<>:?\s+user unknown",
        r"filter",
        r"refused by (?:the )?recipient",
        r"blocked by (?:the )?recipient",
        r"recipient (?:has )?(?:blocked|rejected|refused)",
        r"not (?:authori[sz]ed|allowed|permitted) to (?:send|post|email)",
        r"only accepts? (?:mail|messages) from",
        r"members? only",
        r"sender (?:is )?not (?:allowed|permitted)",
    )),
    ("contenterror", (
        r"content (?:rejected|refused|not accepted|error)",
        r"(?:invalid|malformed|bad|broken|illegal|unsupported) (?:mime|attachment|encoding|character set|charset)",
        r"mime (?:error|structure|type not allowed)",
        r"attachments? (?:\w+ )?(?:not allowed|rejected|blocked|prohibited)",
    )),
    ("mailererror", (
        r"pipe to ",
        r"command (?:died|failed)",
        r"exit (?:code|status)",
        r"procmail",
        r"program (?:failed|error)",
        r"mailer (?:error|failed)",
        r"unknown mailer error",
    )),
    ("systemfull", (
        r"insufficient (?:system )?storage",
        r"(?:system|disk|server|spool) (?:is )?full",
        r"insufficient (?:disk )?space",
        r"no space left",
    )),
    ("expired", (
        r"envelope expired",
        r"failed \d+ (?:delivery )?attempts",
        r"retry time(?:out)? (?:not reached|exceeded)",
        r"failing for a long time",
        r"message expired",
        r"too long in (?:the )?queue",
        r"in (?:the )?queue too long",
        r"not (?:been )?delivered with(?:in)? \d+ (?:days?|hours?)",
        r"delivery time expired",
        r"gave up",
        r"giving up",
        r"queue timeout",
    )),
    ("networkerror", (
        r"(?:did not|didn'?t) accept our requests to connect",
        r"(?:host|server) (?:is not|isn'?t) responding",
        r"(?:host|server) (?:did not|didn'?t) respond",
        r"(?:host|server|destination) (?:is )?not reachable",
        r"too many hops",
        r"connection (?:timed out|refused|reset|lost|closed|dropped)",
        r"timed? ?out",
        r"no route to host",
        r"network (?:is )?unreachable",
        r"lost connection",
        r"host (?:is )?unreachable",
        r"could not connect",
        r"unable to connect",
        r"conversation with [^ ]+ timed out",
        r"mail (?:for \S+ )?loops? back",
        r"mail loop",
        r"host name lookup failure",
        r"\bdns (?:error|query failed|lookup failed|failure)",
        r"network error",
        r"hop count exceeded",
        r"routing loop",
    )),
    ("systemerror", (
        r"local configuration error",
        r"system error",
        r"internal (?:server )?error",
        r"server error",
        r"service (?:is )?(?:\w+ )?(?:not available|unavailable)",
        r"temporary (?:local )?problem",
        r"try again later",
        r"resources? (?:temporarily )?unavailable",
        r"loop detected",
        r"queue file write error",
    )),
    ("syntaxerror", (
        r"syntax error",
        r"command (?:not )?(?:recogni[sz]ed|unrecogni[sz]ed|not implemented)",
        r"bad sequence of commands",
        r"unrecognized command",
    )),
    ("rejected", (
        r"sender (?:address )?(?:rejected|refused|denied|unknown)",
        r"domain of sender",
        r"sender verify",
        r"sender domain",
        r"envelope sender",
    )),
    # Last: a refusal that says no more than that it refuses; the status may say more (B4).
    ("rejected", (
        r"(?<!recipient address )rejected",
        r"refused",
        r"denied",
        r"not allowed",
        r"administrative prohibition",
    )),
)
# Words that say the mailbox does not exist, not only that the receiver will not take it: Yahoo
# and Orange check their recipients at the end of DATA and answer with these.
NO_SUCH_ACCOUNT = re.compile(r"(?:doesn'?t|does not) have an? [\w.-]+ account|invalid recipient", re.I)
# Network trouble that waiting does not mend: no route, a lost connection, a loop, a failing DNS.
# A recipient given up on with these words failed on the path (`networkerror`), where one given
# up on after timeouts or refused connections only ran out of time (`expired`).
BROKEN_PATH = re.compile("|".join((
    r"no route to host", r"network (?:is )?unreachable", r"host (?:is )?unreachable", r"lost connection",
    r"too many hops", r"mail (?:for \S+ )?loops? back", r"mail loop", r"routing loop",
    r"host name lookup failure", r"\bdns (?:error|query failed|lookup failed|failure)", r"network error",
    r"hop count exceeded", r"(?:wasn'?t|was not|not) able to establish",
)), re.I)
COMPILED: tuple[tuple[Reason, re.Pattern[str]], ...] = tuple(
    (reason, re.compile("|".join(phrases), re.I)) for reason, phrases in PHRASES)


# A multi-line reply folded to one line repeats its codes inside the text ("550-5.7.1 Messages
# with multiple 550-5.7.1 addresses in From"): the repeats are dropped before the phrases are read.
_REPLY_CODE_RE = re.compile(r"(?<!\S)[245]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3}\s+)?")
_REPEATED_CODE_RE = re.compile(r"(?<=\S)\s+[245]\d\d[ -](?:[245]\.\d{1,3}\.\d{1,3}\s+)?(?=\S)")


# An address's words are a name, not a diagnosis: "<filtered@example.org>: User unknown" says
# nothing about a filter, "spam-trap@" nothing about spam.
_ADDRESS_RE = re.compile(r"[^\s<>\"'(),;:\[\]@]+@[\w-]+(?:\.[\w-]+)+")


def reason_of_text(text: str | None) -> Reason | None:
    """The first reason whose phrases the diagnostic contains, or None."""
    entry = _first_entry(text)
    return None if entry is None else PHRASES[entry][0]


def only_refused(text: str | None) -> bool:
    """The diagnostic's words say it was refused and nothing more ("550 5.7.9 Rejected")."""
    return _first_entry(text) == len(PHRASES) - 1


def _first_entry(text: str | None) -> int | None:
    if not text:
        return None
    text = text.replace("\u2019", "'")      # a typographic apostrophe ("wasn’t") reads as a plain one
    text = _ADDRESS_RE.sub("@", text)
    first = _REPLY_CODE_RE.search(text)
    if first:
        text = text[:first.end()] + _REPEATED_CODE_RE.sub(" ", text[first.end():])
    return next((index for index, (_, pattern) in enumerate(COMPILED) if pattern.search(text)), None)
