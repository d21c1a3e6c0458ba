"""The probe: walks the steps against one server over one connection, records each, and ends the
test at the first failure with the cause that picks its fix."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn, cast

from mailgate.commands.testserver.connection import Session, connect
from mailgate.commands.testserver.details import chain, describe, reply
from mailgate.commands.testserver.message import test_message
from mailgate.commands.testserver.result import FIXES, Step
from mailgate.commands.testserver.xoauth2 import TokenRefused, access_token, login
from mailgate.config import Config, Server
from mailgate.rules.outbound import notification_address


class Stop(Exception):
    """A step failed and was recorded; nothing further can be tested."""


class _Note:
    """What a successful step reports; set by the step's body."""

    detail = ""


class Probe:
    """Runs the steps against one server, recording each; holds the open connection."""

    def __init__(self, config: Config, server: Server, timeout: float) -> None:
        self.config = config
        self.server = server
        self.timeout = timeout
        self.steps: list[Step] = []
        self.sock: socket.socket | None = None
        self.smtp: Session | None = None
        self.tls = False

    def fail(self, name: str, detail: str, cause: str) -> NoReturn:
        """Record the failed step with its fix and end the test."""
        fix = FIXES[cause].format(**asdict(self.server))
        self.steps.append(Step(name, False, detail, fix))
        raise Stop

    @contextmanager
    def step(self, name: str) -> Iterator[_Note]:
        """Run one step's body: record its detail, or turn any network error into a failure."""
        note = _Note()
        try:
            yield note
        except (OSError, ValueError) as exc:
            self.fail(name, describe(exc), self._cause(name, exc))
        self.steps.append(Step(name, True, note.detail))

    def _cause(self, name: str, exc: BaseException) -> str:
        """Which FIXES entry explains this exception at this step."""
        links = list(chain(exc))
        kinds = tuple(type(e) for e in links)
        if any(issubclass(k, socket.gaierror) for k in kinds):
            return "resolve"
        if any(issubclass(k, (TimeoutError, ConnectionRefusedError)) for k in kinds):
            if self.server.port == 25:
                return "port25"
            if any(issubclass(k, ConnectionRefusedError) for k in kinds):
                return "refused"
            return "greeting-timeout" if name == "greeting" else "timeout"
        if any(issubclass(k, ssl.SSLCertVerificationError) for k in kinds):
            return "certificate"
        if name == "tls" and isinstance(exc, smtplib.SMTPResponseException):
            return "starttls-refused"
        if name == "tls" and isinstance(exc, ssl.SSLError):
            implicit = self.server.security == "tls"
            return "plain-on-tls" if implicit and self._greets_in_plain() else "tls-handshake"
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            if self.server.oauth is not None:
                return "auth-xoauth2-refused"
            return "auth-535" if exc.smtp_code == 535 else "auth-other"
        return {
            smtplib.SMTPSenderRefused: "sender-refused",
            smtplib.SMTPRecipientsRefused: "rcpt-refused",
            smtplib.SMTPDataError: "data-refused",
            smtplib.SMTPServerDisconnected: "disconnected",
            ConnectionResetError: "disconnected",
        }.get(type(exc), "other")

    def _greets_in_plain(self) -> bool:
        """After a failed TLS handshake: does a fresh connection get a plain `220` greeting?"""
        try:
            with socket.create_connection((self.server.host, self.server.port),
                                          timeout=min(self.timeout, 5.0)) as sock:
                return sock.recv(512).startswith(b"220")
        except OSError:
            return False

    def tls_context(self) -> ssl.SSLContext:
        """Verification as Postfix will do it: the CA file when given, else the system CAs."""
        try:
            ctx = ssl.create_default_context(cafile=self.server.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            self.fail("tls", describe(exc), "ca-file")
        if not self.server.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def run(self, send_to: str | None) -> None:
        server = self.server
        with self.step("resolve") as note:
            infos = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
            # An inet/inet6 sockaddr: (host, port[, flowinfo, scope_id]); the host is a str.
            note.detail = f"{server.host} → " + ", ".join(dict.fromkeys(str(i[4][0]) for i in infos))
        with self.step("connect") as note:
            self.sock = connect(infos, self.timeout)
            note.detail = "connected to {}:{}".format(*self.sock.getpeername()[:2])
        if server.security == "tls":
            with self.step("tls") as note:
                self.sock = self.tls_context().wrap_socket(self.sock, server_hostname=server.host)
                self.tls = True
                note.detail = self._tls_detail(self.sock)
        self.smtp = Session(self.sock, server.host, self.timeout)
        with self.step("greeting") as note:
            code, text = self.smtp.connect(server.host, server.port)
            if code != 220:
                self.fail("greeting", reply(code, text), "greeting")
            note.detail = reply(code, text)
        self.ehlo()
        if server.security == "starttls":
            self.starttls()
        self.auth()
        if send_to:
            self.send(send_to)

    def ehlo(self) -> None:
        assert self.smtp is not None
        with self.step("ehlo") as note:
            code, text = self.smtp.ehlo()
            if code != 250:
                code, text = self.smtp.helo()
            if code != 250:
                self.fail("ehlo", reply(code, text), "ehlo")
            features = ", ".join(" ".join([k.upper(), *v.split()])
                                 for k, v in self.smtp.esmtp_features.items())
            prefix = "after STARTTLS: " if self.tls and self.server.security == "starttls" else ""
            note.detail = f"{prefix}{reply(code, text).splitlines()[0]}; offers {features or 'nothing'}"

    def starttls(self) -> None:
        assert self.smtp is not None
        with self.step("starttls") as note:
            if not self.smtp.has_extn("starttls"):
                self.fail("starttls", "STARTTLS is not among the EHLO extensions", "no-starttls")
            note.detail = "offered"
        context = self.tls_context()
        with self.step("tls") as note:
            self.smtp.starttls(context=context)
            self.tls = True
            # starttls() replaced the socket with its TLS wrapper
            note.detail = self._tls_detail(cast(ssl.SSLSocket, self.smtp.sock))
        self.ehlo()

    def auth(self) -> None:
        smtp, server = self.smtp, self.server
        assert smtp is not None
        if not server.username:
            self.steps.append(Step("auth", True, "skipped: no username (the server must relay "
                                                 "for this host's address)"))
            return
        if server.oauth is not None:
            self.auth_xoauth2()
            return
        with self.step("auth") as note:
            if not server.password_file:
                self.fail("auth", "username is set but password_file is not", "password-file")
            try:
                password = Path(server.password_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                self.fail("auth", describe(exc), "password-file")
            if not smtp.has_extn("auth"):
                cause = "auth-not-offered" if self.tls else "auth-not-offered-plain"
                self.fail("auth", "AUTH is not among the EHLO extensions", cause)
            offered = smtp.esmtp_features["auth"].upper().split()
            mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
            if mechanism is None:
                self.fail("auth", f"offered: {' '.join(offered)}", "auth-mechanism")
            smtp.user, smtp.password = server.username, password
            code, text = smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
            note.detail = f"{mechanism} as {server.username}: {reply(code, text)}"

    def auth_xoauth2(self) -> None:
        """Odoo's Gmail/Outlook login: a fresh access token, then AUTH XOAUTH2 with it."""
        smtp, server = self.smtp, self.server
        assert smtp is not None and server.oauth is not None
        with self.step("token") as note:
            try:
                token, note.detail = access_token(server.oauth, self.timeout)
            except TokenRefused as exc:
                self.fail("token", exc.detail, exc.cause)
        with self.step("auth") as note:
            offered = smtp.esmtp_features.get("auth", "").upper().split()
            if "XOAUTH2" not in offered:
                cause = "auth-not-offered-plain" if not self.tls else "auth-xoauth2-not-offered"
                self.fail("auth", f"offered: {' '.join(offered) or 'no AUTH'}", cause)
            note.detail = login(smtp, server, token)

    def send(self, send_to: str) -> None:
        assert self.smtp is not None
        with self.step("send") as note:
            sender = notification_address(self.config, self.config.domain_named(self.config.alias_domain)) \
                or self.server.username
            if not sender or "@" not in sender:
                self.fail("send", "no sender address for the test message", "no-sender")
            message = test_message(self.server, sender, send_to)
            smtp = self.smtp
            code, text = smtp.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, sender)
            code, text = smtp.rcpt(send_to)
            if code not in (250, 251):
                raise smtplib.SMTPRecipientsRefused({send_to: (code, text)})
            code, text = smtp.data(message.as_bytes())
            if code != 250:
                raise smtplib.SMTPDataError(code, text)
            note.detail = f"from {sender} to {send_to}: {reply(code, text)}"

    def close(self) -> None:
        """QUIT politely when possible; the verdict never depends on it."""
        try:
            if self.smtp is not None and self.smtp.sock is not None:
                self.smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass
        finally:
            if self.smtp is not None:
                self.smtp.close()
            if self.sock is not None:
                self.sock.close()

    def _tls_detail(self, sock: ssl.SSLSocket) -> str:
        cipher = sock.cipher()
        head = f"{sock.version()} ({cipher[0] if cipher else '?'})"
        if not self.server.tls_verify:
            return f"{head}, certificate NOT verified (tls_verify: false)"
        # "issuer" is a sequence of RDNs, each a tuple of (name, value) pairs
        rdns = cast("tuple[tuple[tuple[str, str], ...], ...]", (sock.getpeercert() or {}).get("issuer", ()))
        issuer = dict(pair[0] for pair in rdns)
        trusted = f"tls_ca_file {self.server.tls_ca_file}" if self.server.tls_ca_file else "system CAs"
        return (f"{head}, certificate valid for {self.server.host}, issued by "
                f"{issuer.get('commonName') or issuer.get('organizationName', '?')} ({trusted})")
