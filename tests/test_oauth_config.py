"""`auth: xoauth2` and its `oauth:` block: defaults, errors on their line, secret files checked."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mailgate.configfile import ConfigError, load_config


def write(tmp_path: Path, servers: str) -> Path:
    for name in ("refresh", "client"):
        path = tmp_path / name
        if not path.exists():
            path.write_text(f"{name}-secret\n")
            path.chmod(0o600)
    path = tmp_path / "mailgate.yaml"
    path.write_text("alias_domain: mycompany.com\nservers:\n" + textwrap.indent(textwrap.dedent(servers), "  "))
    return path


GMAIL = """\
- name: gmail
  host: smtp.gmail.com
  username: odoo@mycompany.com
  auth: xoauth2
  oauth: {provider: google, client_id: id.apps.googleusercontent.com, client_secret_file: client,
          refresh_token_file: refresh}
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(p) for p in caught.value.problems]


def test_a_gmail_server_gets_its_scope_and_the_accounts_from_filter(tmp_path):
    server = load_config(write(tmp_path, GMAIL)).config.servers[0]
    assert server.auth == "xoauth2" and server.oauth is not None
    assert server.oauth.scope == "https://mail.google.com/" and server.oauth.tenant == "common"
    assert server.oauth.refresh_token_file == tmp_path / "refresh"
    assert server.from_filter.raw == "odoo@mycompany.com"  # as Odoo forces it for Gmail and Outlook


def test_microsoft_defaults_and_an_explicit_from_filter(tmp_path):
    text = GMAIL.replace("provider: google", "provider: microsoft, tenant: contoso.example").replace(
        "auth: xoauth2", "auth: xoauth2\n  from_filter: mycompany.com")
    server = load_config(write(tmp_path, text)).config.servers[0]
    assert server.oauth.scope == "https://outlook.office.com/SMTP.Send offline_access"
    assert server.oauth.tenant == "contoso.example" and server.from_filter.raw == "mycompany.com"


def test_a_password_server_is_unchanged(tmp_path):
    server = load_config(write(tmp_path, "- {name: p, host: h, username: u@x.example, password_file: client}\n")
                         ).config.servers[0]
    assert server.auth == "password" and server.oauth is None and server.from_filter.raw is None


@pytest.mark.parametrize("text, expected", [
    (GMAIL.replace("provider: google", "provider: custom"), "oauth.token_url: missing"),
    (GMAIL.replace("client_id: id.apps.googleusercontent.com, ", ""), "oauth.client_id: missing"),
    (GMAIL.replace("  auth: xoauth2\n", ""), "oauth: given, but the server logs in with a password"),
    (GMAIL.replace("  username: odoo@mycompany.com\n", ""), "username: missing: XOAUTH2 logs in as"),
    (GMAIL + "  password_file: client\n", "password_file: auth: xoauth2 logs in with a token"),
    (GMAIL + "  security: none\n", "security: an OAuth token must never travel unencrypted"),
    (GMAIL.replace("provider: google", "provider: yahoo"), "expected one of google, microsoft, custom"),
    (GMAIL.replace("refresh_token_file", "refresh_tokn_file"), "did you mean 'refresh_token_file'?"),
    (GMAIL.replace("client_id:", "token_url: ftp://x, client_id:"), "expected an https:// URL"),
])
def test_mistakes_are_reported_on_their_key(tmp_path, text, expected):
    found = problems(write(tmp_path, text))
    assert any(expected in p for p in found), found
    assert all(p.startswith(str(tmp_path / "mailgate.yaml") + ":") for p in found)


def test_the_secret_files_are_checked_like_password_files(tmp_path):
    path = write(tmp_path, GMAIL)
    (tmp_path / "refresh").chmod(0o644)
    (tmp_path / "client").unlink()
    found = problems(path)
    assert any("oauth.refresh_token_file" in p and "readable by everybody" in p for p in found), found
    assert any("oauth.client_secret_file" in p and "no such file" in p for p in found), found
    assert load_config(path, check_files=False).config.servers[0].oauth is not None


def test_check_config_warns_about_the_cyrus_plugins(tmp_path, monkeypatch):
    plugins = tmp_path / "lib"
    monkeypatch.setattr("mailgate.configfile.oauth.SASL_PLUGINS", plugins)
    path = write(tmp_path, GMAIL)
    warnings = [str(w) for w in load_config(path).warnings]
    assert any("no libmailgatexoauth2.so" in w and "install-sasl-xoauth2" in w for w in warnings), warnings
    folder = plugins / "x86_64-linux-gnu" / "sasl2"
    folder.mkdir(parents=True)
    (folder / "libmailgatexoauth2.so").write_bytes(b"")
    (folder / "libkdexoauth2.so").write_bytes(b"")
    warnings = [str(w) for w in load_config(path).warnings]
    assert len(warnings) == 1 and "kdexoauth2" in warnings[0], warnings
