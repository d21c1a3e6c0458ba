"""`mailgate explain outbound`: the JSON shape of docs/rules.md (the command line contract) and the
human-readable form."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Each test runs `mailgate explain` as a program: the e2e set.
pytestmark = pytest.mark.e2e

CONFIG = """
alias_domain: mycompany.com
servers:
  - {name: transactional, host: smtp.example.net, from_filter: mycompany.com, priority: 10}
  - {name: mass, host: mass.example.net, port: 465, priority: 20}
mass_mail: {server: mass}
"""


def explain(tmp_path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "m.yaml"
    path.write_text(CONFIG)
    return subprocess.run([sys.executable, "-m", "mailgate", "explain", "outbound", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, expected", [
    (["--from", '"Admin" <admin@example.com>'],
     {"server": "transactional", "header_from": '"Admin" <notifications@mycompany.com>',
      "envelope_from": "bounce@mycompany.com"}),
    (["--from", "jane@mycompany.com", "--sender", "bounce+7-mail@mycompany.com"],
     {"server": "transactional", "header_from": "jane@mycompany.com",
      "envelope_from": "bounce+7-mail@mycompany.com"}),
    (["--from", "News <news@brand.example>", "--mass"],
     {"server": "mass", "header_from": "News <news@brand.example>", "envelope_from": "bounce@mycompany.com"}),
])
def test_json(tmp_path, args, expected):
    result = explain(tmp_path, *args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"server", "header_from", "envelope_from", "alias_domain", "domain_reason", "reasons"}
    assert data["alias_domain"] == "mycompany.com"
    assert {k: data[k] for k in expected} == expected
    assert data["reasons"] and all(isinstance(r, str) for r in data["reasons"])


def test_human_readable(tmp_path):
    result = explain(tmp_path, "--from", '"Admin" <admin@example.com>')
    assert result.returncode == 0
    assert "server:        transactional" in result.stdout and "(rewritten)" in result.stdout
    assert "notification address" in result.stdout
    assert "alias domain:  mycompany.com (the first alias domain" in result.stdout


INBOUND_CONFIG = """
alias_domain: mycompany.com
aliases: {sales: {target: "odoo:crm.lead"}, commercial: {target: "odoo:crm.lead", incoming_local: true}}
database: state.sqlite3
"""


@pytest.mark.parametrize("text, rcpts, routes, action, reply", [
    ("From: c@x.example\nTo: sales@mycompany.com\n\nhi\n", [], ["alias:sales"], "deliver", None),
    ("From: c@x.example\nTo: someone@mycompany.com\nCc: commercial@gmail.com\n\nhi\n", [], [], "reject", "550 5.1.1"),
    ("From: c@x.example\nTo: list@lists.example\n\nhi\n", ["catchall@mycompany.com"], ["catchall"], "deliver", None),
    ("From: MAILER-DAEMON@x.example\nTo: c@mycompany.com\n\nbounce\n", [], ["bounce"], "deliver", None),
])
def test_explain_inbound_json(tmp_path, text, rcpts, routes, action, reply):
    (tmp_path / "m.yaml").write_text(INBOUND_CONFIG)
    (tmp_path / "msg.eml").write_text(text)
    args = [sys.executable, "-m", "mailgate", "explain", "inbound", "--config", str(tmp_path / "m.yaml"),
            "--message", str(tmp_path / "msg.eml"), "--json"]
    for rcpt in rcpts:
        args += ["--rcpt", rcpt]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"routes", "action", "smtp_reply", "reasons"}
    assert data["routes"] == routes and data["action"] == action
    assert (data["smtp_reply"] or "").startswith(reply or "")
    assert not (tmp_path / "state.sqlite3").exists(), "explain must not create the store"
