"""Upstream SMTP sinks standing in for the real relays Postfix hands mail to.

Each sink is an aiosmtpd server on its own free 127.0.0.1 port, in its own thread, that
keeps every message in memory. It can speak implicit TLS (like port 465) or require
STARTTLS, can require AUTH (a password, or only XOAUTH2 with a bearer token a check accepts, as
Gmail and Microsoft 365 do), and can refuse chosen recipients, so tests can check that the
right transport (with the right security) delivered the right mail. The DATA reply
``250 saved <n>`` carries the message's index in ``Sink.messages``, which ties a Postfix
log line (``status=sent (250 saved 3)``) to the stored message.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hmac
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, cast

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailgate.lab.ports import LOOPBACK

Security = Literal["none", "tls", "starttls"]


def _drop_login_data_deprecation(record: logging.LogRecord) -> bool:
    """aiosmtpd 1.4 itself sets the deprecated ``Session.login_data`` on every AUTH and warns
    about it at WARNING level; that says nothing about the test, so keep it out of logs."""
    return "login_data is deprecated" not in record.getMessage()


logging.getLogger("mail.log").addFilter(_drop_login_data_deprecation)


@dataclass
class ReceivedMessage:
    """One message as the sink saw it, with how the session that carried it was secured.

    ``mail_from`` is "" for the null sender (bounces); ``index`` is the ``n`` of the
    ``250 saved <n>`` reply and the position in ``Sink.messages``.
    """

    index: int
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    auth_user: str | None
    bearer: str | None = None
    parsed: EmailMessage = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.parsed = email.message_from_bytes(self.data, policy=email.policy.default)


class _PortReportingController(Controller):
    """A Controller bound to port 0 that learns its real port before the ready check.

    Binding port 0 inside the server (instead of guessing a free port first) removes the
    race with other listeners; aiosmtpd's ready check connects to ``self.port``, so the
    port is read back from the bound socket before it runs. The ready check itself already
    wraps the socket in TLS when ``ssl_context`` is set, which implicit-TLS sinks need.
    """

    def _trigger_server(self) -> None:
        assert self.server is not None
        # aiosmtpd types it AbstractServer; it comes from loop.create_server, an asyncio.Server
        self.port = cast(asyncio.Server, self.server).sockets[0].getsockname()[1]
        super()._trigger_server()


class _Handler:
    """aiosmtpd hooks: enforce AUTH, refuse listed recipients, store messages."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        # Checked here rather than with aiosmtpd's auth_required, which also insists on
        # STARTTLS and so would refuse AUTH on an implicit-TLS connection.
        if (self.sink.auth is not None or self.sink.bearer is not None) and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.sink.reject.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        auth_user = session.auth_data if session.authenticated else None
        bearer = None
        if isinstance(auth_user, BearerLogin):
            auth_user, bearer = auth_user.user, auth_user.token
        index = self.sink._store(
            # aiosmtpd keeps the null sender as "<>" (an empty mail_from would mean "no MAIL
            # yet" to it) but strips brackets from every other address; store it as "".
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            tls=tls,
            auth_user=auth_user,
            bearer=bearer,
        )
        return f"250 saved {index}"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """Accept exactly the configured user and password (PLAIN or LOGIN)."""
        assert self.sink.auth is not None
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = self.sink.auth
        login = data.login.decode("utf-8", "replace")
        ok = hmac.compare_digest(login, user) and hmac.compare_digest(
            data.password.decode("utf-8", "replace"), password
        )
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


@dataclass(frozen=True)
class BearerLogin:
    """One XOAUTH2 attempt: the initial response exactly as decoded, and what it named."""

    raw: bytes
    user: str
    token: str
    accepted: bool


class _XOAuth2Handler(_Handler):
    """Offers XOAUTH2 alone (aiosmtpd finds `auth_XOAUTH2`; PLAIN and LOGIN are excluded)."""

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        assert self.sink.bearer is not None
        if len(args) > 1:
            raw = base64.b64decode(args[1].encode(), validate=False)
        else:
            answer = await server.challenge_auth("")
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=False)
            raw = answer
        found = re.fullmatch(rb"user=([^\x01]*)\x01auth=Bearer ([^\x01]+)\x01\x01", raw)
        user, token = (found.group(1).decode(), found.group(2).decode()) if found else ("", "")
        accepted = found is not None and self.sink.bearer(user, token)
        login = BearerLogin(raw, user, token, accepted)
        self.sink.logins.append(login)
        if not accepted:
            return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")
        return AuthResult(success=True, handled=False, auth_data=login)


class Sink:
    """An upstream SMTP server on 127.0.0.1 that records what Postfix delivers to it."""

    host = LOOPBACK

    def __init__(
        self,
        security: Security = "none",
        cert: tuple[Path, Path] | None = None,
        auth: tuple[str, str] | None = None,
        reject: dict[str, str] | None = None,
        name: str = "sink",
        bearer: Callable[[str, str], bool] | None = None,
    ) -> None:
        if security not in ("none", "tls", "starttls"):
            raise ValueError(f"unknown security {security!r}")
        if security != "none" and cert is None:
            raise ValueError(f"security={security!r} needs cert=(chain, key)")
        if (auth is not None or bearer is not None) and security == "none":
            raise ValueError("AUTH is only offered over TLS; use security='tls' or 'starttls'")
        self.security = security
        self.cert = cert
        self.auth = auth
        self.reject = {k.lower(): v for k, v in (reject or {}).items()}
        self.name = name
        self.bearer = bearer
        self.logins: list[BearerLogin] = []
        self._messages: list[ReceivedMessage] = []
        self._cond = threading.Condition()
        self._controller: _PortReportingController | None = None

    def _tls_context(self) -> ssl.SSLContext:
        assert self.cert is not None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
        return ctx

    def start(self) -> None:
        """Listen on a fresh port; returns once the server answers its greeting."""
        if self._controller is not None:
            return
        handler = _XOAuth2Handler(self) if self.bearer is not None else _Handler(self)
        kwargs: dict[str, Any] = {
            "hostname": LOOPBACK,
            "port": 0,
            # Not "localhost" or Postfix's myhostname: Postfix refuses a greeting with its
            # own name ("mail for ... loops back to myself").
            "server_hostname": f"{self.name}.sink.invalid",
            "ident": f"mailgate lab {self.name}",
        }
        if self.security == "tls":
            kwargs["ssl_context"] = self._tls_context()
        elif self.security == "starttls":
            kwargs["tls_context"] = self._tls_context()
            kwargs["require_starttls"] = True
        if self.auth is not None:
            kwargs["authenticator"] = handler.authenticate
            # Implicit TLS has no STARTTLS, which aiosmtpd would otherwise demand for AUTH.
            kwargs["auth_require_tls"] = self.security == "starttls"
        elif self.bearer is not None:
            kwargs["auth_exclude_mechanism"] = ["LOGIN", "PLAIN"]
            kwargs["auth_require_tls"] = self.security == "starttls"
        controller = _PortReportingController(handler, **kwargs)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Close the listener and end the thread; idempotent."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> Sink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError(f"sink {self.name} is not running")
        return self._controller.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of the messages received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def _store(self, **fields: Any) -> int:
        with self._cond:
            index = len(self._messages)
            self._messages.append(ReceivedMessage(index=index, **fields))
            self._cond.notify_all()
            return index

    def wait_for(
        self,
        count: int,
        timeout: float,
        match: Callable[[ReceivedMessage], bool] | None = None,
    ) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages (those passing ``match``, if given) arrived.

        ``match`` lets tests sharing one sink wait for their own mail (e.g. by recipient)
        without counting bounces or other tests' messages. Raises TimeoutError.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self._messages if match is None or match(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink {self.name}: {len(found)} of {count} messages after {timeout}s"
                    )
                self._cond.wait(left)
