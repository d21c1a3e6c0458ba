"""Readable details for the steps: an SMTP reply as one line, an exception as the operator would
say it, and the chain of exceptions behind one."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from: smtplib hides timeouts as disconnects."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def describe(exc: BaseException) -> str:
    """Readable detail: the SMTP reply, or the OS/TLS message without Python's decoration."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return reply(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{rcpt}: {reply(*answer)}" for rcpt, answer in exc.recipients.items())
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError) or any(isinstance(e, TimeoutError) for e in chain(exc)):
        return "timed out"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS handshake failed: {exc.reason.replace('_', ' ').lower()}"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def reply(code: int | None, text: bytes | str | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{code} {text or ''}".strip()
