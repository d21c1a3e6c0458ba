#!/opt/mailgate/bin/python
"""Per-call cost of mailgate's hot paths, in process (no sockets, no Postfix): where the CPU of a
lookup, a policy request and an outbound message goes. Complements the py-spy profiles of the
serving process with exact per-call times and a cProfile breakdown.

    bench/micro.py [--quick] [--profile]

Measured: LookupService (socketmap `transport`, tokenised and plain senders), GatewayPolicy (RCPT
from the submission listener: quota transaction, alone and in the policy server's batches),
process_outbound (the milter's end-of-message
work without libmilter, its store calls timed as in `serve`; alone, and ten at once in threads of
their own with and without the group-commit writer), and the pieces they spend on
(parse_mailboxes, TokenSigner.verify, the metrics of one message, ...).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import threading
import time

from _common import bench_config, machine

from mailgate.configfile import load_config
from mailgate.infra.logfmt import setup_logging
from mailgate.infra.metrics import DECISIONS, END_OF_MESSAGE_SECONDS, bound
from mailgate.infra.runtime import Runtime
from mailgate.lab.postfix import make_basedir
from mailgate.milter.app import GatewayMilter
from mailgate.milter.facts import MessageFacts
from mailgate.milter.outbound import process_outbound
from mailgate.policy.attributes import PolicyRequest, parse_request
from mailgate.policy.lookup import LookupService
from mailgate.policy.recipients import GatewayPolicy
from mailgate.rules.addresses import parse_mailboxes
from mailgate.rules.outbound import OutboundRequest, decide_outbound
from mailgate.rules.routing import route_for_sender
from mailgate.store import OutboundRecord
from mailgate.store.groupcommit import OutboundWriter
from mailgate.store.sqlite import SQLiteStore


class StubContext:
    """What a GatewayMilter asks of libmilter's context for an outbound message: the listener's
    and the queue id's macros; its changes go nowhere."""

    def __init__(self, number: int) -> None:
        self.macros = {"{daemon_name}": "ORIGINATING", "i": f"Q{number:010X}"}

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def chgfrom(self, *args) -> None: ...
    def chgheader(self, *args) -> None: ...
    def addheader(self, *args) -> None: ...
    def setreply(self, *args) -> None: ...
    def delrcpt(self, *args) -> None: ...
    def setpriv(self, *args) -> None: ...


class RowsNotWritten:
    """A group-commit writer that writes nothing: the milter's own Python alone."""

    def __init__(self) -> None:
        self.rows = 0

    def record(self, record, recipients) -> tuple[int, set[str]]:
        self.rows += 1
        return self.rows, set()


def one_message_callbacks(number: int) -> None:
    """Every callback libmilter makes for one outbound message like smtp-source's, in order."""
    milter = GatewayMilter()
    milter._setctx(StubContext(number))
    milter.connect("localhost", 1, ("127.0.0.1", 1234))
    milter.envfrom_bytes(b"<odoo@mycompany.com>")
    milter.envrcpt_bytes(f"<r{number}@customer.example>".encode())
    for name, value in ((b"From", b"<odoo@mycompany.com>"), (b"To", f"<r{number}@customer.example>".encode()),
                        (b"Date", b"Sun, 6 Dec 2026 00:00:00 +0000"),
                        (b"Message-Id", f"<{number:06x}.0001@lab>".encode()), (b"X-Mailer", b"smtp-source")):
        milter.header_bytes(name, value)
    milter.eoh()
    milter.body(b"La la la la la la la la la la la la la la la la.\r\n" * 40)
    milter.eom()
    milter.abort()
    milter.close()


def per_call(fn, n: int) -> float:
    """Microseconds per call, best of three runs of n calls."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a cProfile breakdown of each path")
    args = parser.parse_args()
    n = 300 if args.quick else 3000
    info = machine()
    print(f"# micro: {n} calls x best of 3; python={info['python']} cpu={info['cpu']!r}")
    base = make_basedir("mgu")
    try:
        config = load_config(bench_config(base, "micro", 2525)).config
        runtime = Runtime.from_config(config)
        lookup = LookupService(runtime)
        policy = GatewayPolicy(runtime)
        now = time.time()
        tokens = [f"bounce+{runtime.signer.make(i, 'transactional', now)}@mycompany.com" for i in range(1000)]
        plain = [f"user{i}@mycompany.com" for i in range(1000)]
        from services import policy_in_requests, policy_out_requests  # the same requests as bench/services.py
        outs = [PolicyRequest(parse_request(r[:-2], 128)) for r in policy_out_requests()]
        ins = [PolicyRequest(parse_request(r[:-2], 128)) for r in policy_in_requests()]
        raw_out = policy_out_requests()

        def facts(i: int) -> MessageFacts:
            return MessageFacts(listener="ORIGINATING", envelope_sender="odoo@mycompany.com",
                                recipients=[f"r{i}@customer.example"],
                                headers=[("From", "<odoo@mycompany.com>"), ("To", f"<r{i}@customer.example>"),
                                         ("Message-Id", f"<{i:04x}.0001.0001@mailgate-lab>")])

        record = OutboundRecord(queue_id="Q", message_id="<m@x>", envelope_from_original="odoo@mycompany.com",
                                envelope_from="bounce@mycompany.com", header_from_before="<odoo@mycompany.com>",
                                header_from_after="<odoo@mycompany.com>", server="transactional", mass=False,
                                listener="ORIGINATING", sasl_user=None, created_at=now)

        decided = bound(DECISIONS, "outbound", "kept", "from-domain", "transactional", "no", "no")
        end_of_message = bound(END_OF_MESSAGE_SECONDS, "outbound")

        def count_message() -> None:
            """What the milter adds per message for its metrics (bound children, one histogram)."""
            start = time.perf_counter()
            decided.inc()
            end_of_message.observe(time.perf_counter() - start)

        def rows_in_batches(i: int, size: int) -> None:
            """Every size-th call, `size` rows in one transaction with their blacklist reads (what a
            group-commit leader writes); per message."""
            if i % size == 0:
                with runtime.store.transaction():
                    for _ in range(size):
                        runtime.store.record_outbound(record)
                        runtime.store.blacklisted([f"r{i}@customer.example"])

        def in_thread(work) -> None:
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()

        writer = OutboundWriter(runtime.store)
        GatewayMilter.runtime = runtime
        discarded = open(os.devnull, "w")  # the milter's log line is formatted and written, as in serve
        setup_logging().handlers[0].setStream(discarded)  # type: ignore[attr-defined]
        GatewayMilter.writer = RowsNotWritten()  # type: ignore[assignment]
        # serve's store checkpoints in the background (Runtime.from_config); SQLite's default
        # checkpoints inside the commit that takes the WAL past 1,000 pages
        checkpointing = SQLiteStore(base / "checkpointing.sqlite3")

        def ten_sessions(i: int, use_writer: bool) -> None:
            """Every tenth call: ten messages at once, each in a thread of its own, as libmilter's
            threads (one per SMTP connection) end their messages under load; per message."""
            if i % 10 == 0:
                threads = [threading.Thread(target=process_outbound, args=(
                    runtime, facts(i + k), f"Q{i + k:010X}", writer if use_writer else None)) for k in range(10)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()

        cases = [
            ("lookup transport <token>", lambda i: lookup("transport", tokens[i % 1000])),
            ("lookup transport <plain>", lambda i: lookup("transport", plain[i % 1000])),
            ("  route_for_sender <token>", lambda i: route_for_sender(config, runtime.signer, tokens[i % 1000])),
            ("  TokenSigner.verify", lambda i: runtime.signer.verify(tokens[i % 1000][7:39])),
            ("  config.alias_domains", lambda i: config.alias_domains),
            ("  config.active_servers", lambda i: config.active_servers),
            ("lookup delivery <outside>", lambda i: lookup("delivery", f"r{i}@customer.example")),
            ("lookup delivery <alias>", lambda i: lookup("delivery", "sales@mycompany.com")),
            ("policy parse_request", lambda i: parse_request(raw_out[i % 1000][:-2], 128)),
            ("policy RCPT outbound (quota txn)", lambda i: policy(outs[i % 1000])),
            ("policy RCPT outbound, batches of 8 (per request)",
             lambda i: policy.answer_all(outs[i % 125 * 8:i % 125 * 8 + 8]) if i % 8 == 0 else None),
            ("policy RCPT inbound alias", lambda i: policy(ins[i % 1000])),
            ("milter process_outbound", lambda i: process_outbound(runtime, facts(i), f"Q{i:010X}")),
            ("milter callbacks of one message, no row written", lambda i: one_message_callbacks(i)),
            ("rows in batches of 1 (per message)", lambda i: rows_in_batches(i, 1)),
            ("rows in batches of 5 (per message)", lambda i: rows_in_batches(i, 5)),
            ("rows in batches of 10 (per message)", lambda i: rows_in_batches(i, 10)),
            ("milter 10 sessions, a transaction each (per message)", lambda i: ten_sessions(i, False)),
            ("milter 10 sessions, group commit (per message)", lambda i: ten_sessions(i, True)),
            ("  metrics of one message (decision, end of message)", lambda i: count_message()),
            ("  decide_outbound", lambda i: decide_outbound(config, OutboundRequest("<odoo@mycompany.com>",
                                                                                    "odoo@mycompany.com", False))),
            ("  parse_mailboxes", lambda i: parse_mailboxes("<odoo@mycompany.com>")),
            ("  parse_mailboxes (display name)", lambda i: parse_mailboxes('"Admin" <admin@example.com>')),
            ("store.record_outbound (kept connection)", lambda i: runtime.store.record_outbound(record)),
            ("store.record_outbound, checkpoints in commits", lambda i: checkpointing.record_outbound(record)),
            ("thread start+join (libmilter: one per connection)", lambda i: in_thread(lambda: None)),
            ("record_outbound in a new thread (new connection)", lambda i: in_thread(
                lambda: runtime.store.record_outbound(record))),
        ]
        results = []
        for name, fn in cases:
            if fn is None:
                continue
            us = per_call(fn, n)
            results.append((name, us))
            print(f"{name:<40} {us:9.1f} us/call", flush=True)
            if args.profile and not name.startswith("  "):
                prof = cProfile.Profile()
                prof.enable()
                for i in range(n):
                    fn(i)
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
                print("\n".join(out.getvalue().splitlines()[:30]))
        writer.stop()
        discarded.close()
        checkpointing.close()
        runtime.store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    for name, us in results:
        print(f"RESULT micro {name.strip():<38} {us:9.1f} us/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
