"""`mailgate oauth login NAME`: the first refresh token, obtained with the administrator's consent.

Where the provider offers the device flow (Microsoft; RFC 8628) the gateway needs no browser: it
prints a page and a code to type there, and polls the token endpoint until the consent is given.
Otherwise (Google, whose device flow does not grant the mail scope) it is the authorization-code
flow with a loopback redirect (RFC 8252, with PKCE): a one-shot HTTP listener on 127.0.0.1 receives
the code the browser is sent back with. The refresh token goes into `refresh_token_file` (0600,
atomically) and is never printed.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from mailgate.config import OAuthSettings, Server
from mailgate.infra.secretfile import read_password_file
from mailgate.oauth.exchange import Grant, TokenError, grant_from, post_form
from mailgate.oauth.providers import Provider, endpoints
from mailgate.oauth.storage import write_refresh_token

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
Say = Callable[[str], None]


class LoginFailed(Exception):
    """The login did not give a refresh token; the message says why, in one line."""


def login(server: Server, say: Say, *, flow: str | None = None, port: int = 0, wait: float = 900.0,
          sleep: Callable[[float], None] = time.sleep) -> Path:
    """Run the provider's flow for `server` (`flow` "device" or "loopback"; by default the device
    flow where the provider has one), store the refresh token, return its file."""
    oauth = server.oauth
    if oauth is None:
        raise LoginFailed(f"server {server.name} has no oauth block (auth: xoauth2)")
    provider = endpoints(oauth)
    client = _client_fields(oauth)
    try:
        flow = flow or ("device" if provider.device_code_url else "loopback")
        if flow == "device" and provider.device_code_url:
            grant = _device_flow(provider, client, say, wait, sleep)
        elif flow == "loopback" and provider.authorize_url:
            grant = _loopback_flow(server, provider, client, say, port, wait)
        else:
            missing = "device_code_url" if flow == "device" else "authorize_url"
            raise LoginFailed(f"provider {oauth.provider} has no {missing} for the {flow} flow")
    except TokenError as exc:
        raise LoginFailed(f"the provider refused: {exc}") from None
    if grant.refresh_token is None:
        raise LoginFailed("the provider gave no refresh token (for Microsoft the scope needs offline_access)")
    write_refresh_token(Path(oauth.refresh_token_file), grant.refresh_token)
    return Path(oauth.refresh_token_file)


def _client_fields(oauth: OAuthSettings) -> dict[str, str]:
    fields = {"client_id": oauth.client_id}
    if oauth.client_secret_file:
        fields["client_secret"] = read_password_file(Path(oauth.client_secret_file))
    return fields


def _device_flow(provider: Provider, client: dict[str, str], say: Say, wait: float,
                 sleep: Callable[[float], None]) -> Grant:
    assert provider.device_code_url is not None
    answer = post_form(provider.device_code_url, {"client_id": client["client_id"], "scope": provider.scope})
    page = answer.get("verification_uri") or answer.get("verification_url")
    code, device_code = answer.get("user_code"), answer.get("device_code")
    if not (page and code and device_code):
        raise LoginFailed("the provider's device-code answer lacks verification_uri, user_code or device_code")
    say(f"Open {page} in a browser, sign in as the server's account and enter the code {code}")
    interval = float(answer.get("interval") or 5)
    deadline = time.monotonic() + min(float(answer.get("expires_in") or wait), wait)
    while time.monotonic() < deadline:
        sleep(interval)
        try:
            return grant_from(post_form(provider.token_url, {**client, "grant_type": DEVICE_GRANT,
                                                             "device_code": str(device_code)}))
        except TokenError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += 5
                continue
            raise
    raise LoginFailed("no consent before the code expired: run the login again")


def _loopback_flow(server: Server, provider: Provider, client: dict[str, str], say: Say, port: int,
                   wait: float) -> Grant:
    assert provider.authorize_url is not None
    state, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    catcher = _RedirectCatcher(port, state)
    redirect_uri = f"http://127.0.0.1:{catcher.port}/"
    query = {"client_id": client["client_id"], "redirect_uri": redirect_uri, "response_type": "code",
             "scope": provider.scope, "state": state, "access_type": "offline", "prompt": "consent",
             "code_challenge": challenge, "code_challenge_method": "S256", "login_hint": server.username or ""}
    separator = "&" if "?" in provider.authorize_url else "?"
    say(f"Open this address in a browser on this machine and consent as {server.username}:\n"
        f"  {provider.authorize_url}{separator}{urllib.parse.urlencode(query)}\n"
        f"(from another machine, forward the port first: ssh -L {catcher.port}:127.0.0.1:{catcher.port} "
        "this-host, and run the login again with --port)")
    code = catcher.wait(wait)
    return grant_from(post_form(provider.token_url, {**client, "grant_type": "authorization_code", "code": code,
                                                     "redirect_uri": redirect_uri, "code_verifier": verifier}))


class _RedirectCatcher:
    """A one-shot listener on 127.0.0.1 for the browser's redirect with `?code=…&state=…`."""

    def __init__(self, port: int, state: str) -> None:
        self.state = state
        self.code: str | None = None
        self.error: str | None = None
        self.done = threading.Event()
        catcher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                """The request carries the code: it is not logged."""

            def do_GET(self) -> None:
                catcher.receive(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query)))
                body = b"mailgate: done, you can close this page.\n" if catcher.code else b"mailgate: login failed.\n"
                self.send_response(200 if catcher.code else 400)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = HTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]

    def receive(self, query: dict[str, str]) -> None:
        if query.get("state") != self.state:
            self.error = "the redirect's state does not match this login"
        elif "error" in query:
            self.error = f"{query['error']}: {query.get('error_description', '')}".rstrip(": ")
        elif query.get("code"):
            self.code = query["code"]
        else:
            return
        self.done.set()

    def wait(self, timeout: float) -> str:
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        thread.start()
        try:
            if not self.done.wait(timeout):
                raise LoginFailed("no redirect from the browser in time: run the login again")
        finally:
            self.server.shutdown()
            self.server.server_close()
        if self.code is None:
            raise LoginFailed(f"the provider refused: {self.error}")
        return self.code
