"""`mailgate test-server`: each step against real sockets on 127.0.0.1 (the lab sinks)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from mailgate.commands import testserver
from mailgate.config import Config
from mailgate.configfile import parse_config
from mailgate.lab.certs import CertBundle, make_ca_and_cert
from mailgate.lab.oauth_provider import OAuthProvider
from mailgate.lab.ports import free_port
from mailgate.lab.sinks import Sink

USER, PASSWORD = "odoo@example.test", "s3cret-Pa55"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertBundle:
    return make_ca_and_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def localhost_only_certs(tmp_path_factory) -> CertBundle:
    """A certificate for `localhost` alone: connecting as 127.0.0.1 must not verify."""
    return make_ca_and_cert(tmp_path_factory.mktemp("certs-localhost"), hostnames=("localhost",))


def _sink(security: str, bundle: CertBundle | None, auth: bool, name: str) -> Iterator[Sink]:
    sink = Sink(security=security, cert=(bundle.cert, bundle.key) if bundle else None,
                auth=(USER, PASSWORD) if auth else None, name=name)
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def starttls_sink(certs) -> Iterator[Sink]:
    yield from _sink("starttls", certs, True, "starttls")


@pytest.fixture(scope="module")
def tls_sink(certs) -> Iterator[Sink]:
    yield from _sink("tls", certs, True, "tls")


@pytest.fixture(scope="module")
def plain_sink() -> Iterator[Sink]:
    yield from _sink("none", None, False, "plain")


@pytest.fixture(scope="module")
def localhost_only_sink(localhost_only_certs) -> Iterator[Sink]:
    yield from _sink("tls", localhost_only_certs, False, "localhost-only")


@pytest.fixture
def make_config(tmp_path):
    """A config with one server `relay` (plus an inactive `spare`); keys override defaults."""

    def make(password: str = PASSWORD, **server: object) -> Config:
        secret = tmp_path / "relay.password"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
        fields = {"name": "relay", "host": "localhost", "security": "starttls",
                  "username": USER, "password_file": str(secret), **server}
        lines = [f"    {key}: {json.dumps(value)}" for key, value in fields.items()
                 if value is not None]
        text = ("alias_domain: example.test\nservers:\n  - " + "\n".join(lines).lstrip()
                + "\n  - {name: spare, host: localhost, port: 1, active: false}\n")
        return parse_config(text, check_files=False).config

    return make


def _names(result: testserver.ServerTestResult) -> list[str]:
    return [step.name for step in result.steps]


def test_starttls_with_auth_verified_by_ca_file(make_config, starttls_sink, certs):
    config = make_config(port=starttls_sink.port, tls_ca_file=str(certs.ca_cert))
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.ok, testserver.render(result)
    assert _names(result) == ["server", "resolve", "connect", "greeting", "ehlo", "starttls",
                              "tls", "ehlo", "auth"]
    assert result.verdict == (f"OK: relay (localhost:{starttls_sink.port}, STARTTLS, AUTH as "
                              f"{USER}) ready to send")
    tls = next(s for s in result.steps if s.name == "tls")
    assert "certificate valid for localhost" in tls.detail and "mailgate lab CA" in tls.detail


def test_implicit_tls_with_auth(make_config, tls_sink, certs):
    config = make_config(port=tls_sink.port, security="tls", tls_ca_file=str(certs.ca_cert))
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.ok, testserver.render(result)
    assert _names(result) == ["server", "resolve", "connect", "tls", "greeting", "ehlo", "auth"]
    assert ", TLS, AUTH as" in result.verdict


def test_plain_server_without_auth(make_config, plain_sink):
    config = make_config(host="127.0.0.1", port=plain_sink.port, security="none", username=None,
                         password_file=None)
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.ok, testserver.render(result)
    assert "no TLS, no AUTH" in result.verdict
    assert result.steps[-1].detail.startswith("skipped")


def test_wrong_password_fails_at_auth_without_showing_it(make_config, starttls_sink, certs):
    config = make_config(password="not-the-password", port=starttls_sink.port,
                         tls_ca_file=str(certs.ca_cert))
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.failed_step.name == "auth"
    assert result.failed_step.detail.startswith("535")
    assert result.failed_step.fix.startswith("wrong username or password (password_file ")
    assert result.verdict.startswith("FAIL at auth: 535")
    shown = testserver.render(result) + json.dumps(testserver.result_json(result))
    assert "not-the-password" not in shown and PASSWORD not in shown


def test_untrusted_certificate_fails_at_tls(make_config, starttls_sink):
    config = make_config(port=starttls_sink.port)
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.failed_step.name == "tls"
    assert "certificate verify failed" in result.failed_step.detail
    assert result.failed_step.fix == testserver.FIXES["certificate"]


def test_tls_verify_false_accepts_untrusted_certificate(make_config, starttls_sink):
    config = make_config(port=starttls_sink.port, tls_verify=False)
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.ok, testserver.render(result)
    assert "NOT verified" in next(s for s in result.steps if s.name == "tls").detail


def test_hostname_mismatch_fails_at_tls(make_config, localhost_only_sink, localhost_only_certs):
    ca = str(localhost_only_certs.ca_cert)
    good = make_config(port=localhost_only_sink.port, security="tls", username=None,
                       password_file=None, tls_ca_file=ca)
    assert testserver.test_server(good, "relay", timeout=5).ok
    config = make_config(host="127.0.0.1", port=localhost_only_sink.port, security="tls",
                         username=None, password_file=None, tls_ca_file=ca)
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.failed_step.name == "tls"
    assert "mismatch" in result.failed_step.detail
    assert result.failed_step.fix == testserver.FIXES["certificate"]


def test_closed_port_fails_at_connect(make_config):
    config = make_config(host="127.0.0.1", port=free_port())
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.failed_step.name == "connect"
    assert result.failed_step.fix == testserver.FIXES["refused"]


def test_port_25_refused_suggests_other_ports(make_config):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 25)) == 0:
            pytest.skip("something listens on 127.0.0.1:25")
    result = testserver.test_server(make_config(host="127.0.0.1", port=25), "relay", timeout=5)
    assert result.failed_step.name == "connect"
    assert "use 465, 587 or 2525" in result.failed_step.fix


def test_silent_server_times_out_at_greeting(make_config):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        config = make_config(host="127.0.0.1", port=silent.getsockname()[1])
        result = testserver.test_server(config, "relay", timeout=0.5)
    assert result.failed_step.name == "greeting"
    assert result.failed_step.detail == "timed out"
    assert result.failed_step.fix == testserver.FIXES["greeting-timeout"]


def test_implicit_tls_against_starttls_server(make_config, starttls_sink, certs):
    config = make_config(port=starttls_sink.port, security="tls", tls_ca_file=str(certs.ca_cert))
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.failed_step.name == "tls"
    assert result.failed_step.fix == "the server speaks plain SMTP/STARTTLS here: use security: starttls"


def test_starttls_not_offered(make_config, plain_sink):
    config = make_config(port=plain_sink.port, username=None, password_file=None)
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.failed_step.name == "starttls"
    assert result.failed_step.fix == testserver.FIXES["no-starttls"]


def test_auth_not_offered_without_tls(make_config, plain_sink):
    config = make_config(host="127.0.0.1", port=plain_sink.port, security="none")
    result = testserver.test_server(config, "relay", timeout=5)
    assert result.failed_step.name == "auth"
    assert result.failed_step.fix == "AUTH is only offered after STARTTLS: use security: starttls"


def test_send_to_delivers_a_real_message(make_config, starttls_sink, certs):
    config = make_config(port=starttls_sink.port, tls_ca_file=str(certs.ca_cert))
    result = testserver.test_server(config, "relay", send_to="ops@example.org", timeout=5)
    assert result.ok, testserver.render(result)
    assert result.steps[-1].name == "send" and "250 saved" in result.steps[-1].detail
    assert result.verdict.endswith("test message accepted for ops@example.org")
    [received] = starttls_sink.wait_for(1, timeout=5, match=lambda m: m.rcpt_tos == ["ops@example.org"])
    assert received.mail_from == "notifications@example.test"
    assert received.tls and received.auth_user == USER
    assert received.parsed["Subject"] == "mailgate test message through server relay"


def test_unknown_server_lists_the_names(make_config):
    result = testserver.test_server(make_config(), "rellay")
    assert not result.ok and _names(result) == ["server"]
    assert "did you mean 'relay'" in result.failed_step.detail
    assert result.failed_step.fix == "servers in the config: relay, spare"


def test_inactive_server_is_tested_and_said_so(plain_sink):
    text = (f"servers:\n  - {{name: old, host: 127.0.0.1, port: {plain_sink.port}, "
            "security: none, active: false}\n")
    config = parse_config(text, check_files=False).config
    result = testserver.test_server(config, "old", timeout=5)
    assert result.ok
    assert "inactive" in result.steps[0].detail and "inactive" in result.verdict


def test_json_and_text_output(make_config, plain_sink):
    config = make_config(port=plain_sink.port, username=None, password_file=None)
    result = testserver.test_server(config, "relay", timeout=5)
    data = testserver.result_json(result)
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is False and data["failed_step"] == "starttls"
    assert data["steps"][0] == {"name": "server", "ok": True, "fix": None,
                                "detail": f"localhost:{plain_sink.port}, security: starttls, active"}
    text = testserver.render(result)
    assert text.splitlines()[-1] == result.verdict
    assert "fix: STARTTLS is not offered" in text


# -- XOAUTH2 (Gmail, Microsoft 365): a token from the provider, then AUTH XOAUTH2 -------------------

@pytest.fixture(scope="module")
def provider() -> Iterator[OAuthProvider]:
    server = OAuthProvider().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def xoauth2_sink(certs, provider) -> Iterator[Sink]:
    sink = Sink(security="starttls", cert=(certs.cert, certs.key), name="xoauth2",
                bearer=lambda user, token: user == USER and provider.valid(token))
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def oauth_config(tmp_path, certs, provider, xoauth2_sink):
    def make(refresh: str | None = None, client_secret: str = "lab-client-secret", username: str = USER) -> Config:
        for name, text in (("refresh", refresh or provider.issue_refresh_token()), ("client", client_secret)):
            (tmp_path / name).write_text(text + "\n")
            (tmp_path / name).chmod(0o600)
        text = (f"servers:\n  - {{name: gmail, host: localhost, port: {xoauth2_sink.port}, username: {username},\n"
                f"     tls_ca_file: {certs.ca_cert}, auth: xoauth2,\n"
                f"     oauth: {{provider: custom, token_url: '{provider.url}/token', client_id: lab-client,\n"
                f"             client_secret_file: {tmp_path}/client, refresh_token_file: {tmp_path}/refresh}}}}\n")
        return parse_config(text, check_files=False).config
    return make


def test_xoauth2_login_like_odoos_test_connection(oauth_config, xoauth2_sink):
    result = testserver.test_server(oauth_config(), "gmail", send_to="someone@example.net")
    assert result.ok, testserver.render(result)
    names = _names(result)
    assert names[names.index("token"):] == ["token", "auth", "send"]
    auth = next(s for s in result.steps if s.name == "auth")
    assert auth.detail.startswith(f"XOAUTH2 as {USER}: 235")
    login = xoauth2_sink.logins[-1]
    assert login.accepted and login.raw.startswith(f"user={USER}\x01auth=Bearer ".encode())
    shown = testserver.render(result) + json.dumps(testserver.result_json(result))
    assert login.token not in shown


@pytest.mark.parametrize("kwargs, step, words", [
    ({"refresh": "1//revoked"}, "token", "mailgate oauth login gmail"),
    ({"client_secret": "wrong"}, "token", "oauth.client_id"),
    ({"username": "other@example.test"}, "auth", "must be the account the token was issued for"),
])
def test_xoauth2_says_which_side_refused(oauth_config, kwargs, step, words):
    result = testserver.test_server(oauth_config(**kwargs), "gmail")
    failed = result.steps[-1]
    assert not result.ok and failed.name == step and words in failed.fix, testserver.render(result)
