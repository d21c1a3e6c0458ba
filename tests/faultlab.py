"""Helpers for the fault, hostile-input and concurrency tests (tests/test_faults.py,
tests/test_hostile.py, tests/test_concurrency.py).

- `gateway()`: a whole lab gateway (see `mailgate.lab.gateway`) with optional Postfix overrides
  and, where the machine allows it, the state directory on its own small tmpfs (disk full,
  read-only file system);
- `send()`: one SMTP transaction that never raises, classified the way a client sees it
  (accepted / temporary / permanent / unknown), and `Ledger`, which remembers every message a
  test sent and every answer it got;
- `settle()` and `assert_nothing_lost()`: the rule of the project, "every message sent is either
  delivered exactly once or still in Postfix's queue (or refused to a client who still has it)",
  checked by Message-ID on the sinks and on the Odoo stand-in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from mailgate.lab.gateway import LabGateway
from mailgate.lab.postfix import make_basedir

MOUNT = "/bin/mount"
UMOUNT = "/bin/umount"

# --------------------------------------------------------------------------------------------
# What this machine allows


_mount_probe: tuple[bool, str] | None = None


def tmpfs_mount_support() -> tuple[bool, str]:
    """(True, "") when this process may mount a tmpfs and remount it read-only; else (False, why).

    Checked once, by doing it: a container without CAP_SYS_ADMIN (or with a seccomp profile that
    blocks mount(2)) fails here, and the tests that need it skip with this reason.
    """
    global _mount_probe
    if _mount_probe is not None:
        return _mount_probe
    if os.geteuid() != 0:
        _mount_probe = (False, f"mount(2) needs root (CAP_SYS_ADMIN); the tests run as uid {os.geteuid()}")
        return _mount_probe
    probe = Path(tempfile.mkdtemp(prefix="mgmnt", dir="/tmp"))
    try:
        done = subprocess.run([MOUNT, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                              capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            _mount_probe = (False, f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
            return _mount_probe
        try:
            ro = subprocess.run([MOUNT, "-o", "remount,ro", str(probe)], capture_output=True, text=True,
                                timeout=20)
            if ro.returncode != 0:
                _mount_probe = (False, f"mount -o remount,ro is not permitted here: {ro.stderr.strip()}")
            else:
                _mount_probe = (True, "")
        finally:
            subprocess.run([UMOUNT, str(probe)], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        _mount_probe = (False, f"cannot run mount: {exc}")
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return _mount_probe


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run([MOUNT, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True, timeout=20)


def remount(path: Path, options: str) -> None:
    subprocess.run([MOUNT, "-o", f"remount,{options}", str(path)], check=True, capture_output=True,
                   timeout=20)


def unmount(path: Path) -> None:
    for _ in range(50):
        done = subprocess.run([UMOUNT, str(path)], capture_output=True, timeout=20)
        if done.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)
    subprocess.run([UMOUNT, "-l", str(path)], capture_output=True, timeout=20)


# --------------------------------------------------------------------------------------------
# The gateway


@contextlib.contextmanager
def gateway(extra_config: str = "", *, main_cf_extra: dict[str, str] | None = None,
            state_tmpfs: str | None = None) -> Iterator[LabGateway]:
    """A started LabGateway; with `state_tmpfs` (e.g. "64m") its state directory (the SQLite
    store) is a tmpfs of that size, mounted before mailgate starts and removed afterwards."""
    base = make_basedir()
    state = base / "state"
    mounted = False
    gw = LabGateway(base, extra_config, main_cf_extra=main_cf_extra)
    try:
        if state_tmpfs:
            mount_tmpfs(state, state_tmpfs)
            mounted = True
        gw.start()
        yield gw
    finally:
        try:
            gw.stop()
        finally:
            if mounted:
                unmount(state)
            shutil.rmtree(base, ignore_errors=True)


def store_path(gw: LabGateway) -> Path:
    return gw.base / "state" / "mailgate.sqlite3"


def db_rows(gw: LabGateway, sql: str, *params: object) -> list[dict]:
    """Rows read with a separate, read-only connection (never holds a write lock)."""
    conn = sqlite3.connect(f"file:{store_path(gw)}?mode=ro", uri=True, timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def mailgate_alive(gw: LabGateway) -> bool:
    return gw.process is not None and gw.process.poll() is None


def kick_pickup(gw: LabGateway) -> None:
    """Wake pickup so that mail waiting in maildrop is retried now."""
    subprocess.run(["postkick", "-c", str(gw.pf.config_dir), "public", "pickup", "W"],
                   capture_output=True, timeout=10)


# --------------------------------------------------------------------------------------------
# Messages and SMTP


def uid() -> str:
    return uuid.uuid4().hex[:12]


def delivery_report(token: str, failed: str, domain: str = "mycompany.com") -> tuple[bytes, str]:
    """A plain RFC 3464 report about `failed`, addressed to the tokenised bounce address."""
    msgid = f"<{uuid.uuid4().hex}@remote.example>"
    text = "\r\n".join([
        "From: MAILER-DAEMON@remote.example",
        f"To: bounce+{token}@{domain}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Message-ID: {msgid}",
        "MIME-Version: 1.0",
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"',
        "",
        "--B",
        "Content-Type: text/plain",
        "",
        "It bounced.",
        "--B",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; remote.example",
        "",
        f"Final-Recipient: rfc822; {failed}",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown",
        "",
        "--B--",
        ""])
    return text.encode(), msgid


def make_message(header_from: str, to: list[str] | str, msgid: str | None = None, subject: str = "fault lab",
                 **headers: str) -> tuple[bytes, str]:
    msg = EmailMessage()
    msg["From"] = header_from
    msg["To"] = to if isinstance(to, str) else ", ".join(to)
    msg["Subject"] = subject
    msg["Message-ID"] = msgid = msgid or f"<{uuid.uuid4().hex}@lab.example>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello from the fault lab.\n")
    return msg.as_bytes(), msgid


ACCEPTED, TEMPORARY, PERMANENT, UNKNOWN = "accepted", "temporary", "permanent", "unknown"


@dataclass
class Reply:
    """What one SMTP transaction came to, as the client saw it."""

    outcome: str                      # accepted | temporary | permanent | unknown
    stage: str                        # connect | mail | rcpt | data | done
    code: int | None = None
    text: str = ""
    queue_id: str | None = None
    rcpt_codes: dict[str, tuple[int, str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accepted_rcpts(self) -> list[str]:
        return [r for r, (code, _) in self.rcpt_codes.items() if code in (250, 251)]

    def __str__(self) -> str:
        return f"{self.outcome}@{self.stage} {self.code} {self.text[:120]}"


def _classify(code: int) -> str:
    if 200 <= code < 300:
        return ACCEPTED
    return TEMPORARY if 400 <= code < 500 else PERMANENT


def send(port: int, sender: str, recipients: list[str], data: bytes, *, timeout: float = 60,
         helo: str = "lab.client", raw: bool = False) -> Reply:
    """One SMTP transaction that never raises. Recipients refused at RCPT are left out of the
    message, as a client does; the transaction is `accepted` when DATA got 250 (check
    `rcpt_codes` for the recipients that were refused), else it is classified by the first
    reply that ended it. `unknown`: the connection broke after the message was sent, before
    its reply (a client cannot know whether the message was queued). With `raw` the message
    bytes go out as they are (bare CR or LF kept), else line ends become CRLF."""
    started = time.monotonic()
    stage = "connect"
    client = smtplib.SMTP(timeout=timeout)
    reply = Reply(UNKNOWN, stage)
    data_sent = False
    try:
        code, text = client.connect("127.0.0.1", port)
        if code != 220:
            reply = Reply(_classify(code), stage, code, text.decode(errors="replace"))
            return reply
        stage = "mail"
        client.ehlo(helo)
        code, text = client.mail(sender)
        if code != 250:
            reply = Reply(_classify(code), stage, code, text.decode(errors="replace"))
            return reply
        stage = "rcpt"
        codes: dict[str, tuple[int, str]] = {}
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            codes[rcpt] = (code, text.decode(errors="replace"))
        accepted = [r for r, (c, _) in codes.items() if c in (250, 251)]
        if not accepted:
            worst = sorted(codes.values(), key=lambda ct: (ct[0] < 500, ct[0]))[0] if codes else (554, "no rcpt")
            first = next(iter(codes.values())) if codes else worst
            # the transaction is permanent only when every recipient was refused for good
            outcome = PERMANENT if all(c >= 500 for c, _ in codes.values()) else TEMPORARY
            reply = Reply(outcome, stage, first[0] if outcome == TEMPORARY and first[0] < 500 else worst[0],
                          (first if first[0] < 500 else worst)[1], rcpt_codes=codes)
            with contextlib.suppress(Exception):
                client.rset()
            return reply
        stage = "data"
        code, text = client.docmd("DATA")
        if code != 354:
            reply = Reply(_classify(code), stage, code, text.decode(errors="replace"), rcpt_codes=codes)
            return reply
        data_sent = True
        payload = data if raw else re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", data)
        payload = re.sub(rb"(?m)^\.", b"..", payload)
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        client.send(payload + b".\r\n")
        code, text = client.getreply()
        text_s = text.decode(errors="replace")
        found = re.search(r"queued as (\w+)", text_s)
        reply = Reply(_classify(code), "done" if code == 250 else "data", code, text_s,
                      found.group(1) if found else None, rcpt_codes=codes)
        return reply
    except (smtplib.SMTPException, OSError) as exc:
        outcome = UNKNOWN if data_sent else TEMPORARY
        reply = Reply(outcome, stage, None, f"{type(exc).__name__}: {exc}")
        return reply
    finally:
        reply.seconds = time.monotonic() - started
        with contextlib.suppress(Exception):
            client.quit()
        with contextlib.suppress(Exception):
            client.close()


# --------------------------------------------------------------------------------------------
# Ledger: what was sent, what the clients heard, what was delivered


@dataclass
class Sent:
    msgid: str
    sender: str
    recipients: list[str]
    data: bytes
    listener: str
    replies: list[Reply] = field(default_factory=list)
    via_sendmail: bool = False

    @property
    def accepted(self) -> bool:
        return self.via_sendmail or any(r.outcome == ACCEPTED for r in self.replies)

    @property
    def accepted_times(self) -> int:
        return sum(r.outcome == ACCEPTED for r in self.replies) + int(self.via_sendmail)

    @property
    def last(self) -> Reply | None:
        return self.replies[-1] if self.replies else None


class Ledger:
    """Thread-safe record of every message a test sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: dict[str, Sent] = {}

    def add(self, sent: Sent) -> Sent:
        with self._lock:
            self.items[sent.msgid] = sent
        return sent

    def record(self, sent: Sent, reply: Reply) -> None:
        with self._lock:
            sent.replies.append(reply)

    def all(self) -> list[Sent]:
        with self._lock:
            return list(self.items.values())

    def replies(self) -> list[Reply]:
        with self._lock:
            return [r for s in self.items.values() for r in s.replies]


def submit_until_accepted(gw: LabGateway, ledger: Ledger, sent: Sent, *, deadline: float,
                          pause: float = 0.25) -> Reply:
    """Send like a client does: retry on a temporary failure (or an unknown outcome that the
    maillog shows was not queued) until accepted, refused for good, or the deadline."""
    port = gw.pf.port(sent.listener)
    while True:
        reply = send(port, sent.sender, sent.recipients, sent.data)
        ledger.record(sent, reply)
        if reply.outcome == ACCEPTED or reply.outcome == PERMANENT:
            return reply
        if reply.outcome == UNKNOWN and queued_in_log(gw, sent.msgid):
            return reply
        if time.monotonic() > deadline:
            return reply
        time.sleep(pause)


def queued_in_log(gw: LabGateway, msgid: str) -> bool:
    """True when the maillog shows a queue id for this Message-ID that was not refused by the
    milter (cleanup logs `message-id=`, then `milter-reject` when the milter refuses it)."""
    log = gw.pf.log_text()
    qids = re.findall(rf"(\w+): message-id={re.escape(msgid)}", log)
    return any(not re.search(rf"{qid}: milter-(reject|discard)", log) for qid in qids)


def delivered_copies(gw: LabGateway, msgid: str) -> int:
    """How many times a message (by Message-ID) reached an upstream sink or Odoo."""
    count = 0
    for sink in gw.sinks.values():
        for m in sink.messages:
            if m.parsed.get("Message-ID", "").strip() == msgid:
                count += len(m.rcpt_tos)
    needle = f"Message-ID: {msgid}".encode().lower()
    for call in gw.odoo.calls:
        if needle in call.message.lower():
            count += 1
    return count


def delivery_counts(gw: LabGateway) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sink in gw.sinks.values():
        for m in sink.messages:
            key = m.parsed.get("Message-ID", "").strip()
            counts[key] = counts.get(key, 0) + len(m.rcpt_tos)
    for call in gw.odoo.calls:
        found = re.search(rb"(?im)^Message-ID:\s*(<[^>]+>)", call.message)
        if found:
            key = found.group(1).decode(errors="replace")
            counts[key] = counts.get(key, 0) + 1
    return counts


def _history(gw: LabGateway, problems: list[str]) -> str:
    """Every maillog and mailgate log line about the queue ids the problems name: where an
    accepted message went is the first thing to know when one is missing."""
    ids = set(re.findall(r"queued as ([0-9A-F]{6,})", "\n".join(problems)))
    if not ids:
        return ""
    logs = gw.pf.log_text().splitlines() + gw.mailgate_log().splitlines()
    return "--- history of " + " ".join(sorted(ids)) + " ---\n" + "\n".join(
        line for line in logs if any(queue_id in line for queue_id in ids))


def expected_copies(sent: Sent) -> int:
    """Recipients a message was accepted for (its last accepted transaction)."""
    if sent.via_sendmail:
        return len(sent.recipients)
    for reply in reversed(sent.replies):
        if reply.outcome == ACCEPTED:
            return len(reply.accepted_rcpts)
    return 0


def settle(gw: LabGateway, ledger: Ledger, timeout: float = 90) -> None:
    """Recovery: flush the queue (and wake pickup) until every accepted message was delivered
    and the queue is empty, or `timeout`. A `postfix reload` halfway clears the resolver's
    cached failures (see postfix-testing.md)."""
    deadline = time.monotonic() + timeout
    reloaded = False
    started = time.monotonic()
    while time.monotonic() < deadline:
        counts = delivery_counts(gw)
        missing = [s for s in ledger.all() if s.accepted and counts.get(s.msgid, 0) < expected_copies(s)]
        if not missing and not gw.pf.queue_files():
            return
        gw.pf.flush()
        kick_pickup(gw)
        if not reloaded and time.monotonic() - started > 20:
            gw.pf.reload()
            reloaded = True
        time.sleep(1)


def assert_nothing_lost(gw: LabGateway, ledger: Ledger, *, allow_queued: bool = False) -> dict[str, int]:
    """The project's rule, for every message of the ledger:
    - accepted once (250) -> delivered exactly once per accepted recipient, or (with
      `allow_queued`) still in the queue;
    - never accepted -> delivered nowhere (the client still has it);
    - no message accepted twice by the gateway (a client retried only after a 4xx).
    Returns a summary {accepted, refused_then_retried, ...} for the caller's own checks."""
    queued = gw.pf.queue_files()   # first: a message delivered in between is then counted
    counts = delivery_counts(gw)
    problems = []
    summary = {"messages": 0, "accepted": 0, "never_accepted": 0, "temporary_replies": 0, "unknown_replies": 0}
    for sent in ledger.all():
        summary["messages"] += 1
        summary["temporary_replies"] += sum(r.outcome == TEMPORARY for r in sent.replies)
        summary["unknown_replies"] += sum(r.outcome == UNKNOWN for r in sent.replies)
        copies = counts.get(sent.msgid, 0)
        if sent.accepted:
            summary["accepted"] += 1
            if sent.accepted_times > 1:
                problems.append(f"{sent.msgid}: accepted {sent.accepted_times} times")
            want = expected_copies(sent)
            if copies == want:
                continue
            if copies < want and allow_queued and queued:
                continue
            problems.append(f"{sent.msgid}: accepted for {want} recipient(s), delivered {copies} time(s); "
                            f"replies: {[str(r) for r in sent.replies]}; queue: {queued}")
        else:
            summary["never_accepted"] += 1
            if copies and not any(r.outcome == UNKNOWN for r in sent.replies):
                problems.append(f"{sent.msgid}: never accepted but delivered {copies} time(s); "
                                f"replies: {[str(r) for r in sent.replies]}")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)\n" + _history(gw, problems[:5])
    return summary


def dump_logs(gw: LabGateway, lines: int = 80) -> str:
    return "--- mailgate log ---\n" + gw.mailgate_log()[-6000:] + "\n" + (gw.pf.log_tail(lines) if gw.pf else "")


def socket_mode(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_mode & 0o7777, info.st_gid


def unix_connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock
