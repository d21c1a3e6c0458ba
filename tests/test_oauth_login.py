"""`mailgate oauth login NAME` against the local stand-in of the provider: the device flow
(Microsoft's way) and the loopback redirect (Google's way); the refresh token lands in its file."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultlab import wait_until
from mailgate.configfile import parse_config
from mailgate.lab.oauth_provider import OAuthProvider
from mailgate.oauth.login import LoginFailed, login


@pytest.fixture
def provider() -> Iterator[OAuthProvider]:
    server = OAuthProvider().start()
    yield server
    server.stop()


def config_text(tmp_path: Path, provider: OAuthProvider, flow: str) -> str:
    secret = tmp_path / "client"
    secret.write_text(provider.state.client_secret + "\n")
    secret.chmod(0o600)
    urls = {"device": f"device_code_url: '{provider.url}/devicecode'",
            "loopback": f"authorize_url: '{provider.url}/authorize'"}[flow]
    return (f"secret_file: {tmp_path}/secret\nservers:\n"
            "  - {name: m365, host: smtp.office365.com, username: odoo@mycompany.com, auth: xoauth2,\n"
            f"     oauth: {{provider: custom, token_url: '{provider.url}/token', {urls}, client_id: lab-client,\n"
            f"             client_secret_file: {secret}, refresh_token_file: {tmp_path}/refresh}}}}\n")


def server_of(tmp_path: Path, provider: OAuthProvider, flow: str):
    return parse_config(config_text(tmp_path, provider, flow), check_files=False).config.servers[0]


def stored(tmp_path: Path, provider: OAuthProvider) -> str:
    path = tmp_path / "refresh"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert token in provider.state.refresh_tokens
    return token


@pytest.mark.e2e
def test_device_flow_through_the_command_line(tmp_path, provider):
    path = tmp_path / "mailgate.yaml"
    path.write_text(config_text(tmp_path, provider, "device"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.Popen([sys.executable, "-m", "mailgate", "oauth", "login", "m365", "--config", str(path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: provider.state.device_codes, 10, 0.05, "the device code request")
        provider.approve_device_codes()
        out, err = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == 0, err
    token = stored(tmp_path, provider)
    assert re.search(r"Open http://127\.0\.0\.1:\d+/device .* enter the code LAB-CODE", err)
    assert "refresh token stored in" in err and token not in out + err


def test_loopback_redirect_with_pkce(tmp_path, provider):
    said: list[str] = []
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(path=login(
        server_of(tmp_path, provider, "loopback"), said.append, wait=20)))
    worker.start()
    wait_until(lambda: said, 10, 0.05, "the login's answer")
    url = re.search(r"(http://\S+/authorize\?\S+)", said[0]).group(1)
    assert "code_challenge_method=S256" in url and "redirect_uri=http%3A%2F%2F127.0.0.1%3A" in url
    with urllib.request.urlopen(url, timeout=10) as page:  # the browser: consent, then the redirect
        assert b"done" in page.read()
    worker.join(20)
    assert result["path"] == tmp_path / "refresh"
    code_grant = provider.state.grants[-1]
    assert code_grant["grant_type"] == "authorization_code" and code_grant["code_verifier"]
    assert stored(tmp_path, provider) not in "\n".join(said)


def test_a_forged_redirect_is_refused(tmp_path, provider):
    said: list[str] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            login(server_of(tmp_path, provider, "loopback"), said.append, wait=20)
        except LoginFailed as exc:
            failure.append(exc)
    worker = threading.Thread(target=run)
    worker.start()
    wait_until(lambda: said, 10, 0.05, "the login's answer")
    port = re.search(r"redirect_uri=http%3A%2F%2F127.0.0.1%3A(\d+)", said[0]).group(1)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/?code=stolen&state=wrong", timeout=10)
    worker.join(20)
    assert failure and "state does not match" in str(failure[0])
    assert not (tmp_path / "refresh").exists()


def test_a_refused_device_login_says_why(tmp_path, provider):
    server = server_of(tmp_path, provider, "device")
    provider.state.client_secret = "rotated-on-the-provider-side"
    with pytest.raises(LoginFailed, match="invalid_client"):
        login(server, lambda text: None, wait=5, sleep=lambda s: None)
    assert not (tmp_path / "refresh").exists()


def test_google_has_no_device_flow_for_mail(tmp_path, provider):
    server = parse_config(config_text(tmp_path, provider, "loopback").replace("provider: custom", "provider: google"),
                          check_files=False).config.servers[0]
    with pytest.raises(LoginFailed, match="no device_code_url"):
        login(server, lambda text: None, flow="device")
