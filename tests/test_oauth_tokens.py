"""The token exchange and the keeper, against the local stand-in of Google's and Microsoft's
token endpoints (a thread on loopback, no real provider is ever contacted)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from mailgate.config import Config, OAuthSettings, Server
from mailgate.lab.oauth_provider import OAuthProvider
from mailgate.oauth.exchange import TokenError, refresh_grant
from mailgate.oauth.keeper import TokenKeeper
from mailgate.oauth.providers import endpoints
from mailgate.oauth.storage import write_refresh_token


@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    server = OAuthProvider().start()
    yield server
    server.stop()


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_refresh_grant_speaks_the_providers_json(provider):
    refresh = provider.issue_refresh_token()
    grant = refresh_grant(f"{provider.url}/token", "lab-client", "lab-client-secret", refresh, "https://mail.google.com/")
    assert provider.valid(grant.access_token) and grant.expires_in == 3600 and grant.refresh_token is None
    assert provider.state.grants[-1] == {"grant_type": "refresh_token", "client_id": "lab-client",
                                         "client_secret": "lab-client-secret", "refresh_token": refresh,
                                         "scope": "https://mail.google.com/"}


@pytest.mark.parametrize("client_secret, refresh, error", [
    ("wrong", None, "invalid_client"),
    ("lab-client-secret", "1//revoked", "invalid_grant"),
])
def test_refusals_carry_the_providers_error(provider, client_secret, refresh, error):
    with pytest.raises(TokenError) as caught:
        refresh_grant(f"{provider.url}/token", "lab-client", client_secret,
                      refresh or provider.issue_refresh_token(), "")
    assert caught.value.error == error and caught.value.description


def test_an_unreachable_provider_is_a_token_error(provider):
    url = f"{provider.url}/token"
    provider.stop()
    with pytest.raises(TokenError) as caught:
        refresh_grant(url, "lab-client", "s", "r", "", timeout=2)
    assert caught.value.error == "unreachable"


def test_provider_urls_and_scopes():
    google = endpoints(OAuthSettings("google", "id", Path("/r")))
    assert google.token_url == "https://oauth2.googleapis.com/token" and google.scope == "https://mail.google.com/"
    assert google.device_code_url is None
    microsoft = endpoints(OAuthSettings("microsoft", "id", Path("/r"), tenant="contoso.onmicrosoft.com"))
    assert microsoft.token_url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert microsoft.scope == "https://outlook.office.com/SMTP.Send offline_access"
    assert microsoft.device_code_url.endswith("/contoso.onmicrosoft.com/oauth2/v2.0/devicecode")
    custom = endpoints(OAuthSettings("custom", "id", Path("/r"), token_url="http://127.0.0.1:9/token"))
    assert custom.token_url == "http://127.0.0.1:9/token"
    with pytest.raises(ValueError):
        endpoints(OAuthSettings("custom", "id", Path("/r")))


def test_a_rotated_refresh_token_replaces_the_file_atomically(tmp_path):
    path = secret_file(tmp_path / "refresh", "old")
    path.chmod(0o640)
    write_refresh_token(path, "new")
    assert path.read_text() == "new\n" and (path.stat().st_mode & 0o777) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["refresh"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keeper_setup(provider, tmp_path):
    oauth = OAuthSettings("custom", "lab-client", secret_file(tmp_path / "refresh", provider.issue_refresh_token()),
                          secret_file(tmp_path / "client", "lab-client-secret"), token_url=f"{provider.url}/token")
    server = Server("gmail", "smtp.example", username="odoo@example.com", auth="xoauth2", oauth=oauth)
    config = Config(servers=(server, Server("plain", "relay.example")))
    clock = Clock()
    logger = logging.getLogger("mailgate.test.oauth")
    return TokenKeeper(lambda: config, clock, logger), server, clock, oauth


def test_the_keeper_fetches_refreshes_ahead_and_hands_out(keeper_setup, provider, caplog):
    keeper, server, clock, _ = keeper_setup
    assert keeper.current(server) is None  # nothing yet: the lookup answers TEMP
    keeper.refresh_all()
    first = keeper.current(server)
    assert first and provider.valid(first) and provider.refreshes() == 1
    clock.now += 3000
    keeper.refresh_all()
    assert keeper.current(server) == first and provider.refreshes() == 1
    clock.now += 301  # within five minutes of expiry: a new one, ahead of time
    keeper.refresh_all()
    assert keeper.current(server) not in (None, first) and provider.refreshes() == 2


def test_the_keeper_keeps_a_rotated_refresh_token(keeper_setup, provider):
    keeper, server, _, oauth = keeper_setup
    provider.state.rotate = True
    before = oauth.refresh_token_file.read_text()
    keeper.refresh_all()
    after = oauth.refresh_token_file.read_text().strip()
    assert after != before.strip() and after in provider.state.refresh_tokens
    assert before.strip() not in provider.state.refresh_tokens


def test_a_failure_streak_is_one_line_and_the_token_never_logged(keeper_setup, provider, caplog):
    keeper, server, clock, _ = keeper_setup
    caplog.set_level(logging.INFO, logger="mailgate.test.oauth")
    provider.refuse("invalid_grant", "Token has been expired or revoked.")
    for _ in range(4):
        keeper.refresh_all()
        clock.now += 400
    assert provider.refreshes() == 4 and keeper.current(server) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "server=gmail result=refresh-failed" in lines[0]
    assert 'error=invalid_grant detail="Token has been expired or revoked."' in lines[0]
    provider.accept()
    clock.now += 400
    keeper.refresh_all()
    token = keeper.current(server)
    assert token and "result=refreshed" in caplog.records[-1].getMessage()
    assert "after_failures=4" in caplog.records[-1].getMessage()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert token not in logged and not any(t in logged for t in provider.state.refresh_tokens)


def test_a_changed_oauth_block_starts_again(keeper_setup, provider):
    keeper, server, _, oauth = keeper_setup
    keeper.refresh_all()
    assert keeper.current(server)
    changed = replace(server, oauth=replace(oauth, scope="other"))
    assert keeper.current(changed) is None


def test_an_unreadable_refresh_token_file_is_a_failure_not_a_crash(keeper_setup, provider, caplog):
    keeper, server, _, oauth = keeper_setup
    caplog.set_level(logging.INFO, logger="mailgate.test.oauth")
    oauth.refresh_token_file.chmod(0o644)
    keeper.refresh_all()
    assert keeper.current(server) is None and provider.refreshes() == 0
    assert "error=unusable_file" in caplog.records[-1].getMessage()
