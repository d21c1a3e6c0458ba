"""The two steps of an XOAUTH2 login, as Odoo's "Test Connection" does it for Gmail and Outlook:
get an access token with the refresh-token grant, then `AUTH XOAUTH2` with
`user=U\\x01auth=Bearer T\\x01\\x01`. Each says which side refused: the provider (token) or the
mail server (auth). The token is used and forgotten, never shown."""

from __future__ import annotations

import smtplib

from mailgate.commands.testserver.connection import Session
from mailgate.commands.testserver.details import reply
from mailgate.config import OAuthSettings, Server
from mailgate.infra.secretfile import UnusableFile
from mailgate.oauth.exchange import TokenError
from mailgate.oauth.refresh import refresh

TOKEN_CAUSES = {"invalid_grant": "oauth-grant", "invalid_client": "oauth-client", "unauthorized_client": "oauth-client",
                "unreachable": "oauth-unreachable", "invalid_scope": "oauth-scope"}


class TokenRefused(Exception):
    def __init__(self, detail: str, cause: str) -> None:
        super().__init__(detail)
        self.detail, self.cause = detail, cause


def access_token(oauth: OAuthSettings, timeout: float) -> tuple[str, str]:
    """(token, what to say about it), or TokenRefused with the cause that picks the fix."""
    try:
        done = refresh(oauth, timeout=timeout)
    except UnusableFile as exc:
        raise TokenRefused(str(exc), "oauth-file") from None
    except TokenError as exc:
        raise TokenRefused(f"{exc.error}: {exc.description}" if exc.description else exc.error,
                           TOKEN_CAUSES.get(exc.error, "oauth-other")) from None
    except ValueError as exc:
        raise TokenRefused(str(exc), "oauth-other") from None
    grant = done.grant
    rotated = ", a new refresh token was offered (serve keeps it; this test does not)" if done.rotated else ""
    return grant.access_token, f"from {done.token_url}: valid for {int(grant.expires_in)} s{rotated}"


def login(smtp: Session, server: Server, token: str) -> str:
    """AUTH XOAUTH2; a refusal raises SMTPAuthenticationError with the server's error challenge
    (Google answers 334 with a JSON status before its 535) in the message."""
    challenges: list[str] = []

    def respond(challenge: bytes | None = None) -> str:
        if challenge is None:
            return f"user={server.username}\x01auth=Bearer {token}\x01\x01"
        challenges.append(challenge.decode("utf-8", "replace"))
        return ""

    try:
        code, text = smtp.auth("XOAUTH2", respond, initial_response_ok=True)
    except smtplib.SMTPAuthenticationError as exc:
        said = f" (server said {challenges[0]})" if challenges else ""
        error = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        raise smtplib.SMTPAuthenticationError(exc.smtp_code, error + said) from None
    return f"XOAUTH2 as {server.username}: {reply(code, text)}"
