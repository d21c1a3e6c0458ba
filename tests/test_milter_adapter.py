"""The milter adapter without an MTA: a recorded context stands in for libmilter's."""

from __future__ import annotations

import email
import logging

import Milter

from mailgate.configfile import parse_config
from mailgate.infra.runtime import Runtime
from mailgate.milter.app import GatewayMilter
from mailgate.rules.replies import SMTP
from mailgate.rules.tokens import TokenSigner
from mailgate.store.sqlite import SQLiteStore

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

    def addheader(self, name, value, index=-1):
        self.changes.append(("addheader", name, value))

    def quarantine(self, reason):
        self.changes.append(("quarantine", reason))

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


def test_inbound_listener_gets_the_inbound_role():
    """To: c@customer.example is no alias of ours: the inbound role refuses it (no route)."""
    ctx, result = run(SQLiteStore(":memory:"), listener="INBOUND")
    reply = SMTP["no_route"]
    assert result == Milter.REJECT and ctx.reply == (reply.code, reply.status, reply.text)
    assert ("chgheader", "From", 1, '"Admin" <notifications@mycompany.com>') not in ctx.changes


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
    for flag in ("P_NOEOH", "P_NOUNKNOWN", "P_NODATA", "P_NOHELO",
                 "P_NR_HDR", "P_NR_CONN", "P_NR_MAIL", "P_NR_RCPT", "P_NR_BODY"):
        assert not not_asked & getattr(Milter, flag), flag
    # headers and body are wanted (the body only kept for inbound reports), never waited for
    assert not_asked & Milter.P_NOHDRS and not_asked & Milter.P_NOBODY and not_asked & Milter.P_NOCONNECT


def inbound_run(store, loop_action: str, previous: int):
    """An inbound message from a sender who already sent `previous` messages to sales."""
    config = parse_config(f"alias_domain: mycompany.com\naliases: {{sales: {{target: 'odoo:crm.lead'}}}}\n"
                          f"loop: {{action: {loop_action}, threshold: 2}}\n", check_files=False).config
    GatewayMilter.runtime = Runtime(config, store, TokenSigner(b"s" * 32), clock=lambda: 1.8e9)
    results = []
    for number in range(previous + 1):
        ctx = FakeContext({"{daemon_name}": "INBOUND", "i": f"Q{number}"})
        milter = GatewayMilter()
        milter._setctx(ctx)
        milter.connect("client.example", 4, ("192.0.2.1", 2525))
        milter.envfrom("<robot@spam.example>")
        milter.envrcpt("<sales@mycompany.com>")
        for name, value in [("From", "robot@spam.example"), ("To", "sales@mycompany.com"),
                            ("Message-ID", f"<{loop_action}-{number}@spam.example>"),
                            ("X-Mailgate-Route", "alias:forged")]:
            milter.header(name, value)
        results.append((ctx, milter.eom()))
    return results


def test_inbound_actions_reach_postfix_as_milter_verdicts():
    (first, accepted), _, (ctx, refused) = inbound_run(SQLiteStore(":memory:"), "reject", 2)
    assert accepted == Milter.CONTINUE
    assert first.changes == [("chgheader", "X-Mailgate-Route", 1, ""), ("addheader", "X-Mailgate-Route", "alias:sales")]
    assert refused == Milter.REJECT and ctx.reply[:2] == ("550", "5.7.1")
    *_, (ctx, deferred) = inbound_run(SQLiteStore(":memory:"), "defer", 2)
    assert deferred == Milter.TEMPFAIL and ctx.reply[:2] == ("450", "4.7.1")
    *_, (ctx, held) = inbound_run(SQLiteStore(":memory:"), "hold", 2)
    assert held == Milter.CONTINUE and ("quarantine", "mailgate: mail loop suspected") in ctx.changes


def run_headers(store, headers: list[tuple[str, str]], extra_config: str = "") -> tuple[FakeContext, int]:
    """Drive the callbacks for an outbound message with the given header fields."""
    config = parse_config(extra_config + "alias_domain: mycompany.com\nservers: [{name: trans, host: t.example.net, "
                          "from_filter: mycompany.com}]", check_files=False).config
    GatewayMilter.runtime = Runtime(config, store, TokenSigner(b"s" * 32), clock=lambda: 1.8e9)
    ctx = FakeContext({"{daemon_name}": "ORIGINATING", "i": "5Yk2p1Lz"})
    milter = GatewayMilter()
    milter._setctx(ctx)
    milter.connect("client.example", 4, ("127.0.0.1", 2525))
    milter.envfrom("<admin@example.com>")
    milter.envrcpt("<c@customer.example>")
    for name, value in headers:
        milter.header(name, value)
    return ctx, milter.eom()


def from_changes(ctx: FakeContext) -> list[tuple]:
    return [change for change in ctx.changes if change[1] == "From"]


def test_several_from_headers_are_deleted_and_the_first_rewritten():
    """docs/rules.md O5: the later From headers go first (by index, from the last), then the first."""
    ctx, result = run_headers(SQLiteStore(":memory:"), [("From", '"Admin" <admin@example.com>'),
                                                       ("From", "evil@attacker.example"),
                                                       ("From", "jane@mycompany.com")])
    assert result == Milter.CONTINUE
    assert from_changes(ctx) == [("chgheader", "From", 3, ""), ("chgheader", "From", 2, ""),
                                 ("chgheader", "From", 1, '"Admin" <notifications@mycompany.com>')]


def test_a_message_without_from_gets_the_notification_address_added():
    ctx, result = run_headers(SQLiteStore(":memory:"), [("To", "c@customer.example")])
    assert result == Milter.CONTINUE
    assert from_changes(ctx) == [("addheader", "From", "notifications@mycompany.com")]


def test_the_rewritten_from_is_handed_to_postfix_folded():
    """docs/rules.md O5: LF + space folds (what cleanup takes inside a header value), no line over 78."""
    name = "Ünïcödé Ñame " * 20
    ctx, _ = run_headers(SQLiteStore(":memory:"), [("From", f'"{name}" <u@other.example>')])
    [(_, _, _, value)] = from_changes(ctx)
    lines = f"From: {value}".split("\n")
    assert len(lines) > 3 and all(len(line) <= 78 for line in lines) and "\r" not in value
    assert all(line.startswith(" ") for line in lines[1:])


def test_malformed_from_reject_refuses_without_recording(caplog):
    caplog.set_level(logging.INFO, logger="mailgate")
    store = SQLiteStore(":memory:")
    ctx, result = run_headers(store, [("From", "Doe, John <john@example.com>"), ("Message-ID", "<r-1@app.example>")],
                              "malformed_from: reject\n")
    reply = SMTP["malformed_from"]
    assert result == Milter.REJECT and ctx.reply == (reply.code, reply.status, reply.text)
    assert ctx.changes == [] and store.outbound_by_queue_id("5Yk2p1Lz") is None
    assert any("5Yk2p1Lz: role=outbound" in r.getMessage() and "action=reject reply=\"554 5.6.0\"" in r.getMessage()
               for r in caplog.records)
