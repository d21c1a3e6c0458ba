"""A stand-in for Google's and Microsoft's OAuth token endpoints, and the tokens they issue.

It speaks their JSON (RFC 6749): the refresh-token grant answers `access_token`, `expires_in`,
`token_type: Bearer` and, when `rotate` is on (as Microsoft does), a new `refresh_token`; a
refusal is HTTP 400 with `{"error": "invalid_grant", "error_description": ...}`. It also serves
the device-code flow (`/devicecode`, polled with the device-code grant) and the authorization-code
flow (`/authorize` redirects to the caller's loopback address with a code), for `oauth login`.
Its clock can be moved forward (`advance`), so a test lets tokens expire without waiting; the
XOAUTH2 sink asks `valid()` whether a bearer token may log in now.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mailgate.lab.ports import LOOPBACK

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class ProviderState:
    client_id: str
    client_secret: str
    lifetime: int = 3600
    rotate: bool = False
    refusal: tuple[str, str] | None = None  # (error, description) answered to every refresh
    offset: float = 0.0
    refresh_tokens: set[str] = field(default_factory=set)
    access_tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry
    device_codes: dict[str, bool] = field(default_factory=dict)    # device code -> approved
    auth_codes: set[str] = field(default_factory=set)
    grants: list[dict[str, str]] = field(default_factory=list)     # every token request's form


class OAuthProvider:
    """A token endpoint on a free loopback port; `url` is its base (`/token` appended)."""

    def __init__(self, client_id: str = "lab-client", client_secret: str = "lab-client-secret",
                 lifetime: int = 3600, rotate: bool = False) -> None:
        self.state = ProviderState(client_id, client_secret, lifetime, rotate)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- control ---------------------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self.state.offset

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.state.offset += seconds

    def refuse(self, error: str = "invalid_grant", description: str = "Token has been expired or revoked.") -> None:
        with self.lock:
            self.state.refusal = (error, description)

    def accept(self) -> None:
        with self.lock:
            self.state.refusal = None

    def issue_refresh_token(self) -> str:
        token = "1//lab-refresh-" + secrets.token_urlsafe(24)
        with self.lock:
            self.state.refresh_tokens.add(token)
        return token

    def approve_device_codes(self) -> None:
        """The user typed the code and consented, for every device code issued so far."""
        with self.lock:
            for code in self.state.device_codes:
                self.state.device_codes[code] = True

    def valid(self, token: str) -> bool:
        with self.lock:
            expiry = self.state.access_tokens.get(token)
        return expiry is not None and self.now() < expiry

    def refreshes(self) -> int:
        with self.lock:
            return sum(1 for g in self.state.grants if g.get("grant_type") == "refresh_token")

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> OAuthProvider:
        provider = self

        class Handler(_Handler):
            owner = provider
        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="oauth-provider",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the protocol ----------------------------------------------------------------------

    def _issue(self, with_refresh: bool) -> dict[str, object]:
        access = "ya29.lab-" + secrets.token_urlsafe(32)
        self.state.access_tokens[access] = self.now() + self.state.lifetime
        answer: dict[str, object] = {"access_token": access, "expires_in": self.state.lifetime,
                                     "token_type": "Bearer", "scope": "https://mail.google.com/"}
        if with_refresh:
            rotated = "1//lab-refresh-" + secrets.token_urlsafe(24)
            self.state.refresh_tokens.add(rotated)
            answer["refresh_token"] = rotated
        return answer

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        with self.lock:
            state = self.state
            state.grants.append(form)
            if form.get("client_id") != state.client_id or form.get("client_secret") != state.client_secret:
                return 401, {"error": "invalid_client", "error_description": "The OAuth client was not found."}
            grant = form.get("grant_type")
            if grant == "refresh_token":
                if state.refusal is not None:
                    return 400, {"error": state.refusal[0], "error_description": state.refusal[1]}
                old = form.get("refresh_token", "")
                if old not in state.refresh_tokens:
                    return 400, {"error": "invalid_grant", "error_description": "Bad Request"}
                if state.rotate:
                    state.refresh_tokens.discard(old)
                return 200, self._issue(state.rotate)
            if grant == "authorization_code":
                if form.get("code") not in state.auth_codes:
                    return 400, {"error": "invalid_grant", "error_description": "Malformed auth code."}
                state.auth_codes.discard(form["code"])
                return 200, self._issue(True)
            if grant == DEVICE_GRANT:
                approved = state.device_codes.get(form.get("device_code", ""))
                if approved is None:
                    return 400, {"error": "expired_token", "error_description": "unknown device code"}
                if not approved:
                    return 400, {"error": "authorization_pending", "error_description": "waiting for the user"}
                del state.device_codes[form["device_code"]]
                return 200, self._issue(True)
            return 400, {"error": "unsupported_grant_type", "error_description": str(grant)}

    def device_code(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        with self.lock:
            code = secrets.token_urlsafe(16)
            self.state.device_codes[code] = False
        return 200, {"device_code": code, "user_code": "LAB-CODE", "verification_uri": f"{self.url}/device",
                     "expires_in": 900, "interval": 1, "message": "To sign in, open the page and enter LAB-CODE."}

    def authorize(self, query: dict[str, str]) -> str:
        """Where the browser goes after consent: the redirect URI with a code and the state."""
        code = secrets.token_urlsafe(16)
        with self.lock:
            self.state.auth_codes.add(code)
        return query["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": query.get("state", "")})


class _Handler(BaseHTTPRequestHandler):
    owner: OAuthProvider

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the provider's state, not its access log."""

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        path = urllib.parse.urlsplit(self.path).path
        if path.endswith("/token"):
            self._answer(*self.owner.token(form))
        elif path.endswith("/devicecode"):
            self._answer(*self.owner.device_code(form))
        else:
            self._answer(404, {"error": "not_found"})

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        if parts.path.endswith("/authorize"):
            self.send_response(302)
            self.send_header("Location", self.owner.authorize(dict(urllib.parse.parse_qsl(parts.query))))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._answer(404, {"error": "not_found"})
