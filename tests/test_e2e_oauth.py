"""XOAUTH2 end to end: a real Postfix with Cyrus's XOAUTH2 plugin logs in to an upstream that takes
only bearer tokens, with the access token mailgate's socketmap hands it (docs/rules.md A1-A3).

The provider is a local stand-in (`mailgate.lab.oauth_provider`) whose clock the test moves
together with the gateway's, so tokens expire without waiting; the upstream asks it whether a
token is valid at that moment.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgate.commands.postfixconf import XOAUTH2_PLUGIN
from mailgate.lab.gateway import LabGateway
from mailgate.lab.oauth_provider import OAuthProvider
from mailgate.lab.sinks import Sink

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("attach_logs")]

ACCOUNT = "odoo@gmail-gw.example"
LIFETIME = 3600


@pytest.fixture(scope="module")
def provider() -> Iterator[OAuthProvider]:
    server = OAuthProvider(lifetime=LIFETIME).start()
    yield server
    server.stop()


def gateway_options(request: pytest.FixtureRequest, base: Path) -> dict[str, object]:
    """The usual gateway and an XOAUTH2-only upstream, `gmail`, whose tokens `provider` issues."""
    if not list(Path("/usr/lib").glob(f"*/sasl2/{XOAUTH2_PLUGIN}")):
        pytest.fail(f"{XOAUTH2_PLUGIN} is not installed: run scripts/install-sasl-xoauth2", pytrace=False)
    provider: OAuthProvider = request.getfixturevalue("provider")
    secrets = base / "secrets"
    secrets.mkdir()
    for name, text in (("gmail-refresh", provider.issue_refresh_token()),
                       ("gmail-client", provider.state.client_secret)):
        (secrets / name).write_text(text + "\n")
        (secrets / name).chmod(0o600)

    def sinks(cert: tuple[Path, Path]) -> dict[str, Sink]:
        return {"gmail": Sink(security="starttls", cert=cert, name="gmail",
                              bearer=lambda user, token: user == ACCOUNT and provider.valid(token))}

    def servers(gw: LabGateway, ca_file: Path) -> str:
        return (f"  - {{name: gmail, host: localhost, port: {gw.sinks['gmail'].port}, username: \"{ACCOUNT}\",\n"
                f"      tls_ca_file: {ca_file}, priority: 1, auth: xoauth2,\n"
                f"      oauth: {{provider: custom, token_url: \"{provider.url}/token\", client_id: lab-client,\n"
                "               client_secret_file: secrets/gmail-client,\n"
                "               refresh_token_file: secrets/gmail-refresh}}\n")

    return {"extra_sinks": sinks, "extra_servers": servers}


def submit(gw: LabGateway) -> tuple[str, str]:
    to = f"r{uuid.uuid4().hex[:10]}@customer.example"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = f"Odoo <{ACCOUNT}>", to, "oauth e2e"
    msg.set_content("Sent with a token.\n")
    return gw.submit(msg.as_bytes(), ACCOUNT, [to]).queue_id, to


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def expire_everything(gw: LabGateway, provider: OAuthProvider) -> None:
    """An hour passes for the gateway and the provider alike: every token issued so far is dead."""
    provider.advance(LIFETIME)
    gw.move_clock(LIFETIME)


def test_mail_goes_out_with_a_token_and_a_refreshed_one_after_expiry(gw: LabGateway, provider: OAuthProvider):
    wait_until(lambda: provider.refreshes() >= 1, 20, "mailgate never asked for a first token")
    queue_id, to = submit(gw)
    sink, index = gw.delivery(queue_id, to)
    first = gw.sinks[sink].messages[index]
    assert sink == "gmail" and first.auth_user == ACCOUNT and first.tls
    # What Cyrus's XOAUTH2 plugin sent: Odoo's initial response, the bearer token being the
    # password the socketmap answered.
    login = gw.sinks["gmail"].logins[-1]
    assert login.raw == f"user={ACCOUNT}\x01auth=Bearer {first.bearer}\x01\x01".encode()

    before = provider.refreshes()
    provider.state.rotate = True  # from now on, as Microsoft: every refresh hands a new refresh token
    refresh_file = gw.base / "secrets" / "gmail-refresh"
    old_refresh = refresh_file.read_text().strip()
    expire_everything(gw, provider)
    assert not provider.valid(first.bearer)
    wait_until(lambda: provider.refreshes() > before, 20, "the expired token was not refreshed")
    queue_id, to = submit(gw)
    sink, index = gw.delivery(queue_id, to)
    second = gw.sinks[sink].messages[index]
    assert sink == "gmail" and second.bearer != first.bearer and provider.valid(second.bearer)
    rotated = refresh_file.read_text().strip()
    assert rotated != old_refresh and rotated in provider.state.refresh_tokens
    assert old_refresh not in provider.state.refresh_tokens and "rotated=yes" in gw.mailgate_log()


def test_refused_refresh_defers_mail_until_the_provider_is_back(gw: LabGateway, provider: OAuthProvider):
    provider.refuse("invalid_grant", "Token has been expired or revoked.")
    before = provider.refreshes()
    expire_everything(gw, provider)
    wait_until(lambda: provider.refreshes() > before, 20, "no refresh was tried")
    queue_id, to = submit(gw)
    # The sasl map answered TEMP: Postfix defers (4.3.0, "local data error"), nothing bounces.
    deferred = gw.pf.wait_for_log(rf"{queue_id}: to=<{re.escape(to)}>.*dsn=(4\.\d\.\d), status=deferred", 40)
    tries = provider.refreshes()
    wait_until(lambda: provider.refreshes() >= tries + 2, 40, "the keeper stopped retrying")
    failures = re.findall(r"event=oauth server=gmail result=refresh-failed .*", gw.mailgate_log())
    assert len(failures) == 1, failures
    assert "error=invalid_grant" in failures[0] and 'detail="Token has been expired or revoked."' in failures[0]

    provider.accept()
    wait_until(lambda: "result=refreshed" in gw.mailgate_log().split(failures[0])[-1], 40, "no recovery")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gw.pf.flush()
        if re.search(rf"{queue_id}: to=<{re.escape(to)}>, .*status=sent", gw.pf.log_text()):
            break
        time.sleep(1)
    sink, index = gw.delivery(queue_id, to, timeout=5)
    assert sink == "gmail" and provider.valid(gw.sinks[sink].messages[index].bearer)
    assert deferred.group(1) == "4.3.0"


def test_no_token_in_any_log(gw: LabGateway, provider: OAuthProvider):
    secrets = [*provider.state.access_tokens, *provider.state.refresh_tokens, provider.state.client_secret]
    logs = gw.mailgate_log() + gw.pf.log_text()
    assert secrets and not [s for s in secrets if s in logs]
