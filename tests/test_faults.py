"""Faults under load, through the real Postfix: the gateway may fail, it may never accept mail and
then lose it.

Postfix runs with `milter_default_action = tempfail`. The rule checked at the end of every test:
each message sent is either delivered exactly once (counted by its unique Message-ID on the
upstream sinks and the Odoo stand-in) or still in Postfix's queue, or it was refused with a
4xx/5xx to the client, who still has it; and after recovery everything is delivered, exactly once.

The store's directory is a tmpfs of its own when this machine lets the tests mount one (root with
CAP_SYS_ADMIN), so a full disk and a read-only file system can be made for real; without it those
tests skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest

from faultlab import (
    ACCEPTED,
    PERMANENT,
    TEMPORARY,
    Ledger,
    Sent,
    assert_nothing_lost,
    db_rows,
    delivered_copies,
    delivery_report,
    gateway,
    mailgate_alive,
    make_message,
    remount,
    send,
    settle,
    socket_mode,
    store_path,
    submit_until_accepted,
    tmpfs_mount_support,
    uid,
    wait_until,
)
from mailgate.infra.sockets import socket_is_listening
from mailgate.infra.socketspec import parse_socket_spec
from mailgate.lab import sinks as sinks_module
from mailgate.lab.gateway import LabGateway
from mailgate.rules.tokens import split_tokenised

MOUNT_OK, MOUNT_WHY = tmpfs_mount_support()
needs_mount = pytest.mark.skipif(not MOUNT_OK, reason=f"needs a tmpfs for the store directory: {MOUNT_WHY}")

# The daily quota stays out of the way of the submission listener (its mail touches the store only
# in the milter), while mail on the mass listener still takes from the (large) mass quota in the
# policy service: a fault then hits both writers, the milter and the policy service.
GATEWAY_EXTRA_CONFIG = "quota: {daily: null, mass_daily: 100000}\n"
BUSY_TIMEOUT = 5.0  # mailgate.store.sqlite.BUSY_TIMEOUT_MS

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]


@pytest.fixture(scope="module")
def gw():
    with gateway(GATEWAY_EXTRA_CONFIG, state_tmpfs="32m" if MOUNT_OK else None) as lab:
        lab.good_config = lab.config_path.read_text()
        yield lab


@pytest.fixture(autouse=True)
def healthy_gateway(gw: LabGateway):
    """Each test starts and ends with a serving mailgate on the good configuration and every sink
    up, whatever the previous test broke."""
    _restore(gw)
    yield
    _restore(gw)


def _restore(gw: LabGateway) -> None:
    if gw.config_path.read_text() != gw.good_config:
        gw.config_path.write_text(gw.good_config)
    if mailgate_alive(gw) and not all(socket_is_listening(parse_socket_spec(f"unix:{gw.base}/{name}.sock"))
                                      for name in ("milter", "lookup", "policy")):
        gw.stop_mailgate()          # alive but not serving (e.g. stuck on its way out)
    if not mailgate_alive(gw):
        gw.process = None
        gw.start_mailgate()
    for sink in gw.sinks.values():
        if sink._controller is None:
            sink.start()


# --------------------------------------------------------------------------------------------
# Traffic


KINDS = (
    # listener, how the recipient looks; inbound mail goes through the pipe to the Odoo stand-in
    ("submission", lambda: f"r{uid()}@customer.example"),
    ("mass", lambda: f"m{uid()}@customer.example"),
    ("inbound", lambda: "sales@mycompany.com"),
)


def plan(count: int, kinds=KINDS) -> list[Sent]:
    """`count` messages, each from its own sender (the loop guard never counts two of them) and
    with its own Message-ID."""
    messages = []
    for number in range(count):
        listener, rcpt = kinds[number % len(kinds)]
        sender = f"s{uid()}@example.org"
        to = rcpt()
        data, msgid = make_message(f'"Sender {number}" <{sender}>', to)
        messages.append(Sent(msgid, sender, [to], data, listener))
    return messages


class Traffic:
    """Worker threads submitting planned messages like SMTP clients do (a 4xx is retried after a
    pause until accepted or `seconds` have passed); `retry=False` sends each message once."""

    def __init__(self, gw: LabGateway, ledger: Ledger, messages: list[Sent], *, workers: int = 3,
                 seconds: float = 90, retry: bool = True, pause: float = 0.25):
        self.gw, self.ledger = gw, ledger
        self.todo: queue.Queue[Sent] = queue.Queue()
        for sent in messages:
            ledger.add(sent)
            self.todo.put(sent)
        self.deadline = time.monotonic() + seconds
        self.retry, self.pause = retry, pause
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]

    def _work(self) -> None:
        while True:
            try:
                sent = self.todo.get_nowait()
            except queue.Empty:
                return
            if self.retry:
                submit_until_accepted(self.gw, self.ledger, sent, deadline=self.deadline, pause=self.pause)
            else:
                self.ledger.record(sent, send(self.gw.pf.port(sent.listener), sent.sender, sent.recipients,
                                              sent.data))

    def start(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float = 120) -> None:
        for thread in self.threads:
            thread.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "sender threads did not finish"


def accepted_count(ledger: Ledger) -> int:
    return sum(s.accepted for s in ledger.all())


def retry_all(gw: LabGateway, ledger: Ledger, seconds: float = 30) -> None:
    """What the clients do after a fault: send again every message that was not accepted."""
    deadline = time.monotonic() + seconds
    for sent in ledger.all():
        if not sent.accepted:
            submit_until_accepted(gw, ledger, sent, deadline=deadline)


def integrity(gw: LabGateway) -> str:
    conn = sqlite3.connect(f"file:{store_path(gw)}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("pragma integrity_check").fetchone()[0]
    finally:
        conn.close()


def finish(gw: LabGateway, ledger: Ledger, *, all_accepted: bool = True) -> dict[str, int]:
    """Recovery and the rule: everything accepted is delivered exactly once, the queue is empty;
    with `all_accepted`, the clients' retries got every message accepted in the end."""
    settle(gw, ledger)
    summary = assert_nothing_lost(gw, ledger)
    if all_accepted:
        refused = [f"{s.listener}: {[str(r) for r in s.replies][-2:]}" for s in ledger.all() if not s.accepted]
        assert not refused, f"{len(refused)} messages never accepted after recovery: {refused[:3]}"
    assert gw.pf.queue_files() == [], f"left in the queue: {gw.pf.queue_files()}"
    return summary


# --------------------------------------------------------------------------------------------
# SIGKILL while mail flows


def test_sigkill_while_mail_flows_loses_nothing_and_duplicates_nothing(gw):
    ledger = Ledger()
    traffic = Traffic(gw, ledger, plan(45), workers=3, seconds=120).start()
    wait_until(lambda: accepted_count(ledger) >= 12, 60, what="a third of the messages accepted")
    assert gw.stop_mailgate(signal.SIGKILL) == -signal.SIGKILL
    # While it is down: SMTP clients get 4xx (and retry); local mail waits in the maildrop.
    local = plan(2, kinds=(("submission", lambda: f"l{uid()}@customer.example"),))
    for sent in local:
        sent.via_sendmail = True
        ledger.add(sent)
        gw.pf.sendmail(sent.sender, sent.recipients, sent.data)
    time.sleep(2.0)
    gw.start_mailgate()
    traffic.join()
    summary = finish(gw, ledger)

    assert summary["messages"] == 47 and summary["accepted"] == 47
    refused = [r for r in ledger.replies() if r.outcome != ACCEPTED]
    assert refused, "the kill came too late: no client saw mailgate down"
    assert all(r.outcome == TEMPORARY for r in refused), [str(r) for r in refused if r.outcome != TEMPORARY]
    assert integrity(gw) == "ok"
    # The restarted gateway re-created its sockets with the same protections.
    for name in ("milter.sock", "lookup.sock", "policy.sock"):
        mode, gid = socket_mode(gw.base / name)
        assert mode == 0o660, (name, oct(mode))
    # Every accepted outbound message has its row (the bounce token names it).
    outbound = [s for s in ledger.all() if s.listener != "inbound"]
    ids = {r["message_id"] for r in db_rows(gw, "select message_id from messages where direction = 'outbound'")}
    assert {s.msgid for s in outbound} <= ids


# --------------------------------------------------------------------------------------------
# The store locked by another writer


class HeldLock:
    """Another process's writer: `BEGIN EXCLUSIVE` on the store for `seconds`."""

    def __init__(self, gw: LabGateway):
        self.conn = sqlite3.connect(store_path(gw), timeout=30, isolation_level=None)

    def __enter__(self) -> HeldLock:
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def test_lock_shorter_than_busy_timeout_is_waited_for(gw):
    ledger = Ledger()
    messages = plan(3)
    with HeldLock(gw):
        traffic = Traffic(gw, ledger, messages, workers=3, retry=False).start()
        time.sleep(2.0)
    traffic.join()
    replies = ledger.replies()
    assert [r.outcome for r in replies] == [ACCEPTED] * 3, [str(r) for r in replies]
    assert all(r.seconds >= 1.5 for r in replies), "mailgate answered without waiting for the lock"
    finish(gw, ledger)


def test_lock_longer_than_busy_timeout_tempfails_then_everything_goes_through(gw):
    ledger = Ledger()
    with HeldLock(gw):
        started = time.monotonic()
        traffic = Traffic(gw, ledger, plan(3), workers=3, retry=False).start()
        traffic.join(timeout=60)
        held = time.monotonic() - started
        replies = ledger.replies()
        # Everyone waited for the lock (the busy timeout), then got a temporary refusal: the
        # submission and inbound mail at end of data (milter), the mass mail at RCPT (policy
        # service, which takes from the quota).
        assert [r.outcome for r in replies] == [TEMPORARY] * 3, [str(r) for r in replies]
        assert all(r.seconds >= BUSY_TIMEOUT - 0.5 for r in replies), [r.seconds for r in replies]
        stages = sorted((s.listener, s.last.stage, s.last.code) for s in ledger.all())
        assert stages == [("inbound", "data", 451), ("mass", "rcpt", 450), ("submission", "data", 451)], stages
        assert all("4.3.0" in s.last.text for s in ledger.all()), [s.last.text for s in ledger.all()]
        # Each request waits for the lock once. The inbound message may wait twice in a row: its
        # RCPT can share the policy service's batch with the mass mail's quota claim, then its end
        # of data waits in the milter; never once more per request of a batch.
        assert held < BUSY_TIMEOUT * 2 + 2, "requests waited on each other longer than their own busy timeouts"
        # nothing of theirs was queued
        time.sleep(0.5)
        assert gw.pf.queue_files() == []
    retry_all(gw, ledger)
    summary = finish(gw, ledger)
    assert summary["accepted"] == 3
    assert re.search(r"role=error error=OperationalError detail=\"database is locked\"", gw.mailgate_log())


# --------------------------------------------------------------------------------------------
# Killed between its commit and its answer


def test_a_row_a_killed_milter_left_unconfirmed_does_not_make_the_retry_a_duplicate(gw):
    """The milter writes an inbound message's row before it answers Postfix. Killed in between,
    it leaves the row and no queued message, and the client retries the same Message-ID: that
    retry must be delivered, not dropped as a duplicate (the loss the SIGKILL test once found)."""
    who = f"k{uid()}@customer.example"
    data, msgid = make_message(who, "sales@mycompany.com")
    conn = sqlite3.connect(store_path(gw), timeout=30)
    with conn:
        conn.execute("insert into inbound_messages (queue_id, message_id, sender, routes, action, created_at, "
                     "confirmed) values ('DEADBEEF1', ?, ?, 'alias:sales', 'deliver', ?, 0)", [msgid, who, time.time()])
    conn.close()
    reply = send(gw.pf.port("inbound"), who, ["sales@mycompany.com"], data)
    assert reply.outcome == ACCEPTED, str(reply)
    wait_until(lambda: any(msgid.encode() in call.message for call in gw.odoo.calls), 30, what="delivery to Odoo")
    rows = wait_until(lambda: (r := db_rows(gw, "select queue_id, confirmed from inbound_messages where message_id = ? "
                                                "order by id", msgid)) and r[-1]["confirmed"] == 1 and r, 10,
                      what="the new row confirmed")
    assert [r["confirmed"] for r in rows] == [0, 1]
    # now it was queued, the same message again is a duplicate
    again = send(gw.pf.port("inbound"), who, ["sales@mycompany.com"], data)
    assert again.outcome == ACCEPTED, str(again)
    wait_until(lambda: re.search(rf"role=inbound .*action=drop .*duplicate of {re.escape(msgid)}", gw.mailgate_log()),
               20, what="the duplicate dropped")
    time.sleep(1)
    assert sum(msgid.encode() in call.message for call in gw.odoo.calls) == 1


# --------------------------------------------------------------------------------------------
# The store's file deleted while running


@pytest.mark.parametrize("what", ["main-file", "with-wal-and-shm"])
def test_store_deleted_while_running_never_accepts_and_loses(gw, what):
    """What happens: connections already open keep writing to the unlinked file; every new SMTP
    session opens a new, empty file and fails ("no such table"), so mail is refused with 451 until
    mailgate is restarted, which creates and migrates a new store. Nothing is accepted and lost."""
    ledger = Ledger()
    before = plan(3)
    Traffic(gw, ledger, before, retry=False).start().join()
    assert all(s.accepted for s in before)
    state = store_path(gw).parent
    names = ["mailgate.sqlite3"] + (["mailgate.sqlite3-wal", "mailgate.sqlite3-shm"] if what != "main-file" else [])
    for name in names:
        (state / name).unlink()
    during = plan(6)
    Traffic(gw, ledger, during, retry=False).start().join()
    outcomes = [s.last.outcome for s in during]
    assert set(outcomes) <= {ACCEPTED, TEMPORARY}, [str(s.last) for s in during]
    time.sleep(1)
    # accepted ones (if any) are delivered or queued; refused ones are nowhere
    for sent in during:
        if sent.last.outcome != ACCEPTED:
            assert delivered_copies(gw, sent.msgid) == 0
    assert mailgate_alive(gw), "mailgate died when its store was deleted"
    # recovery: a restart makes a new store; the clients retry
    assert gw.stop_mailgate() == 0
    gw.start_mailgate()
    retry_all(gw, ledger)
    finish(gw, ledger)
    assert integrity(gw) == "ok"


def _fresh_store(gw: LabGateway) -> None:
    """Stop mailgate, remove its store (as a lost disk or an operator's `rm` would), start again."""
    assert gw.stop_mailgate() == 0
    for name in ("mailgate.sqlite3", "mailgate.sqlite3-wal", "mailgate.sqlite3-shm"):
        with contextlib.suppress(FileNotFoundError):
            (store_path(gw).parent / name).unlink()
    gw.start_mailgate()


def _send_with_odoo_bounce(gw: LabGateway, odoo_bounce: str) -> tuple[str, int]:
    """One outbound message with Odoo's own bounce address; (its token on the wire, its row id)."""
    to = f"r{uid()}@customer.example"
    data, msgid = make_message('"Sales" <sales@mycompany.com>', to)
    reply = send(gw.pf.port("submission"), odoo_bounce, [to], data)
    assert reply.outcome == ACCEPTED, str(reply)
    got = wait_until(lambda: [m for m in gw.sinks["transactional"].messages if m.parsed["Message-ID"] == msgid],
                     30, what="delivery")[0]
    token = split_tokenised(got.mail_from, "bounce")[0]
    parsed = gw.token_signer().verify(token)
    assert parsed is not None
    return token, parsed.row_id


def test_token_of_a_lost_store_never_matches_a_new_message(gw):
    _fresh_store(gw)
    token_a, row_a = _send_with_odoo_bounce(gw, f"bounce+{uid()}-mail.mail-1@mycompany.com")
    _fresh_store(gw)                       # the store is lost; mail goes on
    odoo_b = f"bounce+{uid()}-mail.mail-2@mycompany.com"
    token_b, row_b = _send_with_odoo_bounce(gw, odoo_b)
    assert row_a == row_b == 1   # same row id, server and day: only the store's identity tells them apart
    assert token_a != token_b
    failed = f"gone{uid()}@customer.example"
    report, report_id = delivery_report(token_a, failed)   # a late report on the first message
    reply = send(gw.pf.port("inbound"), "", [f"bounce+{token_a}@mycompany.com"], report)
    assert reply.outcome in (ACCEPTED, PERMANENT), str(reply)
    if reply.outcome == ACCEPTED:
        [row] = wait_until(lambda: db_rows(gw, "select message, matched from bounces where recipient = ?", failed),
                           30, what="the bounce row")
        time.sleep(1)
        handed = [c for c in gw.odoo.calls if report_id.encode() in c.message]
        assert row["message"] != row_b, "the report on the old message was recorded against the new one"
        assert not any(f"Delivered-To: {odoo_b}".encode() in c.message for c in handed), \
            "the report on the old message was handed to the new message's Odoo bounce address"


# --------------------------------------------------------------------------------------------
# Read-only store


class ReadOnlyStore:
    """A read-only bind mount over the store's directory (root ignores file modes, so chmod 0444
    proves nothing here); `umount -l` ends it even while files opened through it are open."""

    def __init__(self, gw: LabGateway):
        self.state = store_path(gw).parent

    def __enter__(self) -> ReadOnlyStore:
        subprocess.run(["mount", "--bind", str(self.state), str(self.state)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(self.state)], check=True, capture_output=True)
        with pytest.raises(OSError):
            (self.state / "probe").write_text("x")
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.state)], capture_output=True)


@needs_mount
def test_read_only_store_while_running_tempfails_and_recovers(gw):
    """Connections opened before the fault keep writing (the store reuses them across sessions);
    a session that needs a new one cannot write and its mail is refused with 4xx, never accepted
    and forgotten; once the file system is writable again mail flows, without a restart."""
    ledger = Ledger()
    warm = plan(3)                  # every path has its connection open before the fault
    Traffic(gw, ledger, warm, retry=False).start().join()
    assert all(s.accepted for s in warm)
    with ReadOnlyStore(gw):
        during = plan(6)
        Traffic(gw, ledger, during, retry=False).start().join()
        assert {s.last.outcome for s in during} <= {ACCEPTED, TEMPORARY}, [str(s.last) for s in during]
        assert mailgate_alive(gw)
    retry_all(gw, ledger, seconds=20)
    finish(gw, ledger)


@needs_mount
def test_policy_service_recovers_from_a_read_only_store(gw):
    """The policy service answers every request from one thread: a connection it first opened while
    the store was read-only must not stay read-only (found here: quota'd mail was deferred for ever
    until a restart; fixed in f1219f0, connections opened mode=rwc and dropped after failures)."""
    ledger = Ledger()
    assert gw.stop_mailgate() == 0          # a fresh process: the policy service has no connection yet
    gw.start_mailgate()
    with ReadOnlyStore(gw):
        during = plan(1, kinds=KINDS[1:2])  # the mass listener: the quota, in the policy service
        Traffic(gw, ledger, during, retry=False).start().join()
        assert during[0].last.outcome == TEMPORARY and during[0].last.stage == "rcpt", str(during[0].last)
    after = plan(2, kinds=KINDS[1:2])
    Traffic(gw, ledger, after, workers=2, seconds=10).start().join()   # clients retry for 10 s
    stuck = [str(s.last) for s in after if not s.accepted]
    if stuck:                                # clean up for the next tests, then report
        gw.stop_mailgate()
        gw.start_mailgate()
    retry_all(gw, ledger)
    finish(gw, ledger)
    assert not stuck, f"still refused after the store became writable: {stuck}"


@needs_mount
def test_read_only_store_at_start_keeps_mail_in_the_client_or_queue(gw):
    """mailgate started on a read-only file system: depending on what SQLite finds there (a -shm
    file left by the last run or not) it exits at start ("unable to open database file", Postfix
    then tempfails with the milter down) or runs and refuses every message with 4xx; either way
    nothing is accepted, and once the file system is writable a start works."""
    ledger = Ledger()
    state = store_path(gw).parent
    assert gw.stop_mailgate() == 0
    try:
        remount(state, "ro")
        try:
            gw.start_mailgate()
            started = True
        except RuntimeError:
            started = False    # "unable to open database file" (no -shm file could be made)
        during = plan(3)
        Traffic(gw, ledger, during, retry=False).start().join()
        # started or not, nothing can be recorded, so nothing is accepted
        assert [s.last.outcome for s in during] == [TEMPORARY] * 3, (started, [str(s.last) for s in during])
        if mailgate_alive(gw):
            gw.stop_mailgate()
        gw.process = None
    finally:
        remount(state, "rw")
    gw.start_mailgate()
    retry_all(gw, ledger)
    finish(gw, ledger)


@needs_mount
def test_read_only_store_at_start_after_a_crash_heals_once_writable(gw):
    ledger = Ledger()
    state = store_path(gw).parent
    warm = plan(3)                  # mail went through: the store's connections are open
    Traffic(gw, ledger, warm, retry=False).start().join()
    assert all(s.accepted for s in warm)
    # a crash of the whole process tree (the milter runs in a child process): -wal and -shm stay
    parent = gw.process.pid
    children = [int(pid) for task in os.listdir(f"/proc/{parent}/task")
                for pid in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
    for child in children:
        os.kill(child, signal.SIGKILL)
    assert gw.stop_mailgate(signal.SIGKILL) == -signal.SIGKILL
    gw.process = None

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    wait_until(lambda: all(gone(child) for child in children), 10, what="the milter process to die")
    assert (state / "mailgate.sqlite3-shm").exists()

    def remounted_read_only() -> bool:
        try:
            remount(state, "ro")
        except subprocess.CalledProcessError:
            return False                # the file system can stay busy for a moment after the crash
        return True
    try:
        wait_until(remounted_read_only, 10, interval=0.2, what="a read-only remount")
        try:
            gw.start_mailgate()
        except RuntimeError:
            pass                       # refusing to run on a read-only store is a fine answer too
        during = plan(3)
        Traffic(gw, ledger, during, retry=False).start().join()
        assert [s.last.outcome for s in during] == [TEMPORARY] * 3, [str(s.last) for s in during]
    finally:
        remount(state, "rw")
    if not mailgate_alive(gw):       # it did not run: what systemd does next
        gw.process = None
        gw.start_mailgate()
    after = plan(3)
    Traffic(gw, ledger, after, workers=3, seconds=10).start().join()   # clients retry for 10 s
    stuck = [f"{s.listener}: {[str(r) for r in s.replies][-2:]}" for s in after if not s.accepted]
    healed = not stuck
    if not healed:                   # clean up for the next tests, then report
        gw.stop_mailgate()
        gw.process = None
        gw.start_mailgate()
    retry_all(gw, ledger)
    finish(gw, ledger)
    assert healed, "still refusing mail after the store became writable: " + "; ".join(stuck)


# --------------------------------------------------------------------------------------------
# Disk full


@needs_mount
def test_disk_full_tempfails_and_recovers_without_restart(gw):
    """The store's tmpfs filled up by another file: once SQLite cannot grow its files, mailgate
    refuses with 4xx (milter at end of data, policy service at RCPT); nothing accepted is lost;
    after the space is freed mail flows again, without a restart."""
    ledger = Ledger()
    state = store_path(gw).parent
    filler = state / "filler"
    log_before = len(gw.mailgate_log())
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    try:
        assert shutil.disk_usage(state).free < 64 * 1024
        pid = gw.process.pid
        refused = []
        for _ in range(10):  # SQLite may have some room left in its WAL: send until it shows
            batch = plan(3)
            Traffic(gw, ledger, batch, retry=False).start().join()
            assert {s.last.outcome for s in batch} <= {ACCEPTED, TEMPORARY}, [str(s.last) for s in batch]
            refused += [s for s in batch if s.last.outcome == TEMPORARY]
            if {s.listener for s in refused} == {"submission", "mass", "inbound"}:
                break
        assert {s.listener for s in refused} == {"submission", "mass", "inbound"}, \
            "a full disk never made mailgate refuse mail"
        assert gw.process.pid == pid and mailgate_alive(gw)
        assert "database or disk is full" in gw.mailgate_log()
        # One line per refused message; the traceback once per streak (the milter's, the
        # policy service's), not one per message.
        full = gw.mailgate_log()[log_before:]
        assert full.count("role=error") >= len(refused), full[-3000:]
        assert full.count("Traceback (most recent call last)") <= 2, full[-6000:]
    finally:
        filler.unlink()
    retry_all(gw, ledger)
    finish(gw, ledger)
    assert integrity(gw) == "ok"


# --------------------------------------------------------------------------------------------
# Broken configuration reloaded under load


BROKEN_CONFIGS = {
    "bad yaml": lambda good: good + "\nthis is: [not valid\n",
    "unknown key": lambda good: good.replace("default_from: notifications", "default_from: changed\nfrobnicate: 1"),
    "missing password file": lambda good: good.replace("secrets/transactional", "secrets/nope")
                                                  .replace("default_from: notifications", "default_from: changed"),
    "not utf-8": lambda good: good.replace("default_from: notifications", "default_from: changed") + "# \xff\n",
}


def test_broken_config_reloaded_under_load_refuses_nothing_and_keeps_the_old_one(gw):
    ledger = Ledger()
    pid = gw.process.pid
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set():
            [sent] = plan(1, kinds=KINDS[:1])
            ledger.add(sent)
            ledger.record(sent, send(gw.pf.port(sent.listener), sent.sender, sent.recipients, sent.data))

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        refused_before = gw.mailgate_log().count("event=reload result=refused")
        for name, breaker in BROKEN_CONFIGS.items():
            text = breaker(gw.good_config)
            if name == "not utf-8":
                gw.config_path.write_bytes(text.encode("latin-1"))
            else:
                gw.config_path.write_text(text)
            os.kill(pid, signal.SIGHUP)
            wait_until(lambda before=refused_before: gw.mailgate_log().count("event=reload result=refused") > before,
                       20, what=f"the reload of the {name!r} file to be refused")
            refused_before = gw.mailgate_log().count("event=reload result=refused")
            time.sleep(0.5)
        # the file gone altogether
        gw.config_path.rename(gw.config_path.with_suffix(".moved"))
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: gw.mailgate_log().count("event=reload result=refused") > refused_before, 20,
                   what="the reload of a missing file to be refused")
        gw.config_path.with_suffix(".moved").rename(gw.config_path)
        gw.config_path.write_text(gw.good_config)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert gw.process.pid == pid and mailgate_alive(gw), "mailgate did not survive the reloads"
    replies = ledger.replies()
    assert len(replies) >= 10
    bad = [str(r) for r in replies if r.outcome != ACCEPTED]
    assert not bad, f"mail refused during the reloads: {bad[:5]}"
    finish(gw, ledger)
    # the old configuration stayed: every From was rewritten to the old notification address
    for sent in ledger.all():
        got = [m for s in gw.sinks.values() for m in s.messages if m.parsed["Message-ID"] == sent.msgid]
        assert len(got) == 1 and got[0].parsed["From"].addresses[0].addr_spec == "notifications@mycompany.com"
    # and a good file is taken again
    ok_before = gw.mailgate_log().count("event=reload result=ok")
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: gw.mailgate_log().count("event=reload result=ok") > ok_before, 20, what="a good reload")


def test_sighup_bursts_under_load_never_stop_the_milter(gw):
    pid = gw.process.pid
    stop = threading.Event()
    ledger = Ledger()

    def sender() -> None:
        while not stop.is_set():
            [sent] = plan(1, kinds=KINDS[:1])
            ledger.add(sent)
            ledger.record(sent, send(gw.pf.port(sent.listener), sent.sender, sent.recipients, sent.data))

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and mailgate_alive(gw):
            for _ in range(10):  # e.g. a config-management run and an operator's reload together
                os.kill(pid, signal.SIGHUP)
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    alive = mailgate_alive(gw)
    if not alive:
        gw.process = None
        gw.start_mailgate()
    # whatever happened, nothing was lost: clients that saw 4xx still have their message
    retry_all(gw, ledger)
    finish(gw, ledger)
    assert alive, "mailgate serve exited during the SIGHUPs:\n" + gw.mailgate_log()[-600:]
    assert all(r.outcome == ACCEPTED for r in ledger.replies())


# --------------------------------------------------------------------------------------------
# Upstream server down


def stop_sink(gw: LabGateway, name: str) -> int:
    port = gw.sinks[name].port
    gw.sinks[name].stop()
    return port


def start_sink_on_port(gw: LabGateway, name: str, port: int) -> None:
    """`Sink.start()` always binds a fresh port (port 0), and the transport Postfix has queued the
    mail for names the old one: bring the sink back where it was, with its own start-up code."""
    original = sinks_module._PortReportingController

    class SamePort(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["port"] = port
            super().__init__(*args, **kwargs)

    with mock.patch.object(sinks_module, "_PortReportingController", SamePort):
        gw.sinks[name].start()
    assert gw.sinks[name].port == port


def defer_then_deliver(gw: LabGateway) -> tuple[Ledger, Sent, str]:
    ledger = Ledger()
    sender = f"app{uid()}@mycompany.com"  # mycompany.com: the transactional server's filter
    to = f"r{uid()}@customer.example"
    data, msgid = make_message(f'"App" <{sender}>', to)
    sent = ledger.add(Sent(msgid, sender, [to], data, "submission"))
    port = stop_sink(gw, "transactional")
    try:
        reply = send(gw.pf.port("submission"), sender, [to], data)
        ledger.record(sent, reply)
        assert reply.outcome == ACCEPTED, str(reply)
        gw.pf.wait_for_log(rf"{reply.queue_id}: to=<{re.escape(to)}>, relay=.*status=deferred", 30)
        assert reply.queue_id in gw.pf.queue_files()
        assert delivered_copies(gw, msgid) == 0
    finally:
        start_sink_on_port(gw, "transactional", port)
    gw.pf.flush()
    gw.pf.wait_for_log(rf"{reply.queue_id}: to=<{re.escape(to)}>, relay=\S+:{port},.*status=sent", 60)
    finish(gw, ledger)
    return ledger, sent, reply.queue_id


def test_upstream_down_defers_and_delivers_once_when_back(gw):
    ledger, sent, queue_id = defer_then_deliver(gw)
    [got] = [m for m in gw.sinks["transactional"].messages if m.parsed["Message-ID"] == sent.msgid]
    assert got.tls and got.mail_from.startswith("bounce+")


def _has_command(name: str) -> bool:
    helped = subprocess.run([sys.executable, "-m", "mailgate", "--help"], capture_output=True, text=True)
    return re.search(rf"^\s+{re.escape(name)}\s", helped.stdout, re.M) is not None


def test_upstream_deferral_is_recorded_by_watch_log(gw):
    if not _has_command("watch-log"):
        pytest.skip("`mailgate watch-log` does not exist yet: nothing records deferrals")
    ledger, sent, queue_id = defer_then_deliver(gw)
    done = subprocess.run([sys.executable, "-m", "mailgate", "watch-log", "--once", "--config", str(gw.config_path),
                           str(gw.pf.maillog)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = db_rows(gw, "select status, recipient, server, message from deliveries where queue_id = ? order by id",
                   queue_id)
    statuses = [r["status"] for r in rows]
    assert "deferred" in statuses and statuses[-1] == "sent", rows
    assert {r["recipient"] for r in rows} == set(sent.recipients)
    assert {r["server"] for r in rows} == {"transactional"}
    [message] = db_rows(gw, "select id from messages where queue_id = ?", queue_id)
    assert {r["message"] for r in rows} == {message["id"]}
