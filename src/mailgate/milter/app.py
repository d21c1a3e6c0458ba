"""The pymilter adapter: protocol in, role decision, milter actions out.

Only the callbacks a rule needs are negotiated, and they answer nothing (`@noreply`) until end
of message: every round trip Postfix waits for is time taken from its throughput. Any exception
answers TEMPFAIL with a logged queue id, so Postfix keeps the message and the client retries.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import Milter

from mailgate.config import Config
from mailgate.infra.logfmt import MESSAGE_FAILURES, kv_line
from mailgate.infra.metrics import DECISIONS, END_OF_MESSAGE_SECONDS, REFUSALS, bound, reply_key, yes_no
from mailgate.infra.runtime import Runtime
from mailgate.infra.sockets import remove_socket_file, remove_stale_socket, secure_socket_file, socket_file_identity
from mailgate.infra.socketspec import SocketSpec
from mailgate.milter.facts import MessageFacts
from mailgate.milter.inbound import ROUTE_HEADER, process_inbound
from mailgate.milter.outbound import OutboundEffects, process_outbound
from mailgate.rules.addresses import clean_text
from mailgate.rules.classify import takes_inbound_role
from mailgate.rules.inbound import InboundDecision
from mailgate.rules.replies import HOLD_REASONS, SMTP
from mailgate.store.groupcommit import OutboundWriter

# Headers a rule reads; the rest are never kept.
READ_HEADERS = {"from", "sender", "reply-to", "message-id", "precedence", "list-unsubscribe",
                "x-mailgate-stream", "to", "cc", "delivered-to", "resent-to", "resent-cc",
                "references", "in-reply-to", "content-type", "x-mailgate-route"}

ACTION_FLAGS = (Milter.CHGFROM | Milter.CHGHDRS | Milter.ADDHDRS | Milter.ADDRCPT | Milter.DELRCPT
                | Milter.QUARANTINE)


def _strip_brackets(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


class GatewayMilter(Milter.Base):
    """One instance per SMTP connection (libmilter threads call it one at a time)."""

    runtime: Runtime  # set on the class by `serve_milter`
    writer: OutboundWriter | None = None  # the outbound rows' group-commit writer, set by `serve_milter`

    def __init__(self) -> None:
        self.listener: str | None = None
        self.facts = MessageFacts()
        self.unconfirmed_row: int | None = None

    def _confirm_delivered(self) -> None:
        """Postfix went on past the last message (its abort after the transaction, the next
        MAIL FROM, or the end of the session): it took our answer, so the message is queued and
        its Message-ID now marks duplicates. A milter killed before this leaves the row
        unconfirmed and the client's retry is delivered, not dropped as a duplicate of mail no
        queue holds. (Postfix failing after our answer, or a later milter refusing, also goes
        on: this guards against our own failures, the ones we can see.)"""
        row, self.unconfirmed_row = self.unconfirmed_row, None
        if row is None:
            return
        try:
            self.runtime.store.confirm_inbound(row)
        except Exception as exc:  # the message is queued: failing here loses nothing
            self.runtime.logger.error(kv_line(None, role="error", event="confirm", row=row,
                                              error=type(exc).__name__, detail=str(exc)))

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        self.listener = self.getsymval("{daemon_name}")
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, sender: str, *params: str) -> int:
        self._confirm_delivered()
        self.facts = MessageFacts(config=self.runtime.config, listener=self.listener,
                                  sasl_user=self.getsymval("{auth_authen}") or None,
                                  envelope_sender=clean_text(_strip_brackets(sender)))
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, recipient: str, *params: str) -> int:
        self.facts.recipients.append(clean_text(_strip_brackets(recipient)))
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        facts = self.facts
        if facts.inbound is None:
            facts.inbound = takes_inbound_role(facts.config_for(self.runtime.config), facts.listener,
                                               facts.envelope_sender, facts.recipients)
        if facts.inbound:
            facts.all_headers.append((name, value))  # raw for the report parser (re-encoded as it came)
        if name.lower() in READ_HEADERS:
            facts.headers.append((name, clean_text(value)))
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self) -> int:
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        """Kept for inbound mail only (delivery reports are parsed); no reply is awaited either way."""
        if self.facts.inbound:
            self.facts.add_body(chunk)
        return Milter.CONTINUE

    @Milter.nocallback
    def hello(self, hostname: str) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, command: str) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def data(self) -> int:
        return Milter.CONTINUE

    def eom(self) -> int:
        start = time.perf_counter()
        runtime = self.runtime
        queue_id = self.getsymval("i") or "NOQUEUE"
        role = "outbound"
        try:
            facts = self.facts
            if facts.inbound is None:  # a message without a single header line
                facts.inbound = takes_inbound_role(facts.config_for(runtime.config), facts.listener,
                                                   facts.envelope_sender, facts.recipients)
            config = facts.config_for(runtime.config)
            role = "inbound" if facts.inbound else "outbound"
            handle = self._inbound if facts.inbound else self._outbound
            answer = handle(runtime, config, queue_id)
            MESSAGE_FAILURES.succeeded()  # a streak of failures ends with the first message handled again
            return answer
        except Exception as exc:  # any failure must keep the mail with Postfix, never lose it
            # One line per message; the traceback (which statement failed) once per streak of the
            # same failure, not once per message of a full disk.
            runtime.logger.error(kv_line(queue_id, role="error", error=type(exc).__name__, detail=str(exc)),
                                 exc_info=MESSAGE_FAILURES.first(exc))
            reply = SMTP["internal_error"]
            bound(REFUSALS, "end_of_message", "internal_error", "no").inc()
            self.setreply(reply.code, reply.status, reply.text)
            return Milter.TEMPFAIL
        finally:
            bound(END_OF_MESSAGE_SECONDS, role).observe(time.perf_counter() - start)

    def _outbound(self, runtime: Runtime, config: Config, queue_id: str) -> int:
        effects = process_outbound(runtime, self.facts, queue_id, self.writer)
        runtime.logger.info(effects.log_line)
        _count_outbound(effects, config.dry_run)
        for line in effects.blacklist_lines:
            runtime.logger.info(line)
        if effects.decision.warning:
            runtime.logger.warning(kv_line(queue_id, role="outbound", warning=effects.decision.warning))
        if config.dry_run:
            return Milter.CONTINUE
        refusal = effects.refusal
        if refusal is not None:
            self.setreply(refusal.code, refusal.status, refusal.text.replace("%", "%%"))
            return Milter.REJECT
        if effects.discard:
            return Milter.DISCARD
        for recipient in effects.removed_recipients:
            self.delrcpt(f"<{recipient}>")
        for index in range(effects.drop_more_froms + 1, 1, -1):  # docs/rules.md O5: one From leaves
            self.chgheader("From", index, "")
        if effects.add_header_from and effects.new_header_from is not None:
            self.addheader("From", effects.new_header_from)
        elif effects.new_header_from is not None:
            self.chgheader("From", 1, effects.new_header_from)
        for index in range(effects.drop_stream_headers, 0, -1):
            self.chgheader("X-Mailgate-Stream", index, "")
        if effects.new_envelope is not None:
            self.chgfrom(f"<{effects.new_envelope}>")
        return Milter.CONTINUE

    def _inbound(self, runtime: Runtime, config: Config, queue_id: str) -> int:
        effects = process_inbound(runtime, self.facts, queue_id)
        runtime.logger.info(effects.log_line)
        decision = effects.decision
        _count_inbound(decision, config.dry_run)
        bounce = effects.bounce
        for line in bounce.log_lines if bounce else ():
            runtime.logger.info(line)
        if config.dry_run:
            return Milter.CONTINUE
        for index in range(len(self.facts.header_values(ROUTE_HEADER)), 0, -1):
            self.chgheader(ROUTE_HEADER, index, "")
        if bounce and bounce.destination == "discard":
            return Milter.DISCARD
        if bounce and bounce.destination == "original":
            for recipient in bounce.bounce_recipients:
                self.delrcpt(f"<{recipient}>")
            self.addrcpt(f"<{bounce.original}>")
        if decision.action == "deliver":
            self.addheader(ROUTE_HEADER, effects.route_header)
            self.unconfirmed_row = effects.unconfirmed_row
            return Milter.CONTINUE
        if decision.action == "drop":
            return Milter.DISCARD
        if decision.action == "hold":
            self.quarantine(HOLD_REASONS["loop"])
            return Milter.CONTINUE
        reply = decision.reply or SMTP["internal_error"]
        self.setreply(reply.code, reply.status, reply.text.replace("%", "%%"))
        return Milter.REJECT if reply.permanent else Milter.TEMPFAIL

    def abort(self) -> int:
        self._confirm_delivered()  # Postfix aborts after every transaction, the accepted ones too
        self.facts = MessageFacts(listener=self.listener)
        return Milter.CONTINUE

    def close(self) -> int:
        self._confirm_delivered()
        return Milter.CONTINUE


def _count_outbound(effects: OutboundEffects, dry_run: bool) -> None:
    decision = effects.decision
    verdict = "refused" if decision.reply else ("encapsulated" if decision.rewritten else "kept")
    bound(DECISIONS, "outbound", verdict, decision.step, decision.server_name or "none", yes_no(effects.mass),
          yes_no(dry_run)).inc()
    if decision.reply:
        bound(REFUSALS, "end_of_message", reply_key(decision.reply), yes_no(dry_run)).inc()


def _count_inbound(decision: InboundDecision, dry_run: bool) -> None:
    reason = decision.routes[0].kind if decision.routes else "none"
    bound(DECISIONS, "inbound", decision.action, reason, "none", "no", yes_no(dry_run)).inc()
    if decision.reply:
        bound(REFUSALS, "end_of_message", reply_key(decision.reply), yes_no(dry_run)).inc()


class TcpGatewayMilter(GatewayMilter):
    """On `inet:` sockets DATA is answered: smtpd then reads a reply before it hands the
    connection to cleanup, and that reply carries the ACK that Nagle's algorithm would otherwise
    wait 40 ms for (bench/RESULTS.md, "the inet: stall"). On unix sockets there is no such wait,
    so GatewayMilter skips DATA altogether."""

    def data(self) -> int:
        return Milter.CONTINUE


def serve_milter(runtime: Runtime, spec: SocketSpec, *, group: str | None, timeout: int = 600,
                 on_ready: Callable[[], None] | None = None) -> None:
    """Run the milter until libmilter stops (SIGTERM/SIGINT): blocks the calling (main) thread.

    This follows pymilter's own `runmilter`; libmilter binds the socket itself, and the socket
    file is handled by the same helpers as every other listener's (`mailgate.infra.sockets`): a
    stale file is replaced but a live milter's is never stolen, the new file is made 0660 with
    the Postfix group before Postfix can connect, and only the file this process made is removed
    at the end.
    """
    tcp = spec.family != "unix"
    GatewayMilter.runtime = runtime
    Milter.factory = TcpGatewayMilter if tcp else GatewayMilter
    Milter.set_flags(ACTION_FLAGS)
    milter = Milter.milter
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.setconn(str(spec))
    milter.settimeout(timeout)
    milter.register("mailgate", data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                    negotiate=Milter.negotiate_callback)
    if not tcp:
        remove_stale_socket(spec)
    old_umask = os.umask(0o007)
    try:
        milter.opensocket(False)   # never remove a socket file here: remove_stale_socket decided
    finally:
        os.umask(old_umask)
    identity = None
    if not tcp:
        secure_socket_file(spec, 0o660, group)
        identity = socket_file_identity(spec)
    elif spec.port is not None:
        _no_delay(spec.port)
    if on_ready:
        on_ready()
    logging.getLogger("mailgate").info(kv_line(None, event="listening", service="milter", socket=str(spec)))
    GatewayMilter.writer = OutboundWriter(runtime.store)
    try:
        milter.main()
    finally:
        GatewayMilter.writer.stop()
        GatewayMilter.writer = None
        remove_socket_file(spec, identity)


def _no_delay(port: int) -> None:
    """TCP_NODELAY on libmilter's listening socket, which Linux copies to every accepted
    connection: libmilter writes each modification and the final reply separately, and without
    it the reply waits for Postfix's delayed ACK (40 ms a message). libmilter does not expose the
    descriptor, so it is found among this process's own."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        finally:
            sock.close()
