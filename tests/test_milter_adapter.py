"""The milter adapter without an MTA: a recorded context stands in for libmilter's."""

from __future__ import annotations

import email
import logging

import Milter

from mailgate.configfile import parse_config
from mailgate.milter.app import GatewayMilter
from mailgate.replies import SMTP
from mailgate.runtime import Runtime
from mailgate.store import SQLiteStore
from mailgate.tokens import TokenSigner

MESSAGE = b"""From: "Admin" <admin@example.com>
To: c@customer.example
Subject: hi
Message-ID: <adapter-1@app.example>
X-Mailgate-Stream: transactional

body
"""


class BrokenStore(SQLiteStore):
    def record_outbound(self, record):
        raise OSError("disk I/O error")


class FakeContext:
    """The few calls of libmilter's context that the adapter makes, recorded."""

    def __init__(self, macros: dict[str, str]):
        self.macros = macros
        self.priv = None
        self.changes: list[tuple] = []
        self.reply: tuple | None = None

    def getsymval(self, name):
        return self.macros.get(name)

    def setpriv(self, priv):
        self.priv = priv

    def chgheader(self, name, index, value):
        self.changes.append(("chgheader", name, index, value))

    def chgfrom(self, sender, params=None):
        self.changes.append(("chgfrom", sender))

    def setreply(self, code, status, *text):
        self.reply = (code, status, *text)


def run(store, listener="ORIGINATING", dry_run=False) -> tuple[FakeContext, int]:
    """Drive the callbacks in libmilter's order for MESSAGE."""
    text = "dry_run: true\n" if dry_run else ""
    config = parse_config(text + "alias_domain: mycompany.com\nservers: [{name: trans, host: t.example.net, "
                          "from_filter: mycompany.com}]", check_files=False).config
    GatewayMilter.runtime = Runtime(config, store, TokenSigner(b"s" * 32), clock=lambda: 1.8e9)
    ctx = FakeContext({"{daemon_name}": listener, "i": "4Xk2p1Lz"})
    milter = GatewayMilter()
    milter._setctx(ctx)
    milter.connect("client.example", 4, ("127.0.0.1", 2525))
    milter.envfrom("<admin@example.com>")
    milter.envrcpt("<c@customer.example>")
    parsed = email.message_from_bytes(MESSAGE)
    for name, value in parsed.items():
        milter.header(name, value)
    return ctx, milter.eom()


def test_outbound_rewrites_from_and_envelope(caplog):
    caplog.set_level(logging.INFO, logger="mailgate")
    ctx, result = run(SQLiteStore(":memory:"))
    assert result == Milter.CONTINUE
    (_, name, index, value), drop, (_, sender) = ctx.changes
    assert (name, index, value) == ("From", 1, '"Admin" <notifications@mycompany.com>')
    assert drop == ("chgheader", "X-Mailgate-Stream", 1, "")
    assert sender.startswith("<bounce+") and sender.endswith("@mycompany.com>")
    assert any(r.getMessage().startswith("4Xk2p1Lz: role=outbound from=<admin@example.com> "
                                         "header_from=<notifications@mycompany.com> rewritten=yes")
               for r in caplog.records)


def test_exception_answers_tempfail_and_logs_queue_id(caplog):
    caplog.set_level(logging.INFO, logger="mailgate")
    ctx, result = run(BrokenStore(":memory:"))
    assert result == Milter.TEMPFAIL
    reply = SMTP["internal_error"]
    assert ctx.reply == (reply.code, reply.status, reply.text)
    assert any("4Xk2p1Lz: role=error error=OSError" in r.getMessage() for r in caplog.records)
    assert ctx.changes == []


def test_inbound_listener_is_left_alone():
    ctx, result = run(SQLiteStore(":memory:"), listener="INBOUND")
    assert result == Milter.CONTINUE and ctx.changes == []


def test_dry_run_changes_nothing(caplog):
    caplog.set_level(logging.INFO, logger="mailgate")
    ctx, result = run(SQLiteStore(":memory:"), dry_run=True)
    assert result == Milter.CONTINUE and ctx.changes == []
    assert any("rewritten=yes" in r.getMessage() and "dry_run=yes" in r.getMessage() for r in caplog.records)


def test_only_needed_callbacks_are_negotiated():
    """Skipped callbacks and no-reply flags are what keep the milter off Postfix's hot path.

    pymilter's protocol mask lists the protocol bits we do *not* ask for.
    """
    not_asked = GatewayMilter.protocol_mask()
    for flag in ("P_NOBODY", "P_NOEOH", "P_NOUNKNOWN", "P_NODATA", "P_NOHELO",
                 "P_NR_HDR", "P_NR_CONN", "P_NR_MAIL", "P_NR_RCPT"):
        assert not not_asked & getattr(Milter, flag), flag
    assert not_asked & Milter.P_NOHDRS and not_asked & Milter.P_NOCONNECT
