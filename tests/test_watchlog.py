"""`mailgate watch-log`: Postfix's log lines parsed, recorded once, and fed to the bounce rules.

The parser table uses lines copied from a Postfix 3.7.11 lab run (its own `maillog_file`); one
test reads a live lab instance's maillog end to end. The multi-day blacklist history is written
as synthetic lines, since the follower takes each event's time from its own line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import smtplib
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings, strategies as st

from mailgate.commands import watchlog
from mailgate.commands.watchlog import LogEvent, derived_server, follow, follow_journal, main_watch_log, parse_line
from mailgate.commands.watchlog.parsing import parse_current
from mailgate.configfile import parse_config
from mailgate.lab.postfix import make_basedir
from mailgate.store import BounceRecord, OutboundRecord, open_store
from mailgate.store.sqlite import SQLiteStore
from thoroughness import examples

CONFIG = parse_config("""
alias_domain: mycompany.com
servers:
  - {name: transactional, host: smtp.example.net, port: 587, security: starttls}
  - {name: mass, host: mass.example.net, port: 465, security: tls}
""", check_files=False).config

# Real lines from a Postfix 3.7.11 lab instance (maillog_file), queue ids and ports as logged.
REAL_BOUNCED = ("Nov 25 22:46:46 mailgate-lab postfix/smtp[20184]: 12DA720C782: to=<gone@x.example>, "
                "relay=127.0.0.1[127.0.0.1]:38023, delay=0.03, delays=0.01/0.01/0/0.01, dsn=5.1.1, status=bounced "
                "(host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to RCPT TO command))")
REAL_DEFERRED = ("Nov 25 22:46:46 mailgate-lab postfix/smtp[20184]: 12DA720C782: to=<later@x.example>, "
                 "relay=127.0.0.1[127.0.0.1]:38023, delay=0.04, delays=0.01/0.01/0/0.02, dsn=4.2.0, status=deferred "
                 "(host 127.0.0.1[127.0.0.1] said: 450 4.2.0 try later (in reply to RCPT TO command))")
REAL_SENT = ("Nov 25 22:46:46 mailgate-lab postfix/smtp[20184]: 12DA720C782: to=<ok@x.example>, "
             "relay=127.0.0.1[127.0.0.1]:38023, delay=0.04, delays=0.01/0.01/0/0.02, dsn=2.0.0, "
             "status=sent (250 saved 0)")
REAL_LOCAL = ("Nov 25 22:47:36 mailgate-lab postfix/local[21706]: D0CE320C714: to=<x@[127.0.0.1]>, relay=local, "
              "delay=0.03, delays=0.01/0.01/0/0.01, dsn=5.1.1, status=bounced (unknown user: \"x\")")
REAL_EXPIRED = ("Nov 25 22:47:02 mailgate-lab postfix/qmgr[20919]: 37F3720C9E7: from=<alice@example.com>, "
                "status=expired, returned to sender")
NOT_EVENTS = [
    "Nov 25 22:46:46 mailgate-lab postfix/qmgr[20178]: 12DA720C782: from=<alice@example.com>, size=317, nrcpt=3 "
    "(queue active)",
    "Nov 25 22:46:46 mailgate-lab postfix/cleanup[20183]: 12DA720C782: message-id=<20261125224646.12DA720C782@lab>",
    "Nov 25 22:46:46 mailgate-lab postfix/bounce[20185]: 12DA720C782: sender non-delivery notification: 1B63220C0B6",
    "Nov 25 22:46:46 mailgate-lab postfix/qmgr[20178]: 1B63220C0B6: removed",
    "Nov 25 22:46:46 mailgate-lab postfix/smtp/smtpd[20180]: connect from localhost[127.0.0.1]",
    "Nov 25 22:46:46 mailgate-lab postfix/master[20176]: daemon started -- version 3.7.11, configuration /tmp/x/etc",
    "Nov 25 22:46:46 mailgate-lab mailgate[812]: 4Xk2p1Lz: role=outbound from=<a@b.example> server=transactional",
    "Nov 25 22:46:46 mailgate-lab postfix/smtp[1]: 12DA720C782: to=<a@b.example>, relay=none, "
    "delay=1, delays=0/0/1/0, dsn=2.1.5, status=deliverable (address verification)",
    "Nov 25 22:46:46 mailgate-lab sm-mta[1]: 12DA720C782: to=<a@b.example>, relay=x, dsn=2.0.0, status=sent (ok)",
    "Feb 30 22:46:46 mailgate-lab postfix/smtp[1]: Q1: to=<a@b.example>, relay=none, delay=1, dsn=2.0.0, status=sent",
    "",
    "garbage",
]
YEAR = 2026
NOW = datetime(2026, 11, 26, tzinfo=UTC).timestamp()


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize("line, expected", [
    (REAL_BOUNCED, dict(queue_id="12DA720C782", recipient="gone@x.example", status="bounced", dsn="5.1.1",
                        relay="127.0.0.1[127.0.0.1]:38023", delay=0.03, tag="postfix/smtp", host="mailgate-lab",
                        reason="host 127.0.0.1[127.0.0.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)",
                        at=at("2026-11-25T22:46:46"))),
    (REAL_DEFERRED, dict(status="deferred", dsn="4.2.0", recipient="later@x.example")),
    (REAL_SENT, dict(status="sent", dsn="2.0.0", reason="250 saved 0", delay=0.04)),
    (REAL_LOCAL, dict(relay="local", status="bounced", reason='unknown user: "x"', recipient="x@[127.0.0.1]")),
    (REAL_EXPIRED, dict(status="expired", recipient=None, sender="alice@example.com", queue_id="37F3720C9E7")),
    # a service prefix in the tag, orig_to, conn_use, a one-digit day
    ("Nov  5 01:02:03 gw postfix/mg-transactional/smtp[99]: 4Xk2p1LzQmz9: to=<bob@example.org>, "
     "orig_to=<Bob@Example.org>, relay=smtp.example.net[192.0.2.1]:587, conn_use=2, delay=1.2, "
     "delays=0.1/0/0.5/0.6, dsn=2.0.0, status=sent (250 2.0.0 OK id=1x)",
     dict(tag="postfix/mg-transactional/smtp", orig_to="Bob@Example.org", queue_id="4Xk2p1LzQmz9",
          at=at("2026-11-05T01:02:03"), delay=1.2)),
    # RFC 3339 (rsyslog's precise format) and journalctl's short-iso
    ("2026-11-25T22:13:00.250000+01:00 gw postfix/submission/smtp[5]: AB12: to=<a@b.example>, relay=none, "
     "delay=30, delays=30/0/0/0, dsn=4.4.1, status=deferred (connect to b.example[192.0.2.2]:25: Connection refused)",
     dict(at=at("2026-11-25T21:13:00.250000"), relay="none", dsn="4.4.1")),
    ("2026-11-25T22:13:00+0000 gw postfix/smtp[5]: AB12: to=<a@b.example>, relay=odoo, delay=0.1, "
     "delays=0/0/0/0.1, dsn=2.0.0, status=sent (delivered via odoo service)",
     dict(at=at("2026-11-25T22:13:00"), relay="odoo")),
    ("2026-11-25T22:13:00Z gw postfix-out/smtp[5]: AB12: to=<a@b.example>, relay=none, delay=432000, "
     "delays=0/0/0/0, dsn=4.4.1, status=expired, returned to sender",
     dict(status="expired", reason=None, recipient="a@b.example")),
])
def test_parse_line(line, expected):
    event = parse_line(line, YEAR)
    assert event is not None
    for key, value in expected.items():
        assert getattr(event, key) == value, key


@pytest.mark.parametrize("line", NOT_EVENTS)
def test_lines_that_are_not_delivery_results(line):
    assert parse_line(line, YEAR) is None


def test_a_december_line_read_in_january_is_last_years():
    january = datetime(2027, 1, 1, 0, 5, tzinfo=UTC).timestamp()
    event = parse_current("Dec 31 23:59:00 " + REAL_SENT.split(" ", 3)[3], january)
    assert event.at == at("2026-12-31T23:59:00")


@settings(max_examples=examples(400), deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text):
    parse_line(text, YEAR)


_FRAGMENTS = ["Nov 25 22:46:46 ", "Feb 29 ", "2026-02-30T25:00:00+99:99 ", "9999-12-31T23:59:59.999999-23:59 ",
              "host ", "postfix/smtp[1]: ", "Q1: ", "to=<", ">, ", "orig_to=<", "relay=", "delay=", "dsn=5.1.1, ",
              "status=bounced", "status=expired, returned to sender", " (", ")", "from=<", "[", "]", ":", ",", " "]


@settings(max_examples=examples(400), deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=5)), max_size=25),
       st.integers(min_value=-10, max_value=20000))
def test_near_miss_lines_never_raise(parts, year):
    parse_line("".join(parts), year)


def test_server_derived_from_the_tag_or_a_unique_configured_relay():
    def event(relay, tag="postfix/smtp"):
        return LogEvent(at=0, host="h", tag=tag, queue_id="Q", status="sent", recipient="a@b", relay=relay)
    assert derived_server(event("none", "postfix/mg-mass/smtp"), CONFIG) == "mass"
    assert derived_server(event("mg-transactional"), CONFIG) == "transactional"
    assert derived_server(event("smtp.example.net[192.0.2.1]:587"), CONFIG) == "transactional"
    assert derived_server(event("smtp.example.net[192.0.2.1]:25"), CONFIG) is None
    assert derived_server(event("local"), CONFIG) is None


# -- recording -----------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def store(request, tmp_path):
    """Both backends: the PostgreSQL one also proves the lock keys and the backend-neutral SQL."""
    if request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "db.sqlite3")
        opened.reopen = lambda: SQLiteStore(opened.path)
    else:
        server = request.getfixturevalue("postgres")
        name = f"t{uuid.uuid4().hex[:12]}"
        server.create_database(name)
        opened = open_store(server.dsn(name))
        opened.reopen = lambda: open_store(server.dsn(name))
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store(tmp_path):
    opened = SQLiteStore(tmp_path / "db.sqlite3")
    yield opened
    opened.close()


def outbound(store, queue_id, tokenised=False, server="transactional"):
    return store.record_outbound(OutboundRecord(
        queue_id=queue_id, message_id=f"<{queue_id}@mycompany.com>", envelope_from_original="a@mycompany.com",
        envelope_from="a@mycompany.com", header_from_before=None, header_from_after=None, server=server,
        mass=False, listener="ORIGINATING", sasl_user=None, created_at=0.0, tokenised=tokenised))


def line(when: str, qid: str, rcpt: str, status: str, dsn: str, reason: str = "ok") -> str:
    return (f"{when}+00:00 gw postfix/smtp[7]: {qid}: to=<{rcpt}>, relay=mx.example.org[192.0.2.9]:25, "
            f"delay=1, delays=0/0/0/1, dsn={dsn}, status={status} ({reason})\n")


def rows(store, table):
    return store._rows(f"select * from {table} order by id")


def read(path, store, **kwargs):
    return follow(str(path), store, CONFIG, once=True, clock=lambda: NOW, **kwargs)


def test_five_bounces_over_days_blacklist_and_a_delivery_clears_it(tmp_path, store, caplog):
    log = tmp_path / "mail.log"
    for n in range(1, 7):
        outbound(store, f"B{n}")
    with log.open("w") as handle:
        for n, day in enumerate((1, 4, 7, 10), start=1):
            handle.write(line(f"2026-11-{day:02d}T10:00:00", f"B{n}", "Gone@Dead.example", "bounced", "5.1.1",
                              "host mx said: 550 5.1.1 no such user"))
    read(log, store)
    assert len(rows(store, "bounces")) == 4 and not store.blacklisted(["gone@dead.example"])
    bounce = rows(store, "bounces")[0]
    assert (bounce["source"], bounce["permanent"], bounce["status"], bounce["server"], bounce["recipient"]) == \
        ("postfix-log", 1, "5.1.1", "transactional", "gone@dead.example")
    assert bounce["diagnostic"] == "host mx said: 550 5.1.1 no such user" and bounce["message"] is not None
    assert (bounce["reason"], bounce["hard"]) == ("userunknown", 1)

    with log.open("a") as handle:
        handle.write(line("2026-11-13T10:00:00", "B5", "gone@dead.example", "bounced", "5.1.1"))
    with caplog.at_level(logging.INFO, logger="mailgate"):
        read(log, store)
    entry = store.blacklist_entries()[0]
    assert entry.address == "gone@dead.example" and entry.source == "rule"
    assert entry.added_at == at("2026-11-13T10:00:00")
    assert "role=blacklist rcpt=<gone@dead.example> action=add" in caplog.text

    store.blacklist_add("kept@dead.example", 0.0, "operator said so", "operator", [])
    with log.open("a") as handle:
        handle.write(line("2026-11-20T10:00:00", "B6", "gone@dead.example", "sent", "2.0.0", "250 ok"))
        handle.write(line("2026-11-20T10:00:01", "B6", "kept@dead.example", "sent", "2.0.0", "250 ok"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mailgate"):
        read(log, store)
    assert store.blacklisted(["gone@dead.example", "kept@dead.example"]) == {"kept@dead.example"}
    assert store.countable_bounces("gone@dead.example", 0.0) == []
    assert "B6: role=blacklist rcpt=<gone@dead.example> action=remove" in caplog.text
    assert "kept@dead.example> action=remove" not in caplog.text


def test_tokenised_and_unknown_messages_bounces_are_not_counted(tmp_path, store):
    log = tmp_path / "mail.log"
    outbound(store, "T1", tokenised=True)
    log.write_text(line("2026-11-01T10:00:00", "T1", "a@dead.example", "bounced", "5.1.1")
                   + line("2026-11-01T10:00:01", "U1", "b@dead.example", "bounced", "5.1.1"))
    read(log, store)
    deliveries = rows(store, "deliveries")
    assert [(d["queue_id"], d["status"], d["server"]) for d in deliveries] == \
        [("T1", "bounced", "transactional"), ("U1", "bounced", None)]
    assert deliveries[0]["message"] is not None and deliveries[1]["message"] is None
    assert rows(store, "bounces") == []


def test_a_message_fails_once_per_recipient_whichever_reader_learns_it_first(tmp_path, store, caplog):
    """docs/rules.md B1: the log's bounces are Postfix's own and count, but a message fails once
    per recipient: a report already recorded on the message (tied by its Message-ID), or the same
    failure logged again, is not a second bounce."""
    log = tmp_path / "mail.log"
    reported, logged = outbound(store, "D1"), outbound(store, "D2")
    store.record_bounce(BounceRecord(at("2026-11-01T09:00:00"), "gone@dead.example", "5.1.1", "failed", True,
                                     None, None, None, reported, "transactional", "dsn"))
    log.write_text(line("2026-11-01T10:00:00", "D1", "gone@dead.example", "bounced", "5.1.1")
                   + line("2026-11-01T10:00:00", "D2", "gone@dead.example", "bounced", "5.1.1")
                   + line("2026-11-01T10:00:01", "D2", "Gone@dead.example", "bounced", "5.1.1")
                   + line("2026-11-01T10:00:02", "D2", "other@dead.example", "bounced", "5.1.1"))
    with caplog.at_level(logging.INFO, logger="mailgate"):
        read(log, store)
    assert [(b["message"], b["recipient"], b["source"]) for b in rows(store, "bounces")] == [
        (reported, "gone@dead.example", "dsn"), (logged, "gone@dead.example", "postfix-log"),
        (logged, "other@dead.example", "postfix-log")]
    assert len(rows(store, "deliveries")) == 4, "every attempt is still a delivery row"
    assert caplog.text.count("role=bounce rcpt=<gone@dead.example> status=5.1.1 message=") == 2
    assert caplog.text.count("action=ignored reason=\"recorded already\"") == 2


def test_expiry_returns_the_deferred_recipients_as_soft_bounces(tmp_path, store):
    log = tmp_path / "mail.log"
    outbound(store, "E1")
    log.write_text(line("2026-11-01T10:00:00", "E1", "slow@x.example", "deferred", "4.2.0", "450 4.2.0 later")
                   + line("2026-11-01T10:00:00", "E1", "ok@x.example", "sent", "2.0.0")
                   + "2026-11-06T10:00:00+00:00 gw postfix/qmgr[3]: E1: from=<a@mycompany.com>, "
                     "status=expired, returned to sender\n")
    read(log, store)
    assert [(d["recipient"], d["status"], d["dsn"]) for d in rows(store, "deliveries")] == \
        [("slow@x.example", "deferred", "4.2.0"), ("ok@x.example", "sent", "2.0.0"),
         ("slow@x.example", "expired", "4.2.0")]
    assert [(b["recipient"], b["permanent"], b["reason"], b["diagnostic"]) for b in rows(store, "bounces")] == \
        [("slow@x.example", 0, "expired", "450 4.2.0 later")]


# -- following: positions, partial lines, rotation, restarts --------------------------------------

def numbered(first: int, last: int) -> str:
    return "".join(line("2026-11-01T10:00:00", f"Q{n}", f"r{n}@x.example", "sent", "2.0.0") for n in range(first, last))


def counted(store) -> list[str]:
    return sorted(d["queue_id"] for d in rows(store, "deliveries"))


def expected(first: int, last: int) -> list[str]:
    return sorted(f"Q{n}" for n in range(first, last))


def test_a_partial_last_line_waits_for_its_end(tmp_path, store):
    log = tmp_path / "mail.log"
    whole = numbered(0, 2)
    log.write_text(whole[:-20])
    read(log, store)
    assert counted(store) == ["Q0"]
    with log.open("a") as handle:
        handle.write(whole[-20:])
    read(log, store)
    read(log, store)
    assert counted(store) == expected(0, 2)
    assert store.log_position(watchlog.position_key(str(log))) == (log.stat().st_ino, len(whole))


@pytest.mark.parametrize("rotated_name", ["mail.log.1", "maillog.20261125-221300"])
def test_rotation_across_restarts_counts_every_line_once(tmp_path, store, rotated_name):
    log = tmp_path / ("maillog" if rotated_name.startswith("maillog") else "mail.log")
    log.write_text(numbered(0, 10))
    read(log, store)                                   # a first follower, then it stops
    with log.open("a") as handle:
        handle.write(numbered(10, 15))                 # written while nobody follows
    log.rename(tmp_path / rotated_name)
    with (tmp_path / rotated_name).open("a") as handle:
        handle.write(numbered(15, 17))                 # the writer still on the old file
    log.write_text("")                                 # new file created, still empty
    read(log, store)
    assert counted(store) == expected(0, 17)
    with (tmp_path / rotated_name).open("a") as handle:
        handle.write(numbered(17, 18)[:-1])            # its last line, never terminated
    with log.open("a") as handle:
        handle.write(numbered(18, 25))                 # the writer moved on
    read(log, store)
    restarted = store.reopen()                         # a restart, with a fresh connection
    read(log, restarted)
    restarted.close()
    assert counted(store) == expected(0, 25)


def test_a_threaded_follower_stopped_and_restarted_between_batches(tmp_path, store):
    log = tmp_path / "mail.log"
    log.write_text("")

    def run(stop):
        follower = store.reopen()
        follow(str(log), follower, CONFIG, poll=0.02, stop=stop, clock=lambda: NOW)
        follower.close()

    for batch in range(4):
        stop = threading.Event()
        worker = threading.Thread(target=run, args=(stop,))
        worker.start()
        with log.open("a") as handle:
            handle.write(numbered(batch * 10, batch * 10 + 10))
        if batch == 2:
            log.rename(tmp_path / "mail.log.1")
            log.write_text(numbered(100, 105))
        deadline = time.monotonic() + 5
        while len(counted(store)) < batch * 10 + 10 + (5 if batch >= 2 else 0) and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        worker.join(5)
    assert counted(store) == sorted(expected(0, 40) + expected(100, 105))


def test_a_crash_inside_a_batch_leaves_neither_rows_nor_position(tmp_path, store, monkeypatch):
    log = tmp_path / "mail.log"
    log.write_text(numbered(0, 5))
    real = watchlog.record_event
    calls = []

    def failing(store_, config, event):
        calls.append(event)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return real(store_, config, event)
    monkeypatch.setattr("mailgate.commands.watchlog.recording.record_event", failing)
    with pytest.raises(RuntimeError):
        read(log, store)
    assert counted(store) == [] and store.log_position(watchlog.position_key(str(log))) is None
    monkeypatch.setattr("mailgate.commands.watchlog.recording.record_event", real)
    read(log, store)
    assert counted(store) == expected(0, 5)


def test_truncation_in_place_reads_the_new_content(tmp_path, store):
    log = tmp_path / "mail.log"
    log.write_text(numbered(0, 5))
    read(log, store)
    with log.open("r+") as handle:                     # logrotate's copytruncate
        handle.truncate(0)
    with log.open("a") as handle:
        handle.write(numbered(5, 7))
    read(log, store)
    assert counted(store) == expected(0, 7)


def test_two_followers_on_one_file_count_each_line_once(tmp_path, store):
    log = tmp_path / "mail.log"
    log.write_text(numbered(0, 300))
    followers = [store.reopen() for _ in range(3)]
    workers = [threading.Thread(target=read, args=(log, follower)) for follower in followers]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    for follower in followers:
        follower.close()
    assert counted(store) == expected(0, 300)


# -- the real thing: a lab Postfix's maillog ------------------------------------------------------

def send(port: int, recipients: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.mail("alice@mycompany.com")
        for rcpt in recipients:
            client.rcpt(rcpt)
        code, reply = client.data(b"Subject: watch-log\r\n\r\nbody\r\n")
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


@pytest.mark.e2e
@pytest.mark.skipif(not shutil.which("postfix") and not os.path.exists("/usr/sbin/postfix"), reason="no Postfix")
def test_a_lab_postfix_maillog_end_to_end(sqlite_store):
    store = sqlite_store
    from mailgate.lab.postfix import PrivatePostfix
    from mailgate.lab.sinks import Sink
    sink = Sink(reject={"gone@x.example": "550 5.1.1 no such user"})
    sink.start()
    base = make_basedir()
    postfix = PrivatePostfix(base, listeners={"smtp": {}}, main_cf={"relayhost": f"[127.0.0.1]:{sink.port}"})
    try:
        postfix.start()
        relay = f"127.0.0.1[127.0.0.1]:{sink.port}"
        plain = send(postfix.port("smtp"), ["ok@x.example", "gone@x.example"])
        outbound(store, plain)
        tokenised = send(postfix.port("smtp"), ["gone@x.example"])
        outbound(store, tokenised, tokenised=True)
        for qid in (plain, tokenised):
            postfix.wait_for_log(rf"{qid}: to=<gone@x\.example>.*status=bounced", 20)
        postfix.wait_for_log(rf"{plain}: to=<ok@x\.example>.*status=sent", 20)
        assert postfix.wait_queue_empty(20)
        follow(str(postfix.maillog), store, CONFIG, once=True)
    finally:
        postfix.stop()
        sink.stop()
        shutil.rmtree(base, ignore_errors=True)
    mine = {(d["queue_id"], d["recipient"]): d for d in rows(store, "deliveries")}
    assert (mine[plain, "ok@x.example"]["status"], mine[plain, "ok@x.example"]["dsn"]) == ("sent", "2.0.0")
    assert (mine[plain, "gone@x.example"]["status"], mine[plain, "gone@x.example"]["dsn"]) == ("bounced", "5.1.1")
    assert mine[plain, "ok@x.example"]["relay"] == relay and mine[plain, "ok@x.example"]["server"] == "transactional"
    assert mine[tokenised, "gone@x.example"]["status"] == "bounced"
    assert any(d["recipient"] == "alice@mycompany.com" and d["message"] is None for d in mine.values())  # the NDRs
    bounces = rows(store, "bounces")
    assert [(b["recipient"], b["permanent"], b["source"]) for b in bounces] == [("gone@x.example", 1, "postfix-log")]
    assert "550 5.1.1 no such user" in bounces[0]["diagnostic"] and bounces[0]["reason"] == "userunknown"


# -- the journal and the command -----------------------------------------------------------------

FAKE_JOURNALCTL = """
import json, sys
for usec, message in json.loads(sys.argv[1]):
    print(json.dumps({"__REALTIME_TIMESTAMP": str(usec), "_HOSTNAME": "gw", "SYSLOG_IDENTIFIER": "postfix/smtp",
                      "MESSAGE": message}))
print(json.dumps({"__REALTIME_TIMESTAMP": "1", "MESSAGE": [104, 105]}))
"""


@pytest.mark.e2e
def test_journal_entries_are_recorded_once_across_runs(store):
    entries = [(1_790_000_000_000_000 + n, f"J{n}: to=<j{n}@x.example>, relay=none, delay=1, delays=0/0/0/1, "
                                          f"dsn=4.4.1, status=deferred (connect refused)") for n in range(5)]
    command = [sys.executable, "-c", FAKE_JOURNALCTL]
    follow_journal(store, CONFIG, once=True, command=command + [json.dumps(entries[:3])])
    follow_journal(store, CONFIG, once=True, command=command + [json.dumps(entries)])
    assert [(d["queue_id"], d["at"]) for d in rows(store, "deliveries")] == \
        [(f"J{n}", 1_790_000_000 + n / 1e6) for n in range(5)]
    assert store.log_position(watchlog.position_key(watchlog.JOURNAL)) == (0, entries[-1][0])


@pytest.mark.e2e
def test_a_failing_journalctl_is_an_error(store):
    with pytest.raises(watchlog.JournalError):
        follow_journal(store, CONFIG, once=True, command=[sys.executable, "-c", "import sys; sys.exit(3)"])


def test_journal_command_resumes_after_the_saved_time():
    assert watchlog.journal_command(1_790_000_000_123_456, follow=True) == [
        "journalctl", "--output=json", "--no-pager", "--unit=postfix*", "--follow", "--no-tail",
        "--since=@1790000000"]


@pytest.mark.skipif(not shutil.which("journalctl") or not os.path.exists("/run/systemd/journal"),
                    reason="no systemd journal on this machine")
def test_the_real_journal_can_be_read(store):
    follow_journal(store, CONFIG, once=True)
    assert store.log_position(watchlog.position_key(watchlog.JOURNAL)) is not None or rows(store, "deliveries") == []


def test_main_watch_log(tmp_path, capsys):
    from dataclasses import replace
    config = replace(CONFIG, database=str(tmp_path / "db.sqlite3"))
    log = tmp_path / "mail.log"
    log.write_text(numbered(0, 3))
    assert main_watch_log(config, str(log), journal=False, once=True) == 0
    assert main_watch_log(config, str(log), journal=True, once=True) == 2
    assert main_watch_log(config, str(tmp_path / "missing.log"), journal=False, once=True) == 1
    assert "no such file" in capsys.readouterr().err
    reopened = SQLiteStore(config.database)
    assert counted(reopened) == expected(0, 3)
    reopened.close()
