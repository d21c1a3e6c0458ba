"""The reason of a failed recipient (docs/rules.md B4), whose fault it is (B5): table-driven,
no sockets. The phrase table's samples are read from the rules document itself, so that every
entry there is checked and every sample there is a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mailgate.rules.bounce_reasons import classify, reason_and_hard, reply_code, smtp_command
from mailgate.rules.reason_phrases import PHRASES, reason_of_text
from mailgate.rules.reason_vocabulary import REASONS, RECIPIENT_FAULT, SENDER_SIDE, is_hard

RULES = Path(__file__).resolve().parents[1] / "docs" / "rules.md"
_ROW = re.compile(r"^\| (\w+) \| [^|]+ \| `([^`]+)` \|$", re.M)


def _document_samples() -> list[tuple[str, str]]:
    text = RULES.read_text()
    table = text[text.index("**B4."):text.index("**B5.")]
    return _ROW.findall(table)


def test_every_phrase_entry_has_a_sample_in_the_rules_document():
    assert sorted(reason for reason, _ in _document_samples()) == sorted(reason for reason, _ in PHRASES)
    assert [reason for reason, _ in _document_samples()] == [reason for reason, _ in PHRASES], "same order"


@pytest.mark.parametrize("reason, sample", _document_samples())
def test_the_documented_sample_gives_its_reason(reason, sample):
    status = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", sample)
    got, _ = reason_and_hard(status.group(1) if status else None, None, sample)
    assert got == reason


@pytest.mark.parametrize("status, code, command, text, reason", [
    ("5.1.1", "550", "RCPT", "Mailbox unavailable or access denied", "userunknown"),  # a specific status decides
    ("5.1.1", "550", "RCPT", "rejected: your IP is listed at bl.example.net", "blocked"),  # ...but never over a
    ("5.1.3", "553", "RCPT", "http://www.spamhaus.org/query/bl?ip=192.0.2.7", "blocked"),  # block list
    ("5.1.1", "552", None, "sorry, mailbox lee@example.org is over quota temporarily", "mailboxfull"),  # it exists
    ("5.1.0", "553", "MAIL", "neko.example.com does not exist", "rejected"),   # MAIL FROM: our sender refused
    ("4.0.0", "421", "CONN", "server refused to talk to me: 421 Service not available", "blocked"),
    ("4.0.0", None, None, "DNS type 'mx' lookup of example.jp responded with code NXDOMAIN", "networkerror"),
    ("5.2.2", "552", "RCPT", "User unknown", "mailboxfull"),
    ("5.7.26", "550", "DATA", "Unauthenticated email from example.com", "authfailure"),
    ("5.7.1", "550", "RCPT", "Service unavailable; client host blocked using bl.example", "blocked"),  # generic
    ("5.7.1", "550", "DATA", "Our system has detected that this message is likely unsolicited mail", "spamdetected"),
    ("5.7.1", "554", "RCPT", "<lee@example.org>: Relay access denied", "norelaying"),
    ("5.0.0", "550", "RCPT", "User unknown", "userunknown"),
    ("5.0.0", "550", "DATA", "User unknown", "filtered"),          # accepted at RCPT, refused after DATA
    ("5.0.0", "550", "CONN", "Access denied", "blocked"),          # before MAIL FROM: about us
    (None, "550", None, "Requested action not taken", "rejected"),   # a bare 550 is no unknown user
    (None, "552", "DATA", None, "mesgtoobig"),
    (None, "552", "RCPT", None, "mailboxfull"),
    (None, "554", "EHLO", None, "blocked"),
    (None, "553", "MAIL", None, "rejected"),
    (None, "451", None, None, "expired"),                           # given up on a temporary failure
    ("4.4.1", None, None, None, "expired"),
    ("4.4.1", None, None, "Connection timed out", "expired"),      # given up: the last try's trouble is no more
    ("4.2.2", None, None, "Mailbox full", "mailboxfull"),           # ...but a telling reason stays
    ("5.7.1", None, None, None, "securityerror"),                   # the subject alone
    ("5.2.1", "550", "RCPT", None, "suspend"),
    ("5.2.1", "550", "RCPT", "User Unknown", "userunknown"),        # the text refines 5.2.1
    ("5.4.4", None, None, "Host or domain name not found", "hostunknown"),
    ("5.6.0", "550", "RCPT", "<lee@example.org>: Recipient address rejected: Media error", "contenterror"),
    ("5.7.1", "551", "RCPT", "<lee@example.org>: Recipient address rejected: Delivery not authorized",
     "securityerror"),                                              # the prefix says nothing, the status does
    ("5.3.2", "521", "RCPT", "Recipient address rejected: System not accepting network messages", "notaccept"),
    ("5.2.3", "552", None, "Message length exceeds administrative limit", "exceedlimit"),  # the mailbox's limit
    ("5.3.4", "552", None, "Message length exceeds administrative limit", "mesgtoobig"),   # the system's
    ("2.0.0", "250", None, "ok", "delivered"),
    (None, None, None, None, "undefined"),
    (None, None, None, "Something odd happened on the way", "onhold"),   # words, none we can place
    ("4.4.3", None, None, "Unable to contact LDAP server. (#4.4.3)", "systemerror"),  # a directory server
    ("4.4.6", None, None, None, "networkerror"),                                   # a routing loop
    ("4.4.7", None, None, "Deferred: Name server: example.net.: host name lookup failure", "networkerror"),
    ("4.4.7", None, None, "Deferred: Connection refused by mx.example.net. Message could not be delivered "
     "for 5 days", "expired"),                                                    # refused: time ran out
    ("4.4.1", None, None, "connect to mx.example.net[192.0.2.9]:25: No route to host", "networkerror"),
    ("4.4.2", None, None, "lost connection with mx.example.net[192.0.2.9] while sending RCPT TO", "networkerror"),
    ("5.4.312", "550", None, "550 5.4.312 Message expired, DNS query failed", "networkerror"),
    ("5.4.316", "550", None, "550 5.4.316 Message expired, connection refused", "expired"),
    (None, None, None, "Name service error for name=example.net type=MX: Host not found, try again",
     "networkerror"),                                                             # DNS did not answer this time
    (None, "501", "HELO", "501 5.0.0 Invalid domain name", "blocked"),            # our HELO name, not a recipient
    ("5.7.9", "550", None, "550 5.7.9 Rejected", "securityerror"),                # the status says more
    ("5.7.9", "550", "MAIL", "550 5.7.9 Rejected", "rejected"),                   # ...except of our sender
    ("5.7.1", "550", None, "550 5.7.1 Message refused", "rejected"),              # 5.7.1 says no more
    ("5.0.0", "554", "DATA", "554 delivery error: dd This user doesn't have a example.com account", "userunknown"),
    ("5.5.0", "550", "DATA", "550 5.5.0 Invalid recipient", "userunknown"),       # checked at end of DATA
])
def test_order_of_trust(status, code, command, text, reason):
    assert classify(status, code, command, text) == reason


def test_a_broken_path_is_a_network_error_even_in_a_delay():
    assert classify(None, None, None, "connect to mx.example.net[192.0.2.9]:25: No route to host",
                    delayed=True) == "networkerror"
    assert classify(None, None, None, "lee@example.net: Network error on destination MXs",
                    delayed=True) == "networkerror"
    assert classify("4.4.1", None, None, "Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)",
                    delayed=True) == "networkerror"


def test_a_delayed_recipient_is_expired_unless_its_words_say_why():
    assert classify("4.4.1", None, None, None, delayed=True) == "expired"
    assert classify(None, None, None, "Message will be retried for 2 more day(s)", delayed=True) == "expired"
    assert classify("4.4.1", None, None, "Connection timed out", delayed=True) == "expired"
    assert classify("4.2.2", "452", None, "Mailbox full", delayed=True) == "mailboxfull"


def test_a_server_that_never_answered_is_expired():
    """Given up with only network trouble and no code from anyone: nothing was refused."""
    assert classify(None, None, None, "The recipient server did not accept our requests to connect") == "expired"
    assert classify(None, "220", None, "220 mx.example.net ESMTP; did not accept our requests to connect") == "expired"
    assert classify(None, None, None, "Connection timed out") == "expired"
    assert classify("5.4.6", None, None, "Too many hops") == "networkerror"       # a status: something answered


@pytest.mark.parametrize("reason, permanent, hard", [
    ("userunknown", True, True), ("userunknown", False, True), ("hostunknown", None, True), ("hasmoved", True, True),
    ("notaccept", True, True), ("notaccept", False, False), ("notaccept", None, False),
    ("mailboxfull", True, False), ("blocked", True, False), ("spamdetected", True, False), ("undefined", None, False),
])
def test_hard_is_the_recipients_fault(reason, permanent, hard):
    assert is_hard(reason, permanent) is hard


def test_the_vocabulary():
    assert len(REASONS) == 35 and all(r == r.lower() and r.isalpha() for r in REASONS)
    assert RECIPIENT_FAULT | SENDER_SIDE <= set(REASONS) and not RECIPIENT_FAULT & SENDER_SIDE
    assert {reason for reason, _ in PHRASES} <= set(REASONS)


@pytest.mark.parametrize("text, command", [
    ("SMTP error from remote mail server after RCPT TO:<a@example.org>: 550 unknown", "RCPT"),
    ("host mx.example.org[192.0.2.1] said: 554 5.7.1 spam (in reply to end of DATA command)", "DATA"),
    ("SMTP error from remote mail server after initial connection: 554 go away", "CONN"),
    ("did not like our MAIL FROM: 553 sender refused", "MAIL"),
    (">>> RCPT To:<a@example.org> <<< 250 ok >>> DATA <<< 554 content rejected", "DATA"),
    ("connect to mx.example.org[192.0.2.1]: server refused to talk to me: 554 go away", "CONN"),
    ("192.0.2.1 does not like recipient. Remote host said: 550 <a@example.org>... User Unknown", "RCPT"),
    ("Sorry, no SMTP connection got far enough; most progress was RCPT TO response", "RCPT"),
    ("Connected to 192.0.2.1 but sender was rejected. Remote host said: 553 go away", "MAIL"),
    ("Connected to 192.0.2.1 but my name was rejected. Remote host said: 501 bad name", "HELO"),
    ("Technical details: SMTP:RCPT host 192.0.2.1: 553 5.3.0 <a@example.org>... No such user", "RCPT"),
    ("Remote host said: 550 5.2.1 <a@example.org>... User Unknown [RCPT_TO]", "RCPT"),
    ("550 User unknown", None),
])
def test_smtp_command(text, command):
    assert smtp_command(text) == command


def test_reply_code():
    assert reply_code("host said: 550-5.1.1 nope") == "550" and reply_code("version 4.96") is None


def test_repeated_codes_of_a_folded_reply_are_read_past():
    text = "550-5.7.1 [192.0.2.7] Messages with multiple 550-5.7.1 addresses in From: header are not accepted."
    assert reason_of_text(text) == "notcompliantrfc"
    assert reason_of_text("host said: 550 5.7.26 Unauthenticated email is not accepted") == "authfailure"


def test_text_without_known_words():
    assert reason_of_text("the weather is nice") is None and reason_of_text(None) is None


@pytest.mark.parametrize("text, reason", [
    ("550 Connection rate limit exceeded for your host", "toomanyconn"),
    ("550 Ip frequency limited, try later", "toomanyconn"),
    ("550 5.1.1 192.0.2.7 has sent to too many recipients this hour", "speeding"),
    ("452 4.5.3 Too many recipients", "toomanyconn"),
    ("421 4.7.0 Messages from 192.0.2.7 temporarily deferred due to unexpected volume", "speeding"),
    ("450 4.7.1 Access denied. IP name lookup failed [192.0.2.7]", "requireptr"),
    ("501 RCPT TO not accepted: this system is not configured to relay mail", "norelaying"),
    ("554 mx.example.org ESMTP not accepting connections", "blocked"),
    ("550 This message fails to pass SPF authentication checks", "authfailure"),
    ("550 Unauthenticated senders not allowed", "securityerror"),
    ("552 This message was blocked because its content presents a potential security issue", "policyviolation"),
    ("550 Messages with multiple Subject headers are not accepted. To reduce the amount of spam...", "notcompliantrfc"),
    ("User jdoe (jdoe@example.org) not listed in Domino Directory", "userunknown"),   # not a block list
    ("550 Your IP is listed at bl.example.net", "blocked"),
    ("The email address wasn’t found at the destination domain", "userunknown"),
    ("Error: No valid recipients for this MM", "userunknown"),
    ("550 User lee@example.org temporary locked. Please try again later", "suspend"),
    ("Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)", "notaccept"),   # exists, no mail server
    ("No MX record found for domain example.net", "notaccept"),
    ("421 4.7.0 Deferred: too many user complaints about mail from 192.0.2.7", "badreputation"),
    ("552-5.7.0 This message was blocked because its content presents a potential", "policyviolation"),  # cut
    ("550 : User unknown", "filtered"),                              # the address hidden: the recipient's filter
    ("550 <>: User unknown", "filtered"),
    ("550 <lee@example.jp>: User unknown", "userunknown"),
    ("550 <filtered@example.org>: Recipient address rejected: User unknown", "userunknown"),  # a name, not a word
    ("550 <spam-trap@example.org>... Mailbox unavailable", "userunknown"),
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", "userunknown"),
    ("an MX or SRV record indicated no SMTP service", "notaccept"),
    ("lee@example.org: Envelope expired", "expired"),
    ("Delivery failed 12 attempts: lee@example.org", "expired"),
    ("The recipient server did not accept our requests to connect", "networkerror"),
    ("421 Host not reachable", "networkerror"),
    ("554 5.4.6 Too many hops", "networkerror"),
    ("the group you tried to contact (sales) may not exist, or you may not have permission to post", "rejected"),
    ("Si tienes preguntas, visita https://groups.google.com/support/", "rejected"),
    ("Received: from mx; Content-Type: text/plain; charset=utf-8 Host not found", "hostunknown"),  # quoted headers
    ("554 5.6.0 Invalid MIME structure", "contenterror"),
    ("550 5.7.0 <lee@example.jp>... Please use the SMTP server of your ISP", "blocked"),   # our IP, not a mail server
    ("554 5.7.0 Header error", "policyviolation"),
    ("500 5.3.0 Line limit exceeded", "mesgtoobig"),
    ("451 4.3.0 Error: queue file write error", "systemerror"),
    ("Remote host is not responding", "networkerror"),
    ("Your message was not delivered within 3 days and 2 hours", "expired"),
    ("this message has been in the queue too long", "expired"),
    ("Maximum hop count exceeded. Message probably in a routing loop", "networkerror"),
    ("DNS lookup failure: host mx.example.invalid not found", "hostunknown"),
    ("550 domain [example.com] mismatches client ip 192.0.2.7", "requireptr"),
    ("550-REJECTED - Blacklisted URL in message (example.com)", "spamdetected"),
    ("550 Sorry, you are sending from an address that has been blacklisted", "rejected"),  # an address, not an IP
    ("550 5.7.1 IP address blacklisted by recipient", "blocked"),
    ("550 From: Domain is invalid. Please provide a valid From:", "rejected"),
    ("550 5.2.1 The user is receiving mail at a rate that prevents additional messages", "speeding"),
    ("Resources temporarily unavailable, please try again later", "systemerror"),   # not a suspended mailbox
    ("550 Mailbox temporarily unavailable", "suspend"),
    ("Final-Recipient: rfc822; lee@example.org ... |exec /usr/bin/procmail", "mailererror"),  # "rfc822;" is no RFC
])
def test_wording(text, reason):
    """Phrases beyond the table's one sample each: every one is a general wording, written here."""
    assert reason_of_text(text) == reason
