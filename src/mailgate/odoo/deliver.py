"""`mailgate deliver`: hand one inbound message to Odoo at once, for Postfix's pipe(8).

Postfix runs `mailgate deliver --alias NAME` with the raw message on stdin and reads only two
things back: the exit status and a little output. The call is the one Odoo's own gateway
script (addons/mail/static/scripts/odoo-mailgate.py) makes:
`execute_kw(db, uid, password, 'mail.thread', 'message_process', [model or False,
xmlrpc.client.Binary(message)], {})`, preceded by `authenticate` so the configuration names a
login rather than a numeric user id.

Exit status, as pipe(8) understands it. pipe(8) says: "Command exit status codes are expected
to follow the conventions defined in <sysexits.h>. Exit status 0 means normal successful
completion." Which codes defer and which bounce is decided by Postfix's sys_exits table
(src/global/sys_exits.c): only EX_TEMPFAIL (75, "4.3.0") and EX_OSERR (71) are soft; every
other sysexits code, EX_CONFIG (78, "5.3.5") included, and every unknown code BOUNCES. So
everything that is our fault or the operator's (unknown alias, missing password file, wrong
password, missing database) exits 75: the mail waits in the queue until someone fixes it,
instead of bouncing to a customer. Only a message Odoo itself refuses for good exits 65
(EX_DATAERR, "5.6.0"), which bounces with our one-line reason in the DSN. The line never begins
with an enhanced status code (pipe(8): "When the output begins with a 4.X.X or 5.X.X enhanced
status code, the status code takes precedence over the non-zero exit status"), so the exit
status alone decides.

The timeout must stay well below pipe(8)'s command time limit (default 1000 s): a command
killed for exceeding it is BOUNCED ("Command time limit exceeded"), not deferred. A timeout
after the message reached Odoo may deliver it twice on retry; Odoo ignores a Message-Id it has
already processed (message_process then returns False), so a retry is safe.
"""

from __future__ import annotations

import http.client
import re
import xml.parsers.expat
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO, cast

from mailgate.config import Config
from mailgate.infra.logfmt import kv_line
from mailgate.rules.replies import EXIT

DELIVERED, TEMPFAIL, REFUSED = "delivered", "tempfail", "refused"

EX_OK = EXIT["ok"]                   # delivered
EX_DATAERR = EXIT["data_error"]      # sys_exits.c "5.6.0 data format error": bounces
EX_TEMPFAIL = EXIT["temp_failure"]   # sys_exits.c "4.3.0 temporary failure": the only code we use to defer

EXIT_CODES = {DELIVERED: EX_OK, TEMPFAIL: EX_TEMPFAIL, REFUSED: EX_DATAERR}

ODOO_TARGET = "odoo"
ODOO_TARGET_PREFIX = ODOO_TARGET + ":"
CATCHALL_ROUTE, FALLBACK_ROUTE = "catchall", "fallback"  # route names the transport map uses
THREAD_MODEL, PROCESS_METHOD = "mail.thread", "message_process"
DEFAULT_TIMEOUT = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_DETAIL_CHARS = 200
_READ_CHUNK = 1024 * 1024
_LINE_PREFIX = "mailgate deliver"


@dataclass(frozen=True)
class FaultRule:
    """A Fault whose exception text matches `pattern` ends in `outcome`, for the reason `why`."""

    pattern: re.Pattern[str]
    outcome: str
    why: str


def _rule(pattern: str, outcome: str, why: str) -> FaultRule:
    return FaultRule(re.compile(pattern, re.IGNORECASE | re.MULTILINE), outcome, why)


# First match wins; transient causes come first, so a traceback that shows both a lock
# conflict and a ValueError raised while handling it keeps the mail. A Fault that matches
# nothing is TEMPFAIL: an unknown error keeps the mail in the queue (Postfix bounces it only
# after maximal_queue_lifetime) rather than bouncing a message Odoo might accept tomorrow.
FAULT_RULES: tuple[FaultRule, ...] = (
    _rule(r"could not serialize access|SerializationFailure|deadlock detected"
          r"|could not obtain lock|LockNotAvailable", TEMPFAIL,
          "concurrent update in PostgreSQL: Odoo gave up retrying, a later attempt succeeds"),
    _rule(r'database "?[^"\s]*"? does not exist', TEMPFAIL,
          "wrong database in our configuration: the operator must fix it; never the sender's fault"),
    _rule(r"OperationalError|InterfaceError|PoolError|too many connections", TEMPFAIL,
          "PostgreSQL behind Odoo is down or overloaded"),
    _rule(r"^Access Denied|AccessDenied", TEMPFAIL,
          "the password changed between authenticate and execute_kw: the operator must fix it"),
    _rule(r"No possible route found", REFUSED,
          "Odoo has no alias and no catchall for the recipient: the same message fails every time"),
    _rule(r"^(Unicode\w*Error|email\.errors\.\w+)\b", REFUSED,
          "Odoo cannot parse the message: its bytes will not change on retry"),
    _rule(r"^ValueError\b", REFUSED,
          "Odoo's mail gateway raises ValueError for a message it will not accept"),
)

# Failures to reach Odoo or to understand its answer: all transient.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, http.client.HTTPException, xmlrpc.client.ProtocolError,
    xmlrpc.client.ResponseError, xml.parsers.expat.ExpatError)


@dataclass(frozen=True)
class DeliveryResult:
    """What became of one message: the exit code for Postfix and a password-free reason."""

    exit_code: int
    outcome: str
    detail: str
    thread_id: int | None = None


def _result(outcome: str, detail: str, thread_id: int | None = None) -> DeliveryResult:
    return DeliveryResult(EXIT_CODES[outcome], outcome, detail, thread_id)


def _model_of_target(target: str, owner: str) -> str | None:
    """`odoo:MODEL` names a model; a bare `odoo` (or `odoo:`) lets Odoo route by itself."""
    if target.strip().lower() == ODOO_TARGET:
        return None
    if not target.startswith(ODOO_TARGET_PREFIX):
        raise ValueError(f"{owner} delivers to {target!r}, not to Odoo")
    return target[len(ODOO_TARGET_PREFIX):].strip() or None


def odoo_model_for(config: Config, alias: str) -> str | None:
    """The model to pass to `message_process` for mail on `alias`.

    An alias with an `odoo:MODEL` target names its model. The catchall and bounce aliases, and
    a bare `odoo` target, give None, which goes over the wire as False like the gateway script
    without a model: Odoo then routes the message itself (replies by their references, bounces
    by the bounce address, the rest by its own mail.alias records). `fallback` is the route
    the transport map uses for `fallback_target`. Raises ValueError for a name we do not know
    or a target that is not Odoo's, so a wrong transport map is caught before anything is sent.
    """
    wanted = alias.strip().lower()
    for candidate in config.aliases:
        if wanted in (candidate.name.lower(), candidate.address.lower()):
            return _model_of_target(candidate.target, f"alias {alias!r}")
    special = {CATCHALL_ROUTE, *(d.catchall_alias for d in config.alias_domains), *config.bounce_aliases}
    if wanted in special:
        return None
    if wanted == FALLBACK_ROUTE and config.fallback_target:
        return _model_of_target(config.fallback_target, "fallback_target")
    known = ", ".join(a.name for a in config.aliases) or "none"
    catchalls = ", ".join(dict.fromkeys(d.catchall_alias for d in config.alias_domains)) or "none"
    raise ValueError(f"unknown alias {alias!r} (aliases: {known}; catchall: {catchalls})")


def read_password(config: Config) -> str:
    """The Odoo password from `odoo.password_file`, stripped; OSError/ValueError if unusable."""
    path: Path | None = config.odoo.password_file
    if path is None:
        raise ValueError("odoo.password_file is not set")
    password = Path(path).read_text(encoding="utf-8").strip()
    if not password:
        raise ValueError(f"{path} is empty")
    return password


def classify_fault(fault: xmlrpc.client.Fault) -> FaultRule | None:
    """The first rule matching the fault's exception lines, or None (then: TEMPFAIL).

    Odoo sends the whole traceback as the fault string; only its unindented lines are the
    exception messages, the indented ones are source code that could mention any word.
    """
    text = "\n".join(line for line in str(fault.faultString).splitlines() if line[:1].strip())
    for rule in FAULT_RULES:
        if rule.pattern.search(text):
            return rule
    return None


def _fault_summary(fault: xmlrpc.client.Fault) -> str:
    lines = [line for line in str(fault.faultString).splitlines() if line[:1].strip()]
    return f"fault {fault.faultCode}: {lines[-1] if lines else ''}"


class _TimeoutTransport(xmlrpc.client.Transport):
    """xmlrpc.client has no timeout of its own; a hung Odoo must not hold a delivery slot."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


class _SafeTimeoutTransport(xmlrpc.client.SafeTransport):
    """The same timeout over HTTPS (a separate class: the two transports' connections differ)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPSConnection:
        connection = super().make_connection(host)
        connection.timeout = self.timeout
        return connection


def _proxy(url: str, path: str, timeout: float) -> xmlrpc.client.ServerProxy:
    base = url.rstrip("/")
    transport_class = _SafeTimeoutTransport if base.lower().startswith("https:") else _TimeoutTransport
    return xmlrpc.client.ServerProxy(base + path, transport=transport_class(timeout), allow_none=True)


def _scrub(text: str, password: str | None) -> str:
    """One line, without the password: Postfix copies it into logs and bounce messages."""
    text = text.replace("\r", " ").replace("\n", " ")
    return text.replace(password, "***") if password else text


def _redact(text: str, password: str | None) -> str:
    """A detail: scrubbed, and short enough for pipe(8)'s limited command output."""
    return _scrub(text, password)[:MAX_DETAIL_CHARS]


def deliver_to_odoo(config: Config, alias: str, message: bytes, *, timeout: float = DEFAULT_TIMEOUT,
                    password: str | None = None) -> DeliveryResult:
    """Authenticate, then `message_process` exactly as odoo-mailgate.py does.

    Every failure is returned, not raised, already classified: configuration and
    authentication problems and an unreachable Odoo are TEMPFAIL (see the module docstring
    for why nothing of ours may bounce), Faults go through FAULT_RULES.
    """
    try:
        model = odoo_model_for(config, alias)
        secret = password if password is not None else read_password(config)
    except (OSError, ValueError) as exc:
        return _result(TEMPFAIL, _redact(f"configuration: {exc}", password))
    odoo = config.odoo
    try:
        with _proxy(odoo.url, "/xmlrpc/2/common", timeout) as common:
            uid = common.authenticate(odoo.database, odoo.user, secret, {})
        if not uid:
            return _result(TEMPFAIL, _redact(
                f"authentication failed for login {odoo.user!r} on database {odoo.database!r}", secret))
        with _proxy(odoo.url, "/xmlrpc/2/object", timeout) as models:
            thread_id = models.execute_kw(odoo.database, uid, secret, THREAD_MODEL, PROCESS_METHOD,
                                          [model or False, xmlrpc.client.Binary(message)], {})
    except xmlrpc.client.Fault as fault:
        rule = classify_fault(fault)
        outcome = rule.outcome if rule else TEMPFAIL
        return _result(outcome, _redact(_fault_summary(fault), secret))
    except xmlrpc.client.ProtocolError as exc:
        return _result(TEMPFAIL, _redact(f"odoo http error {exc.errcode} {exc.errmsg}", secret))
    except _TRANSPORT_ERRORS as exc:
        return _result(TEMPFAIL, _redact(f"odoo unreachable: {type(exc).__name__}: {exc}", secret))
    if thread_id is False:
        return _result(DELIVERED, "Odoo had already processed this Message-Id")
    # message_process answers the thread's id (or False, handled above); XML-RPC types it loosely.
    return _result(DELIVERED, "delivered", cast("int | None", thread_id))


class MessageTooLarge(Exception):
    """More than MAX_MESSAGE_BYTES on stdin."""


def read_message(stdin: BinaryIO, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """The whole message as bytes, raising MessageTooLarge past `limit` without reading on."""
    source = getattr(stdin, "buffer", stdin)
    chunks: list[bytes] = []
    size = 0
    while chunk := source.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise MessageTooLarge(f"message larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _log_password(config: Config) -> str | None:
    """The password, only to scrub it from the log line; None when it cannot be read."""
    try:
        return read_password(config)
    except Exception:
        return None


def _model_label(config: Config, alias: str) -> str | None:
    try:
        return odoo_model_for(config, alias)
    except Exception:
        return "?"


def main_deliver(config: Config, alias: str, stdin: BinaryIO, stderr: TextIO) -> int:
    """Read stdin, deliver, write one `key=value` line for Postfix's log and DSN, return the
    exit code. Never raises: a crash would exit 1, which pipe(8) bounces."""
    model: str | None = "?"
    try:
        model = _model_label(config, alias)
        message = read_message(stdin, MAX_MESSAGE_BYTES)
        if not message:
            result = _result(REFUSED, "empty message on stdin")
        else:
            result = deliver_to_odoo(config, alias, message)
    except MessageTooLarge as exc:
        result = _result(TEMPFAIL, str(exc))
    except Exception as exc:
        result = _result(TEMPFAIL, _redact(f"internal error: {type(exc).__name__}: {exc}", None))
    fields: dict[str, object] = {"alias": alias, "model": model, "outcome": result.outcome}
    if result.thread_id is not None:
        fields["thread"] = result.thread_id
    if result.outcome != DELIVERED or result.thread_id is None:
        fields["detail"] = result.detail
    try:
        line = _scrub(kv_line(_LINE_PREFIX, **fields), _log_password(config))
        stderr.write(line + "\n")
        stderr.flush()
    except Exception:
        pass
    return result.exit_code
