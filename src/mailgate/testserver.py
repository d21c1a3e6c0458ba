"""`mailgate test-server NAME`: Odoo's "Test Connection" for one upstream server.

An operator who cannot send mail needs to know *which* step breaks and what to change, not a
stack trace, so the test walks the same steps Postfix's smtp client will take (resolve, connect,
TLS, greeting, EHLO, STARTTLS, AUTH, optionally a real message) and records each one as a
`Step`. The first failing step ends the test and carries a likely fix from one table (`FIXES`),
so the wording of advice lives in one place. Network trouble never raises: it is the answer.
"""

from __future__ import annotations

import difflib
import smtplib
import socket
import ssl
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Iterator, NoReturn

from mailgate.config import Config, Server
from mailgate.outbound import notification_address

# Likely fixes, keyed by the cause `_cause` finds; formatted with the server's fields.
FIXES: dict[str, str] = {
    "unknown-server": "servers in the config: {names}",
    "resolve": "the host name does not resolve: check `host` for typos and this machine's DNS",
    "port25": "port 25 is blocked by many hosting providers: use 465, 587 or 2525",
    "refused": "nothing listens there: check host and port (465 for security: tls, 587 or 2525 "
               "for starttls)",
    "timeout": "a firewall drops the connection: open outgoing TCP port {port}, or use 465, 587 "
               "or 2525",
    "greeting-timeout": "the server accepted the connection but never greeted: on port 465 it "
                        "expects TLS on connect (security: tls); else a firewall or proxy holds "
                        "the connection",
    "greeting": "the server did not greet with 220: it may be overloaded, or not an SMTP server",
    "disconnected": "the server closed the connection: it may refuse this host's address, or "
                    "expect a different security mode on this port",
    "plain-on-tls": "the server speaks plain SMTP/STARTTLS here: use security: starttls",
    "tls-handshake": "TLS could not be negotiated: check the port and security mode (465: tls, "
                     "587/2525: starttls)",
    "certificate": "the certificate does not match or is not trusted: fix the server's "
                   "certificate, set tls_ca_file, or (not recommended) tls_verify: false",
    "ca-file": "tls_ca_file cannot be read: check the path ({tls_ca_file}) and its permissions",
    "no-starttls": "STARTTLS is not offered on this port: use port 465 with security: tls, or "
                   "security: none only for a relay on a trusted network",
    "starttls-refused": "the server offered STARTTLS but refused it: retry later, or use port "
                        "465 with security: tls",
    "ehlo": "the server refused EHLO and HELO: it may refuse this host's name or address",
    "password-file": "password_file ({password_file}) cannot be read: set it to a file holding "
                     "the password, readable by this user",
    "auth-535": "wrong username or password (password_file {password_file})",
    "auth-not-offered-plain": "AUTH is only offered after STARTTLS: use security: starttls",
    "auth-not-offered": "this port does not offer AUTH: use a port that offers AUTH (587 or "
                        "465), or remove username if the server relays for this host's address",
    "auth-mechanism": "the server offers neither PLAIN nor LOGIN, which Postfix uses here",
    "auth-other": "the server refused AUTH: read its reply; the account may be locked or need "
                  "an app password",
    "no-sender": "set alias_domain and default_from (or username) so the test message has a From",
    "sender-refused": "the server refused the sender: this account may only send as certain "
                      "addresses; check from_filter and default_from",
    "rcpt-refused": "the server refused the recipient: check the address, or the server's relay "
                    "permissions for this account",
    "data-refused": "the server refused the message: read its reply (content or rate policy)",
    "other": "see the detail above",
}

SECURITY_LABELS = {"tls": "TLS", "starttls": "STARTTLS", "none": "no TLS"}


@dataclass(frozen=True)
class Step:
    """One step of the conversation; `fix` is set only on the step that failed."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class ServerTestResult:
    """Every step taken, in order; the test stopped at the first failure."""

    name: str
    server: Server | None
    steps: tuple[Step, ...]
    sent_to: str | None = None

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def failed_step(self) -> Step | None:
        return next((step for step in self.steps if not step.ok), None)

    @property
    def verdict(self) -> str:
        """One line: what works, or where it broke and what to change."""
        failed = self.failed_step
        if failed is not None:
            return f"FAIL at {failed.name}: {failed.detail} — {failed.fix}"
        server = self.server
        assert server is not None
        auth = f"AUTH as {server.username}" if server.username else "no AUTH"
        line = (f"OK: {server.name} ({server.host}:{server.port}, "
                f"{SECURITY_LABELS[server.security]}, {auth}) ready to send")
        if self.sent_to:
            line += f"; test message accepted for {self.sent_to}"
        if not server.active:
            line += " (inactive: mailgate does not use it until active: true)"
        return line


class _Stop(Exception):
    """A step failed and was recorded; nothing further can be tested."""


class _Note:
    """What a successful step reports; set by the step's body."""

    detail = ""


class _Session(smtplib.SMTP):
    """smtplib over a socket connected (and maybe TLS-wrapped) by the probe itself, so that
    connect, TLS and the greeting are separate steps with their own diagnosis."""

    def __init__(self, sock: socket.socket, host: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._ready = sock
        self._host = host  # what smtplib's starttls() verifies the certificate against

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._ready


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from: smtplib hides timeouts as disconnects."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


class _Probe:
    """Runs the steps against one server, recording each; holds the open connection."""

    def __init__(self, config: Config, server: Server, timeout: float) -> None:
        self.config = config
        self.server = server
        self.timeout = timeout
        self.steps: list[Step] = []
        self.sock: socket.socket | None = None
        self.smtp: _Session | None = None
        self.tls = False

    def fail(self, name: str, detail: str, cause: str) -> NoReturn:
        """Record the failed step with its fix and end the test."""
        fix = FIXES[cause].format(**asdict(self.server))
        self.steps.append(Step(name, False, detail, fix))
        raise _Stop

    @contextmanager
    def step(self, name: str) -> Iterator[_Note]:
        """Run one step's body: record its detail, or turn any network error into a failure."""
        note = _Note()
        try:
            yield note
        except (OSError, ValueError) as exc:
            self.fail(name, _describe(exc), self._cause(name, exc))
        self.steps.append(Step(name, True, note.detail))

    def _cause(self, name: str, exc: BaseException) -> str:
        """Which FIXES entry explains this exception at this step."""
        chain = list(_chain(exc))
        kinds = tuple(type(e) for e in chain)
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
            self.fail("tls", _describe(exc), "ca-file")
        if not self.server.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def run(self, send_to: str | None) -> None:
        server = self.server
        with self.step("resolve") as note:
            infos = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
            note.detail = f"{server.host} → " + ", ".join(dict.fromkeys(i[4][0] for i in infos))
        with self.step("connect") as note:
            self.sock = _connect(infos, self.timeout)
            note.detail = "connected to {}:{}".format(*self.sock.getpeername()[:2])
        if server.security == "tls":
            with self.step("tls") as note:
                self.sock = self.tls_context().wrap_socket(self.sock, server_hostname=server.host)
                self.tls = True
                note.detail = self._tls_detail(self.sock)
        self.smtp = _Session(self.sock, server.host, self.timeout)
        with self.step("greeting") as note:
            code, text = self.smtp.connect(server.host, server.port)
            if code != 220:
                self.fail("greeting", _reply(code, text), "greeting")
            note.detail = _reply(code, text)
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
                self.fail("ehlo", _reply(code, text), "ehlo")
            features = ", ".join(" ".join([k.upper(), *v.split()])
                                 for k, v in self.smtp.esmtp_features.items())
            prefix = "after STARTTLS: " if self.tls and self.server.security == "starttls" else ""
            note.detail = f"{prefix}{_reply(code, text).splitlines()[0]}; offers {features or 'nothing'}"

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
            note.detail = self._tls_detail(self.smtp.sock)
        self.ehlo()

    def auth(self) -> None:
        smtp, server = self.smtp, self.server
        assert smtp is not None
        if not server.username:
            self.steps.append(Step("auth", True, "skipped: no username (the server must relay "
                                                 "for this host's address)"))
            return
        with self.step("auth") as note:
            if not server.password_file:
                self.fail("auth", "username is set but password_file is not", "password-file")
            try:
                password = Path(server.password_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                self.fail("auth", _describe(exc), "password-file")
            if not smtp.has_extn("auth"):
                cause = "auth-not-offered" if self.tls else "auth-not-offered-plain"
                self.fail("auth", "AUTH is not among the EHLO extensions", cause)
            offered = smtp.esmtp_features["auth"].upper().split()
            mechanism = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
            if mechanism is None:
                self.fail("auth", f"offered: {' '.join(offered)}", "auth-mechanism")
            smtp.user, smtp.password = server.username, password
            code, text = smtp.auth(mechanism, getattr(smtp, f"auth_{mechanism.lower()}"))
            note.detail = f"{mechanism} as {server.username}: {_reply(code, text)}"

    def send(self, send_to: str) -> None:
        assert self.smtp is not None
        with self.step("send") as note:
            sender = notification_address(self.config) or self.server.username
            if not sender or "@" not in sender:
                self.fail("send", "no sender address for the test message", "no-sender")
            message = _test_message(self.server, sender, send_to)
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
            note.detail = f"from {sender} to {send_to}: {_reply(code, text)}"

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
        issuer = dict(pair[0] for pair in (sock.getpeercert() or {}).get("issuer", ()))
        trusted = f"tls_ca_file {self.server.tls_ca_file}" if self.server.tls_ca_file else "system CAs"
        return (f"{head}, certificate valid for {self.server.host}, issued by "
                f"{issuer.get('commonName') or issuer.get('organizationName', '?')} ({trusted})")


def _connect(infos: list[tuple], timeout: float) -> socket.socket:
    """The first address that accepts, like Postfix trying each A/AAAA record in turn."""
    error: OSError = OSError("no address to connect to")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _describe(exc: BaseException) -> str:
    """Readable detail: the SMTP reply, or the OS/TLS message without Python's decoration."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return _reply(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{rcpt}: {_reply(*reply)}" for rcpt, reply in exc.recipients.items())
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError) or any(isinstance(e, TimeoutError) for e in _chain(exc)):
        return "timed out"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason.replace('_', ' ').lower()}"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _reply(code: int | None, text: bytes | str | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {text or ''}".strip()


def _test_message(server: Server, sender: str, recipient: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = f"mailgate test message through server {server.name}"
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    message.set_content(f"This message was sent by `mailgate test-server {server.name}` through "
                        f"{server.host}:{server.port}.\nIf it arrived, the server works.\n")
    return message


def test_server(config: Config, name: str, *, send_to: str | None = None,
                timeout: float = 15.0) -> ServerTestResult:
    """Test one server of the config by name; inactive servers are tested too (and said so)."""
    server = config.server_named(name)
    if server is None:
        names = [s.name for s in config.servers]
        close = difflib.get_close_matches(name, names, n=1)
        detail = f"no server named '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
        fix = FIXES["unknown-server"].format(names=", ".join(names) or "none")
        return ServerTestResult(name, None, (Step("server", False, detail, fix),))
    state = "active" if server.active else "inactive (active: false), tested anyway"
    probe = _Probe(config, server, timeout)
    probe.steps.append(Step("server", True, f"{server.host}:{server.port}, security: "
                                            f"{server.security}, {state}"))
    try:
        probe.run(send_to)
    except _Stop:
        pass
    finally:
        probe.close()
    return ServerTestResult(name, server, tuple(probe.steps), send_to if probe.steps[-1].ok else None)


test_server.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name


def render(result: ServerTestResult) -> str:
    """The steps, one per line with their fix under a failure, then the verdict line."""
    width = max(len(step.name) for step in result.steps)
    lines = []
    for step in result.steps:
        lines.append(f"  {'ok' if step.ok else 'FAIL':4}  {step.name:{width}}  {step.detail}")
        if step.fix:
            lines.append(f"  {'':4}  {'':{width}}  fix: {step.fix}")
    lines.append(result.verdict)
    return "\n".join(lines)


def result_json(result: ServerTestResult) -> dict:
    """The `--json` shape: verdict, the server's connection settings (never the password)."""
    server = result.server
    return {
        "server": result.name,
        "ok": result.ok,
        "verdict": result.verdict,
        "host": server.host if server else None,
        "port": server.port if server else None,
        "security": server.security if server else None,
        "active": server.active if server else None,
        "sent_to": result.sent_to,
        "failed_step": result.failed_step.name if result.failed_step else None,
        "steps": [asdict(step) for step in result.steps],
    }
