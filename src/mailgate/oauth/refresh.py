"""One refresh for one server's oauth block: its files read, its provider's endpoint asked.

Shared by the token keeper (`serve`) and `test-server`, so that the test does exactly what the
gateway does; the files are read at every refresh, so a refresh token that `oauth login` wrote
is used without a reload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailgate.config import OAuthSettings
from mailgate.infra.secretfile import read_password_file
from mailgate.oauth.exchange import TIMEOUT, Grant, refresh_grant
from mailgate.oauth.providers import endpoints
from mailgate.oauth.storage import read_refresh_token


@dataclass(frozen=True)
class Refreshed:
    grant: Grant
    token_url: str
    rotated: bool  # the provider answered a refresh token other than the one sent


def refresh(oauth: OAuthSettings, exchange: Callable[..., Grant] = refresh_grant,
            timeout: float = TIMEOUT) -> Refreshed:
    """Raises UnusableFile (a secret file), ValueError (no token URL) or TokenError (the provider)."""
    refresh_token = read_refresh_token(Path(oauth.refresh_token_file))
    secret = read_password_file(Path(oauth.client_secret_file)) if oauth.client_secret_file else None
    provider = endpoints(oauth)
    grant = exchange(provider.token_url, oauth.client_id, secret, refresh_token, provider.scope, timeout=timeout)
    rotated = grant.refresh_token is not None and grant.refresh_token != refresh_token
    return Refreshed(grant, provider.token_url, rotated)
