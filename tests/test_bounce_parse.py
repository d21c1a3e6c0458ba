"""Bounce parsing: one sample per MTA format, flufl.bounce's own samples when installed, fuzzing.

The samples in tests/bounces/ are written in each MTA's real output format; expected.json says
what the blacklist must learn from each. Precision matters more than recall: a false hard
bounce blacklists a customer, so auto-replies and delay warnings are tested as non-bounces.
"""

from __future__ import annotations

import email
import importlib.resources
import json
import random
from pathlib import Path

import flufl.bounce
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mailgate.bounceparse import BounceReport, find_token, parse_bounce, phrases as bouncetext, report_json
from mailgate.bounceparse.mime import header_text
from mailgate.rules.reason_vocabulary import REASONS
from thoroughness import examples

SAMPLES = Path(__file__).parent / "bounces"
EXPECTED = json.loads((SAMPLES / "expected.json").read_text())
REQUIRED_FORMATS = {
    "postfix-dsn.eml", "postfix-delayed.eml", "exim.eml", "qmail.eml", "exchange.eml", "gmail.eml",
    "yahoo.eml", "amazon-ses.eml", "sendmail.eml", "soft-mailbox-full.eml", "multi-recipient.eml",
    "autoreply.eml", "vacation.eml",
}
SAMPLE_BYTES = [(SAMPLES / name).read_bytes() for name in sorted(EXPECTED)]


def test_every_sample_has_an_expectation():
    on_disk = {p.name for p in SAMPLES.glob("*.eml")}
    assert on_disk == set(EXPECTED)
    assert REQUIRED_FORMATS <= on_disk


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name):
    raw = (SAMPLES / name).read_bytes()
    want = EXPECTED[name]
    report = parse_bounce(raw)
    assert report.is_bounce is want["is_bounce"]
    assert report.kind == want["kind"]
    got = [{"address": r.address, "permanent": r.permanent, "status": r.status, "reason": r.reason, "hard": r.hard}
           for r in report.recipients]
    assert got == want["recipients"]
    assert [r.address for r in report.delayed] == want["delayed"]
    assert all(r.action == "failed" for r in report.recipients)
    assert all(r.action == "delayed" for r in report.delayed)
    assert report.original_message_id == want["original_message_id"]
    assert find_token(raw) == want["token"]


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if "flufl_finds" in EXPECTED[n]])
def test_autoreplies_are_not_bounces_even_where_flufl_matches(name):
    """flufl.bounce's SimpleMatch reads these out-of-office texts as bounces; we must not."""
    raw = (SAMPLES / name).read_bytes()
    flufl_says = {a.decode() for a in flufl.bounce.scan_message(email.message_from_bytes(raw))}
    assert flufl_says == set(EXPECTED[name]["flufl_finds"])
    report = parse_bounce(raw)
    assert (report.is_bounce, report.kind, report.recipients) == (False, "autoreply", ())


def test_reasons_and_mtas_are_read():
    exim = parse_bounce((SAMPLES / "exim.eml").read_bytes()).recipients[0]
    assert "User unknown in local recipient table" in exim.diagnostic
    assert (exim.reason, exim.hard) == ("userunknown", True)
    assert exim.remote_mta == "mx2.example.org"
    gmail = parse_bounce((SAMPLES / "gmail.eml").read_bytes())
    assert gmail.reporting_mta == "googlemail.com"
    assert gmail.recipients[0].remote_mta == "gmail-smtp-in.l.google.com"
    assert "\n" not in gmail.recipients[0].diagnostic
    assert parse_bounce((SAMPLES / "qmail.eml").read_bytes()).reporting_mta == "mail.example.net"


def test_report_json_has_exactly_the_agreed_keys():
    report = parse_bounce((SAMPLES / "multi-recipient.eml").read_bytes())
    out = report_json(report, "tok")
    assert set(out) == {"is_bounce", "recipients", "token"}
    assert all(set(r) == {"address", "permanent", "hard", "status", "reason", "diagnostic"} for r in out["recipients"])
    assert [(r["reason"], r["hard"], r["permanent"]) for r in out["recipients"]] == [
        ("userunknown", True, True), ("mailboxfull", False, True)]
    assert out["token"] == "tok" and out["is_bounce"] is True
    assert json.loads(json.dumps(out)) == out
    assert report_json(parse_bounce(b""), None) == {"is_bounce": False, "recipients": [], "token": None}


# --- permanent or not (hard, the recipient's fault, is tested with the reasons) ---------------

@pytest.mark.parametrize("status, text, expected", [
    ("5.1.1", "User unknown", True),
    ("4.4.1", "Connection timed out", False),
    ("5.2.2", "Mailbox full", True),             # permanent, but not the recipient's fault
    ("4.2.2", "Mailbox full", False),
    ("4.2.2", None, False),
    ("5.7.1", "try again later", True),          # the DSN's status class outranks wording
    (None, "550 Requested action not taken: mailbox unavailable", True),
    (None, "451 please try again later", False),
    (None, "552 Requested mail action aborted: exceeded storage allocation", True),
    (None, "554 delivery error: dd This user doesn't have a example.com account", True),
    (None, "No such user here", True),
    (None, "Recipient address rejected: temporarily unavailable", False),
    (None, "mailbox is over quota", False),
    (None, "the address does not exist", True),
    (None, "something odd happened", None),
    (None, None, None),
])
def test_hard_or_soft(status, text, expected):
    assert bouncetext.is_permanent(status, text) is expected


@pytest.mark.parametrize("text, status", [
    ("550 5.1.1 <a@example.com>", "5.1.1"),
    ("Sorry, no mailbox here by that name. (#5.1.1)", "5.1.1"),
    ("550-5.01.01 padded", "5.1.1"),
    ("host 10.5.1.1 said nothing", None),
    ("connect to 192.0.2.25: refused", None),
    ("Exim 4.96", None),
])
def test_status_extraction(text, status):
    assert bouncetext.find_status(text) == status


# --- DSN variants seen in the wild --------------------------------------------------------

def _dsn(groups: str, *, encoding: str = "7bit", header_boundary: str = "b1") -> bytes:
    return (
        "From: MAILER-DAEMON@mx.example.org\nTo: bounce+tok@mycompany.example.com\n"
        "Subject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\n"
        f"Content-Type: multipart/report; report-type=delivery-status; boundary=\"{header_boundary}\"\n\n"
        "--b1\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n"
        f"--b1\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: {encoding}\n\n"
        f"{groups}\n--b1\nContent-Type: text/rfc822-headers\n\nMessage-ID: <orig@example.com>\n\n--b1--\n"
    ).encode()


GROUPS = ("Reporting-MTA: dns; mx.example.org\n\nFinal-Recipient: rfc822; <A@Example.NET>\n"
          "Action: failed\nStatus: 5.0.0\nDiagnostic-Code: smtp; 550 5.1.1 unknown user\n")


def test_dsn_status_refined_from_diagnostic_and_address_normalised():
    report = parse_bounce(_dsn(GROUPS))
    assert report.recipients[0].address == "a@example.net"
    assert report.recipients[0].status == "5.1.1"
    assert report.original_message_id == "<orig@example.com>"


def test_dsn_part_encoded_in_base64():
    import base64
    encoded = base64.encodebytes(GROUPS.encode()).decode()
    report = parse_bounce(_dsn(encoded, encoding="base64"))
    assert [r.address for r in report.recipients] == ["a@example.net"]


def test_groups_without_blank_lines_between_them():
    groups = ("Reporting-MTA: dns; mx.example.org\nFinal-Recipient: rfc822; one@example.net\n"
              "Action: failed\nStatus: 5.1.1\nFinal-Recipient: rfc822; two@example.net\n"
              "Action: failed\nStatus: 5.2.2\n")
    report = parse_bounce(_dsn(groups))
    assert [(r.address, r.hard) for r in report.recipients] == [
        ("one@example.net", True), ("two@example.net", False)]


def test_boundary_in_header_not_matching_the_body():
    report = parse_bounce(_dsn(GROUPS, header_boundary="rewritten-by-a-relay"))
    assert [r.address for r in report.recipients] == ["a@example.net"]


def test_original_recipient_preferred_over_final():
    groups = ("Final-Recipient: rfc822; forwarded@elsewhere.example\n"
              "Original-Recipient: rfc822;customer@example.com\nAction: failed\nStatus: 5.1.1\n")
    assert parse_bounce(_dsn(groups)).recipients[0].address == "customer@example.com"


def test_success_only_dsn_is_not_a_bounce():
    groups = "Final-Recipient: rfc822; ok@example.com\nAction: delivered\nStatus: 2.0.0\n"
    assert parse_bounce(_dsn(groups)).is_bounce is False


def test_person_writing_to_the_bounce_address_is_not_a_bounce():
    """flufl's LLNL detector reads any `, address,` as a bounce; a person's mail is not one."""
    raw = (b"From: Jane <jane@example.com>\nTo: bounce+tok@mycompany.example.com\nSubject: hello\n\n"
           b"Please write to me, jane.doe@example.com, or my colleague.\n")
    assert flufl.bounce.scan_message(email.message_from_bytes(raw))
    assert parse_bounce(raw).is_bounce is False


def test_exim_delay_warning_is_not_a_bounce():
    raw = (b"From: Mail Delivery System <Mailer-Daemon@mx.example.org>\n"
           b"Subject: Warning: message 1sEk2m-0004Xy-1a delayed 24 hours\n\n"
           b"This message was created automatically by mail delivery software.\n"
           b"A message that you sent has not yet been delivered to one or more of its\n"
           b"recipients after more than 24 hours on the queue on mx.example.org.\n\n"
           b"The address to which the message has not yet been delivered is:\n\n"
           b"  slow@example.net\n    Delay reason: SMTP error from remote mail server after RCPT TO:\n"
           b"    451 4.7.1 Greylisted, try again later\n\n"
           b"No action is required on your part. Delivery attempts will continue for some time.\n")
    report = parse_bounce(raw)
    assert report.is_bounce is False
    assert [r.address for r in report.delayed] == ["slow@example.net"]


# --- find_token -----------------------------------------------------------------------------

@pytest.mark.parametrize("headers, alias, token", [
    ("To: bounce+abc123@mycompany.example.com", "bounce", "abc123"),
    ("To: BOUNCE+ABC123@MyCompany.Example.com", "bounce", "abc123"),
    ("Delivered-To: Bounce+Zz9@mycompany.example.com\nTo: someone@example.com", "bounce", "zz9"),
    ("Delivered-To: bounce+fromenvelope@mycompany.example.com\nTo: bounce+fromheader@mycompany.example.com",
     "bounce", "fromenvelope"),
    ("X-Original-To: bounce+xo@mycompany.example.com", "bounce", "xo"),
    ("Envelope-to: bounce+exim@mycompany.example.com", "bounce", "exim"),
    ('To: "Sales" <sales@mycompany.example.com>, "Bounce" <bounce+42-mail.mail-7@mycompany.example.com>',
     "bounce", "42-mail.mail-7"),
    ("To: bounces+tok@mycompany.example.com", "bounces", "tok"),
    ("To: bounce@mycompany.example.com", "bounce", None),
    ("To: xbounce+tok@mycompany.example.com", "bounce", None),
    ("To: bounces+tok@mycompany.example.com", "bounce", None),
    ("X-Failed-Recipients: bounce+nottheaddressee@mycompany.example.com", "bounce", None),
    ("From: bounce+sender@mycompany.example.com", "bounce", None),
    ("Subject: no addressee at all", "bounce", None),
    ("To: bounce+tok@mycompany.example.com", "", None),
])
def test_find_token(headers, alias, token):
    raw = (headers + "\nSubject: x\n\nbody mentioning bounce+body@mycompany.example.com\n").encode()
    assert find_token(raw, alias) == token


def test_find_token_ignores_the_body_and_garbage():
    assert find_token(b"Subject: x\n\nTo: bounce+inbody@mycompany.example.com\n") is None
    assert find_token(b"\xff\xfe\x00garbage") is None
    assert find_token(b"") is None


# --- never a traceback ----------------------------------------------------------------------

EDGE_CASES = [
    b"",
    b"\x00" * 100,
    b"garbage without headers",
    b"Content-Type: multipart/report; boundary=\"x\"\n\n--x\nContent-Type: message/delivery-status\n\n",
    b"Content-Type: multipart/report\n\n--missing-boundary-param\n",
    b"Content-Type: text/plain; charset=x-unknown-charset\nContent-Transfer-Encoding: base64\n\n!!!notbase64",
    b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n=ZZ=\xff\xfe",
    b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n" + b"A" * (1 << 20),
    b"From: MAILER-DAEMON@x\nSubject: failure notice\n\n<" + b"a" * 600_000 + b"@example.com>:\n550 5.1.1\n",
    b"Subject: " + b"=?utf-8?q?" * 5000 + b"\n\nbody",
    b"Content-Type: multipart/mixed; boundary=a\n\n" + b"--a\nContent-Type: multipart/mixed; boundary=a\n\n" * 500,
    b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n" + b"TWVzc2FnZS1JRDogPGlkQHg+" * 3,
    b"Final-Recipient: rfc822; x@example.com\nAction: failed\n\n",
    b"\r\n\r\n\r\n" * 10,
]


@pytest.mark.parametrize("raw", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_never_raises_on_hostile_input(raw):
    assert isinstance(parse_bounce(raw), BounceReport)
    find_token(raw)


def test_sample_truncated_anywhere_still_reads():
    raw = (SAMPLES / "postfix-dsn.eml").read_bytes()
    for cut in range(0, len(raw), 97):
        report = parse_bounce(raw[:cut])
        assert isinstance(report, BounceReport)
        assert all(r.address == "jane.doe@example.net" for r in report.recipients)


def _mutate(data: bytes, rnd: random.Random, steps: int) -> bytes:
    buf = bytearray(data)
    for _ in range(steps):
        if not buf:
            break
        at = rnd.randrange(len(buf))
        choice = rnd.randrange(6)
        if choice == 0:
            buf[at] = rnd.randrange(256)
        elif choice == 1:
            del buf[at:at + rnd.randrange(1, 200)]
        elif choice == 2:
            buf[at:at] = rnd.randbytes(rnd.randrange(1, 40))
        elif choice == 3:
            buf[at:at] = buf[rnd.randrange(len(buf)):][:rnd.randrange(1, 300)]
        elif choice == 4:
            buf[at:at] = rnd.choice([b"\n\n", b"--", b"\r\n", b"Content-Type: multipart/report; boundary=z\n",
                                     b"Action: failed\n", b"=?utf-8?b?", b"<", b";", b"\x00", b"\xff"])
        else:
            del buf[at:]
    return bytes(buf)


FUZZ = settings(max_examples=examples(2500), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes(raw):
    report = parse_bounce(raw)
    assert isinstance(report, BounceReport)
    assert report.is_bounce == bool(report.recipients)
    token = find_token(raw)
    assert token is None or isinstance(token, str)


@FUZZ
@given(st.sampled_from(SAMPLE_BYTES), st.integers(min_value=0, max_value=2**32), st.integers(1, 12))
def test_fuzz_mutated_samples(sample, seed, steps):
    raw = _mutate(sample, random.Random(seed), steps)
    report = parse_bounce(raw)
    assert isinstance(report, BounceReport)
    assert report.is_bounce == (bool(report.recipients) or report.kind == "unnamed")
    for r in report.recipients + report.delayed:
        assert "@" in r.address and r.address == r.address.lower() and "<" not in r.address
        assert r.diagnostic is None or len(r.diagnostic) <= 500
        assert r.reason in REASONS and r.hard in (True, False)
    json.dumps(report_json(report, find_token(raw)))


@FUZZ
@given(st.text(max_size=400), st.sampled_from(["To", "Delivered-To", "Cc", "Subject", "X-Original-To"]))
def test_fuzz_find_token_headers(value, name):
    raw = f"{name}: {value}\n\nbody".encode("utf-8", "surrogateescape")
    token = find_token(raw)
    assert token is None or (token and token == token.lower())


# --- flufl.bounce's own samples, where the installed package ships them ---------------------

# Where an installed flufl.bounce keeps its sample reports. The PyPI wheel (6.x) ships none;
# Debian's python3-flufl.bounce (installed by scripts/install-deps for this) ships 115.
SYSTEM_FLUFL = Path("/usr/lib/python3/dist-packages/flufl/bounce")


def _shipped_samples() -> list[Path]:
    found = []
    for root in (Path(str(importlib.resources.files("flufl.bounce"))), SYSTEM_FLUFL):
        for sub in ("tests/data", "_detectors/tests/data", "data"):
            folder = root.joinpath(*sub.split("/"))
            if folder.is_dir():
                found += [f for f in folder.iterdir() if f.name.endswith((".txt", ".eml"))]
    return sorted(found)


def test_flufl_shipped_samples():
    """flufl.bounce's own sample reports (real bounces from many MTAs, read where an installed
    package keeps them, never copied here), scored against flufl's own reading: every sample
    flufl calls a failure must be one for us too, with its recipients; where flufl finds no
    recipient (a report naming a bare local part, a mail from a person), we must not invent one
    (a sample there once gave us a mailing list's Delivered-To from the quoted original)."""
    samples = _shipped_samples()
    if not samples:
        pytest.skip(f"no flufl.bounce sample messages installed (flufl.bounce {flufl.bounce.__version__}, "
                    f"nor Debian's python3-flufl.bounce)")
    detected = total = found = expected = silent = invented = 0
    for path in samples:
        raw = path.read_bytes()
        temporary, permanent = flufl.bounce.all_failures(email.message_from_bytes(raw))
        want = {a.decode("ascii", "replace").lower() for a in permanent | temporary}
        report = parse_bounce(raw)
        got = {r.address for r in report.recipients + report.delayed}
        if not want:
            silent += 1
            invented += bool(got)
            continue
        total += 1
        expected += len(want)
        found += len(want & got)
        detected += bool(got)
    print(f"flufl.bounce samples ({len(samples)}): detected {detected}/{total}, recipients {found}/{expected}; "
          f"where flufl finds none ({silent}), we name a recipient in {invented}")
    assert total and detected / total >= 0.95 and found / expected >= 0.95 and invented == 0


def test_raw_8bit_header_does_not_lose_the_report():
    """flufl's detectors fail on headers holding raw 8-bit bytes; the report is still read."""
    raw = (SAMPLES / "exim.eml").read_bytes().replace(b"Mail Delivery System", b"Mail Delivery Syst\xe8me")
    assert [r.address for r in parse_bounce(raw).recipients] == ["nosuchuser@example.org"]


@pytest.mark.parametrize("text, permanent", [
    ("User jdoe (jdoe@example.org) not listed in Domino Directory", True),
    ("Invalid final delivery userid: someone@example.org", True),
    ("No mx record found for domain=example.org", True),
    ("someone@example.org ... unknown host", True),
    ("ユーザー 山田 (yamada@example.jp) は Domino ディレクトリには見つかりません。", True),
    ("The message could not be delivered because the user's mailfolder is full.", False),
    ("User mailbox exceeds allowed size: someone@example.org", False),
    ("送信先のメールボックスが一杯のため、送信できませんでした。", False),
    ("Host not reachable.", False),
    ("all hosts have been failing for a long time and were last tried after this message arrived", False),
])
def test_report_wording_decides_without_a_code(text, permanent):
    assert bouncetext.is_permanent(None, text) is permanent


def test_failure_status_outranks_an_earlier_success_status():
    transcript = "<<< 250 2.1.5 Recipient ok >>> DATA <<< 554 5.7.1 Message content rejected"
    assert bouncetext.find_status(transcript) == "5.7.1"
    assert bouncetext.find_status("Status: 2.0.0 (delivered)") == "2.0.0"


# --- formats beyond RFC 3464 (docs/rules.md B1) -----------------------------------------------

def _ses(notice: dict) -> bytes:
    return ("From: AWS Notifications <no-reply@sns.amazonaws.com>\nTo: bounce+tok@mycompany.example.com\n"
            "Subject: AWS Notification Message\nContent-Type: text/plain\n\n" + json.dumps(notice) + "\n").encode()


def test_ses_notification_without_the_sns_envelope_and_split_lines():
    notice = {"notificationType": "Bounce", "bounce": {"bounceType": "Transient", "bouncedRecipients": [
        {"emailAddress": "full@example.org", "status": "4.2.2", "diagnosticCode": "smtp; 452 4.2.2 Mailbox full"}]},
        "mail": {"commonHeaders": {"messageId": "<m1@mycompany.example.com>"}}}
    raw = _ses(notice)
    long_line = raw.split(b"\n")[4]
    split = raw.replace(long_line, long_line[:60] + b"!\n " + long_line[60:])   # Sendmail's line splitting
    for message in (raw, split):
        report = parse_bounce(message)
        assert (report.kind, report.original_message_id) == ("ses", "<m1@mycompany.example.com>")
        assert [(r.address, r.permanent, r.reason, r.hard) for r in report.recipients] == [
            ("full@example.org", False, "mailboxfull", False)]


@pytest.mark.parametrize("kind", ["Complaint", "Delivery"])
def test_ses_complaints_and_deliveries_are_no_bounce(kind):
    report = parse_bounce(_ses({"notificationType": kind, "complaint": {"complainedRecipients": [
        {"emailAddress": "a@example.org"}]}}))
    assert (report.is_bounce, report.recipients) == (False, ())


def test_a_line_longer_than_998_bytes_is_split_not_cut():
    from mailgate.bounceparse.mime import MAX_LINE, SPLIT_MARK, capped
    line = b"x" * 2500
    out = capped(b"Subject: s\n\n" + line + b"\n")
    assert max(len(part) for part in out.split(b"\n")) <= MAX_LINE
    assert out.replace(SPLIT_MARK, b"").endswith(line + b"\n")


def test_eight_bit_text_under_a_seven_bit_label_is_read_as_utf8():
    report = parse_bounce((SAMPLES / "kddi-au.eml").read_bytes())
    assert report.recipients[0].reason == "mailboxfull"
    msg = email.message_from_bytes((SAMPLES / "kddi-au.eml").read_bytes())
    assert header_text(msg.get("subject")) == "メールエラー通知"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_sample_saved_with_crlf_or_cr_reads_the_same(name):
    raw = (SAMPLES / name).read_bytes()
    want = parse_bounce(raw)
    for ends in (b"\r\n", b"\r"):
        got = parse_bounce(raw.replace(b"\n", ends))
        assert [(r.address, r.reason, r.hard) for r in got.recipients] == [
            (r.address, r.reason, r.hard) for r in want.recipients]
        assert got.is_bounce is want.is_bounce and got.kind == want.kind


@pytest.mark.parametrize("diagnostic, reason", [
    ("X-Unix; 75", "mailererror"),
    ("x-unix; procmail: Couldn't create \"/var/mail/lee\": No such user", "mailererror"),
    ("x-unix; Quota exceeded, message delivery failed", "mailboxfull"),
])
def test_a_local_programs_failure_is_a_mailer_error(diagnostic, reason):
    """docs/rules.md B4: a Diagnostic-Code of type x-unix is a delivery program's exit."""
    groups = ("Reporting-MTA: dns; mx.example.org\n\nFinal-Recipient: rfc822; lee@example.net\n"
              f"Action: failed\nStatus: 5.0.0\nDiagnostic-Code: {diagnostic}\n")
    [recipient] = parse_bounce(_dsn(groups)).recipients
    assert (recipient.reason, recipient.hard) == (reason, False)


def test_a_postmaster_the_returned_message_was_sent_to_is_a_failed_recipient():
    """A daemon's address is no failed recipient (it is the report's sender, or a quoted one),
    unless the returned message was addressed to it: mail to a postmaster bounces too."""
    report = (b"From: Mail Administrator <postmaster@mx.example.jp>\nTo: bounce+tok@mycompany.example.com\n"
              b"Subject: Mail Delivery Failed\nMIME-Version: 1.0\n"
              b"Content-Type: multipart/mixed; boundary=\"b1\"\n\n--b1\nContent-Type: text/plain\n\n"
              b"   ----- The following addresses had delivery problems -----\nRECIPIENT\n\n"
              b"   ----- Non-delivered information -----\nThe mailbox of the recipient is full.\n\n"
              b"--b1\nContent-Type: message/rfc822\n\nFrom: Lee <lee@mycompany.example.com>\nTo: <ADDRESSED>\n"
              b"Subject: hello\n\nhi\n--b1--\n")
    sent_to_it = parse_bounce(report.replace(b"RECIPIENT", b"postmaster@example.jp")
                              .replace(b"ADDRESSED", b"postmaster@example.jp"))
    assert [r.address for r in sent_to_it.recipients] == ["postmaster@example.jp"]
    quoted_only = parse_bounce(report.replace(b"RECIPIENT", b"postmaster@example.jp")
                               .replace(b"ADDRESSED", b"lee@example.jp"))
    assert all(r.address != "postmaster@example.jp" for r in quoted_only.recipients)


def test_a_postmaster_named_in_a_text_report_with_headers_quoted_after_a_full_stop():
    """A small MTA's report ("Message headers follow.", the headers quoted as text): the
    quoted To names the postmaster the message was sent to, so it is the failed recipient."""
    report = (b"From: MAILER-DAEMON <>\r\nTo: lee@mycompany.example.com\r\nSubject: Mail delivery failed\r\n\r\n"
              b"This is the mail agent at mycompany.example.com.\r\n\r\n"
              b"There was an error delivering your mail to <postmaster@shop.example.net>.\r\n\r\n"
              b"DNS lookup failure: host shop.example.net not found\r\n\r\nMessage headers follow.\r\n\r\n"
              b"Subject: order\r\nTo: <postmaster@shop.example.net>\r\nFrom: <lee@mycompany.example.com>\r\n\r\n")
    [recipient] = parse_bounce(report).recipients
    assert (recipient.address, recipient.reason, recipient.hard) == ("postmaster@shop.example.net", "hostunknown", True)


def test_iso_2022_jp_written_raw_into_a_field_is_decoded():
    assert header_text("\x1b$B8+$D$+$j$^$;$s\x1b(B (lee@example.jp)") == "見つかりません (lee@example.jp)"
    assert header_text("plain $B text") == "plain $B text"
