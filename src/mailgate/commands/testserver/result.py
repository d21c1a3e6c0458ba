"""What the test found: each `Step`, the `ServerTestResult` with its verdict, the one table of
likely fixes (`FIXES`), and the two ways a result is shown (`render` for a terminal, `result_json`
for `--json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mailgate.config import Server

# Likely fixes, keyed by the cause `_cause` finds; formatted with the server's fields.
FIXES: dict[str, str] = {
    "unknown-server": "servers in the config: {names}",
    "resolve": "the host name does not resolve: check `host` for typos and this machine's DNS",
    "port25": "port 25 is blocked by many hosting providers: use 465, 587 or 2525",
    "refused": "nothing listens there: check host and port (465 for security: tls, 587 or 2525 "
               "for starttls)",
    "timeout": "a firewall drops the connection: open outgoing TCP port {port}, or use 465, 587 "
               "or 2525",
    "greeting-timeout": "the server accepted the connection but never greeted: on port 465 it "
                        "expects TLS on connect (security: tls); else a firewall or proxy holds "
                        "the connection",
    "greeting": "the server did not greet with 220: it may be overloaded, or not an SMTP server",
    "disconnected": "the server closed the connection: it may refuse this host's address, or "
                    "expect a different security mode on this port",
    "plain-on-tls": "the server speaks plain SMTP/STARTTLS here: use security: starttls",
    "tls-handshake": "TLS could not be negotiated: check the port and security mode (465: tls, "
                     "587/2525: starttls)",
    "certificate": "the certificate does not match or is not trusted: fix the server's "
                   "certificate, set tls_ca_file, or (not recommended) tls_verify: false",
    "ca-file": "tls_ca_file cannot be read: check the path ({tls_ca_file}) and its permissions",
    "no-starttls": "STARTTLS is not offered on this port: use port 465 with security: tls, or "
                   "security: none only for a relay on a trusted network",
    "starttls-refused": "the server offered STARTTLS but refused it: retry later, or use port "
                        "465 with security: tls",
    "ehlo": "the server refused EHLO and HELO: it may refuse this host's name or address",
    "password-file": "password_file ({password_file}) cannot be read: set it to a file holding "
                     "the password, readable by this user",
    "auth-535": "wrong username or password (password_file {password_file})",
    "auth-not-offered-plain": "AUTH is only offered after STARTTLS: use security: starttls",
    "auth-not-offered": "this port does not offer AUTH: use a port that offers AUTH (587 or "
                        "465), or remove username if the server relays for this host's address",
    "auth-mechanism": "the server offers neither PLAIN nor LOGIN, which Postfix uses here",
    "auth-other": "the server refused AUTH: read its reply; the account may be locked or need "
                  "an app password",
    "oauth-file": "the OAuth refresh token or client secret file cannot be used: fix the file "
                  "named above (or run `mailgate oauth login {name}` for a new refresh token)",
    "oauth-grant": "the provider refused the refresh token (revoked, expired, or issued to another "
                   "client): run `mailgate oauth login {name}` for a new one",
    "oauth-client": "the provider does not accept this client: check oauth.client_id and the "
                    "client secret file (the app registration in Google Cloud or Entra ID)",
    "oauth-scope": "the provider refused the scope: leave oauth.scope out for the provider's default",
    "oauth-unreachable": "the token endpoint cannot be reached: check this machine's DNS and "
                         "outgoing HTTPS (port 443)",
    "oauth-other": "the provider refused: read its error above",
    "auth-xoauth2-not-offered": "the server does not offer XOAUTH2: check host and port "
                                "(smtp.gmail.com or smtp.office365.com, port 587)",
    "auth-xoauth2-refused": "the server refused the access token: username ({username}) must be the "
                            "account the token was issued for; for Microsoft 365, SMTP AUTH must be "
                            "enabled for the mailbox and the scope must include SMTP.Send",
    "no-sender": "set alias_domain and default_from (or username) so the test message has a From",
    "sender-refused": "the server refused the sender: this account may only send as certain "
                      "addresses; check from_filter and default_from",
    "rcpt-refused": "the server refused the recipient: check the address, or the server's relay "
                    "permissions for this account",
    "data-refused": "the server refused the message: read its reply (content or rate policy)",
    "other": "see the detail above",
}

SECURITY_LABELS = {"tls": "TLS", "starttls": "STARTTLS", "none": "no TLS"}


@dataclass(frozen=True)
class Step:
    """One step of the conversation; `fix` is set only on the step that failed."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass(frozen=True)
class ServerTestResult:
    """Every step taken, in order; the test stopped at the first failure."""

    name: str
    server: Server | None
    steps: tuple[Step, ...]
    sent_to: str | None = None

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def failed_step(self) -> Step | None:
        return next((step for step in self.steps if not step.ok), None)

    @property
    def verdict(self) -> str:
        """One line: what works, or where it broke and what to change."""
        failed = self.failed_step
        if failed is not None:
            return f"FAIL at {failed.name}: {failed.detail} — {failed.fix}"
        server = self.server
        assert server is not None
        auth = f"AUTH as {server.username}" if server.username else "no AUTH"
        line = (f"OK: {server.name} ({server.host}:{server.port}, "
                f"{SECURITY_LABELS[server.security]}, {auth}) ready to send")
        if self.sent_to:
            line += f"; test message accepted for {self.sent_to}"
        if not server.active:
            line += " (inactive: mailgate does not use it until active: true)"
        return line


def render(result: ServerTestResult) -> str:
    """The steps, one per line with their fix under a failure, then the verdict line."""
    width = max(len(step.name) for step in result.steps)
    lines = []
    for step in result.steps:
        lines.append(f"  {'ok' if step.ok else 'FAIL':4}  {step.name:{width}}  {step.detail}")
        if step.fix:
            lines.append(f"  {'':4}  {'':{width}}  fix: {step.fix}")
    lines.append(result.verdict)
    return "\n".join(lines)


def result_json(result: ServerTestResult) -> dict:
    """The `--json` shape: verdict, the server's connection settings (never the password)."""
    server = result.server
    return {
        "server": result.name,
        "ok": result.ok,
        "verdict": result.verdict,
        "host": server.host if server else None,
        "port": server.port if server else None,
        "security": server.security if server else None,
        "active": server.active if server else None,
        "sent_to": result.sent_to,
        "failed_step": result.failed_step.name if result.failed_step else None,
        "steps": [asdict(step) for step in result.steps],
    }
