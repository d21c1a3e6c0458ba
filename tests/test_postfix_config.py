"""`mailgate postfix-config`: main.cf settings and one transport per server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailgate.commands.postfixconf import render
from mailgate.configfile import parse_config

CONFIG = parse_config("""
alias_domain: mycompany.com
servers:
  - {name: tls, host: smtp.tls.example, port: 465}
  - {name: submission, host: smtp.sub.example, port: 587, username: u@mycompany.com, password_file: /x}
  - {name: alt, host: smtp.alt.example, port: 2525, tls_verify: false}
  - {name: plain, host: relay.lan.example, port: 25, security: none}
mass_mail: {server: alt, listeners: [mass]}
listen: {lookup: "inet:10027@127.0.0.1", milter: unix:/run/mailgate/milter.sock}
""", check_files=False).config


def services(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")) and " = " not in line:
            current = line.split()[0]
            found[current] = []
        elif line.startswith("  -o ") and current:
            found[current].append(line[5:])
    return found


def test_main_settings():
    text = render(CONFIG, "main")
    assert "milter_default_action = tempfail" in text
    assert "smtpd_milters = unix:/run/mailgate/milter.sock" in text
    assert "non_smtpd_milters = unix:/run/mailgate/milter.sock" in text
    assert "sender_dependent_default_transport_maps = socketmap:inet:127.0.0.1:10027:transport" in text
    assert "# master.cf" not in text


def test_one_transport_per_server_with_its_tls_and_sasl():
    found = services(render(CONFIG, "master"))
    assert "smtp_tls_wrappermode=yes" in found["mg-tls"]
    assert "smtp_tls_security_level=secure" in found["mg-tls"]
    assert "smtp_tls_wrappermode=yes" not in found["mg-submission"]
    assert "smtp_tls_security_level=secure" in found["mg-submission"]
    assert "smtp_sasl_auth_enable=yes" in found["mg-submission"]
    assert "smtp_sasl_password_maps=socketmap:inet:127.0.0.1:10027:sasl-submission" in found["mg-submission"]
    assert "smtp_tls_security_level=encrypt" in found["mg-alt"]
    assert "smtp_tls_security_level=none" in found["mg-plain"]
    assert "milter_macro_daemon_name=ORIGINATING" in found["127.0.0.1:10025"]
    assert "milter_macro_daemon_name=mass" in found["127.0.0.1:10026"]
    assert not any("password" in o and "maps" not in o for opts in found.values() for o in opts)


@pytest.mark.e2e
def test_postconf_accepts_the_output(tmp_path):
    """Postfix's own parser reads both parts without complaint."""
    text = render(CONFIG)
    main, master = text.split("# master.cf")
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n" + main.replace("# main.cf", "#"))
    (tmp_path / "master.cf").write_text(master)
    shown = subprocess.run(["postconf", "-c", str(tmp_path), "-n"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "warning" not in shown.stderr, shown.stderr
    assert "milter_default_action = tempfail" in shown.stdout
    masters = subprocess.run(["postconf", "-c", str(tmp_path), "-Mf"], capture_output=True, text=True, timeout=30)
    assert masters.returncode == 0 and "warning" not in masters.stderr, masters.stderr
    assert "mg-submission unix" in masters.stdout


@pytest.mark.e2e
def test_cli(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("alias_domain: mycompany.com\nservers: [{name: a, host: h.example.net}]\n")
    result = subprocess.run([sys.executable, "-m", "mailgate", "postfix-config", "--config", str(path),
                             "--part", "master"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("# master.cf\n")
    assert "mg-a unix - - n - - smtp" in result.stdout


def test_postfix_examples_match_the_command():
    """postfix-examples/ is what `postfix-config` prints for the shipped example config."""
    from importlib import resources
    from pathlib import Path
    example = parse_config(resources.files("mailgate").joinpath("data/mailgate.example.yaml").read_text(),
                           check_files=False).config
    root = Path(__file__).resolve().parent.parent / "postfix-examples"
    for part in ("main", "master"):
        expected = [line for line in render(example, part).splitlines() if line and not line.startswith("#")]
        shown = [line for line in (root / f"{part}.cf").read_text().splitlines() if line and not line.startswith("#")]
        assert shown == expected, part


def test_an_xoauth2_server_gets_the_mechanism_filter_and_the_plugin_note():
    config = parse_config("""
servers:
  - {name: gmail, host: smtp.gmail.com, port: 587, username: odoo@mycompany.com, auth: xoauth2,
     oauth: {provider: google, client_id: id, refresh_token_file: /r}}
  - {name: submission, host: smtp.sub.example, port: 587, username: u@mycompany.com, password_file: /x}
listen: {lookup: "inet:10027@127.0.0.1"}
""", check_files=False).config
    text = render(config, "master")
    found = services(text)
    assert "smtp_sasl_mechanism_filter=xoauth2" in found["mg-gmail"]
    assert "smtp_sasl_password_maps=socketmap:inet:127.0.0.1:10027:sasl-gmail" in found["mg-gmail"]
    assert "smtp_tls_security_level=secure" in found["mg-gmail"]
    assert not any("mechanism_filter" in o for o in found["mg-submission"])
    assert "scripts/install-sasl-xoauth2" in text and "# gmail: XOAUTH2 needs" in text
    assert "install-sasl-xoauth2" not in render(CONFIG, "master")


OUTSIDE_CONFIG = parse_config("""
alias_domains:
  - {name: mycompany.com}
  - {name: shop.mycompany.example}
allowed_alias_domains: [mycompany.com, shop.mycompany.example, other-company.example]
fallback_target: odoo
servers: [{name: a, host: h.example.net}]
""", check_files=False).config

ADDRESSES = [
    "someone@customer.example", "sales@mycompany.com", "SALES@MyCompany.COM", "x@shop.mycompany.example",
    "x@other-company.example", "bounce+abc@mycompany.com", "a@mycompany.com.evil.example", "a@xmycompany.com",
    "a@sub.mycompany.com", "a@b@mycompany.com", "a@mycompany.com@customer.example", "sales@mycompany.com ",
    "ü@mycompany.com", "x@kelvin\u212aompany.example", "user", "*", "@mycompany.com", "a@mycompany_com",
]


def postmap_query(config_dir, table: str, key: str) -> str | None:
    """Postfix's own answer of `table` for `key` (None: not found)."""
    result = subprocess.run(["postmap", "-c", str(config_dir), "-q", key, table], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode in (0, 1), result.stderr
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.mark.e2e
def test_the_outside_domains_table_settles_only_what_the_delivery_map_would_not_find(tmp_path):
    """Postfix answers `:` (no change, as NOTFOUND) only where the `delivery` map answers NOTFOUND,
    and leaves every alias-domain address (any case, any spelling the map accepts) to the map."""
    from mailgate.commands.postfixconf import delivery_maps, outside_domains_table
    from mailgate.rules.delivery import delivery_transport
    (tmp_path / "main.cf").write_text("")
    maps = delivery_maps(OUTSIDE_CONFIG)
    table = outside_domains_table(OUTSIDE_CONFIG.accepted_domain_set)
    assert table is not None and maps == f"{table}, socketmap:unix:/run/mailgate/lookup.sock:delivery"
    expanded = table.replace("$$", "$")  # as Postfix reads it from main.cf
    settled = {address: postmap_query(tmp_path, expanded, address) for address in ADDRESSES}
    for address, answer in settled.items():
        assert answer in (None, ":"), address
        if answer == ":":
            assert delivery_transport(OUTSIDE_CONFIG, address) is None, address
        elif address.isascii():
            assert delivery_transport(OUTSIDE_CONFIG, address) is not None, address
    assert settled["someone@customer.example"] == ":" and settled["sales@mycompany.com"] is None


def test_a_non_ascii_alias_domain_leaves_every_address_to_the_delivery_map():
    from mailgate.commands.postfixconf import delivery_maps
    config = parse_config("alias_domain: bücher.example\nservers: [{name: a, host: h.example.net}]\n",
                          check_files=False).config
    assert delivery_maps(config) == "socketmap:unix:/run/mailgate/lookup.sock:delivery"
