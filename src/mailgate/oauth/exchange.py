"""The HTTP side of OAuth: a form POSTed to the provider, its JSON answer read (RFC 6749).

Standard library only (urllib): one request per refresh, an hour apart. Every failure becomes a
TokenError carrying the provider's own error code and description (`invalid_grant`, "Token has
been expired or revoked.") or what went wrong on the way, never the request's secrets.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

TIMEOUT = 10.0
MAX_ANSWER_BYTES = 64 * 1024
MAX_DESCRIPTION = 200


class TokenError(Exception):
    """The provider refused, or could not be reached; `error` is a short code for the log."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description[:MAX_DESCRIPTION]


@dataclass(frozen=True)
class Grant:
    """What a token endpoint gave: an access token, its lifetime, maybe a new refresh token."""

    access_token: str
    expires_in: float
    refresh_token: str | None = None


def post_form(url: str, fields: dict[str, str], timeout: float = TIMEOUT) -> dict[str, Any]:
    """POST `fields` as a form and return the JSON object answered; TokenError otherwise (an
    OAuth error object is answered with HTTP 400 or 401, and is raised with its code)."""
    body = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return _json_object(response.read(MAX_ANSWER_BYTES + 1), response.status)
    except urllib.error.HTTPError as exc:
        answer = _json_object(exc.read(MAX_ANSWER_BYTES + 1), exc.code, refusal=True)
        raise _refusal(answer, exc.code) from None
    except urllib.error.URLError as exc:
        raise TokenError("unreachable", str(exc.reason)) from None
    except (TimeoutError, OSError) as exc:
        raise TokenError("unreachable", str(exc) or type(exc).__name__) from None


def _json_object(data: bytes, status: int, refusal: bool = False) -> dict[str, Any]:
    try:
        answer = json.loads(data) if len(data) <= MAX_ANSWER_BYTES else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise TokenError("bad_response", f"HTTP {status}, not a JSON object")
    if not refusal and "error" in answer:
        raise _refusal(answer, status)
    return answer


def _refusal(answer: dict[str, Any], status: int) -> TokenError:
    return TokenError(str(answer.get("error") or f"http_{status}"), str(answer.get("error_description") or ""))


def grant_from(answer: dict[str, Any]) -> Grant:
    """Read a token answer: `access_token`, `expires_in` (seconds; an hour when absent),
    `token_type` Bearer, maybe `refresh_token`."""
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenError("bad_response", "no access_token in the answer")
    kind = str(answer.get("token_type", "Bearer"))
    if kind.lower() != "bearer":
        raise TokenError("bad_response", f"token_type {kind[:20]}, expected Bearer")
    try:
        expires_in = float(answer.get("expires_in", 3600))
    except (TypeError, ValueError):
        raise TokenError("bad_response", "expires_in is not a number") from None
    rotated = answer.get("refresh_token")
    return Grant(token, expires_in, rotated if isinstance(rotated, str) and rotated else None)


def refresh_grant(token_url: str, client_id: str, client_secret: str | None, refresh_token: str,
                  scope: str, timeout: float = TIMEOUT) -> Grant:
    """The refresh-token grant: a new access token for the refresh token."""
    fields = {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": refresh_token}
    if client_secret:
        fields["client_secret"] = client_secret
    if scope:
        fields["scope"] = scope
    return grant_from(post_form(token_url, fields, timeout))
