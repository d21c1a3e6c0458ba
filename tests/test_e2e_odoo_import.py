"""`mailgate import-odoo` against a real Odoo database, then the Odoo-side change it prints.

The Odoo is set up the way an operator's is before mailgate: its own outgoing servers (one that
may send for mycompany.com, with a login, one for partner.example), the alias domain with its
default From, a business alias. The import must write a configuration `check-config` accepts
and that says what Odoo says; the change it prints is then applied the way the README's "Moving
from Odoo's own mail settings" says (`mailgate.lab.odoo.hand_mail_to_gateway`), and Odoo's
settings must be what the printed change describes.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from mailgate.commands.importodoo import SUBMISSION_PORT, import_odoo
from mailgate.configfile import load_config
from mailgate.lab.odoo import GATEWAY_SERVER_NAME, LabOdoo, ensure_alias, hand_mail_to_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.odoo(every_version=True)]

SMTP_PASSWORD = "office-" + uuid.uuid4().hex


def operators_odoo(odoo: LabOdoo) -> None:
    rpc = odoo.rpc()
    domain = {"name": "mycompany.com", "bounce_alias": "bounce", "catchall_alias": "catchall",
              "default_from": "notifications"}
    existing = rpc.call("mail.alias.domain", "search", [("name", "=", "mycompany.com")])
    if existing:
        rpc.call("mail.alias.domain", "write", existing, domain)
    else:
        rpc.call("mail.alias.domain", "create", domain)
    rpc.call("ir.mail_server", "create", {
        "name": "Office", "smtp_host": "smtp.office.example", "smtp_port": 587, "smtp_encryption": "starttls",
        "smtp_user": "odoo@mycompany.com", "smtp_pass": SMTP_PASSWORD, "from_filter": "mycompany.com",
        "sequence": 10})
    rpc.call("ir.mail_server", "create", {
        "name": "Partner relay", "smtp_host": "relay.partner.example", "smtp_port": 25,
        "smtp_encryption": "none", "from_filter": "partner.example", "sequence": 5})
    ensure_alias(rpc, "partners", "res.partner", "mycompany.com")


def test_import_writes_a_configuration_check_config_accepts(odoo, tmp_path):
    operators_odoo(odoo)
    result = import_odoo(odoo.dsn(), output_dir=tmp_path)
    path = tmp_path / "mailgate.yaml"
    # The import leaves the state and socket paths at their defaults under /etc, /var/lib and /run;
    # this machine keeps them in the test's directory instead.
    path.write_text(result.yaml_text + f"database: {tmp_path}/state/mailgate.sqlite3\nsecret_file: {tmp_path}/secret\n"
                    f"listen: {{milter: 'unix:{tmp_path}/milter.sock', lookup: 'unix:{tmp_path}/lookup.sock', "
                    f"policy: 'unix:{tmp_path}/policy.sock'}}\n")
    checked = subprocess.run([sys.executable, "-m", "mailgate", "check-config", "--config", str(path)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = load_config(path).config
    [main] = config.alias_domains
    assert (main.name, main.default_from, main.bounce_alias, main.catchall_alias) == (
        "mycompany.com", "notifications", "bounce", "catchall")
    domains = {domain for server in config.servers if server.active for domain in server.from_filter.domains}
    assert {"mycompany.com", "partner.example"} <= domains
    assert any(a.name == "partners" and a.target == "odoo:res.partner" for a in config.aliases)
    assert SMTP_PASSWORD not in result.yaml_text and SMTP_PASSWORD not in result.odoo_changes
    assert f"port {SUBMISSION_PORT}" in result.odoo_changes and "From Filter empty" in result.odoo_changes

    rpc = odoo.rpc()
    hand_mail_to_gateway(rpc, odoo.source.major, host="127.0.0.1", port=SUBMISSION_PORT,
                         alias_domain="mycompany.com")
    [server] = rpc.call("ir.mail_server", "search_read", [("active", "=", True)],
                        fields=["name", "smtp_host", "smtp_port", "smtp_encryption", "from_filter"])
    assert server == {"id": server["id"], "name": GATEWAY_SERVER_NAME, "smtp_host": "127.0.0.1",
                      "smtp_port": SUBMISSION_PORT, "smtp_encryption": "none", "from_filter": False}
    [domain] = rpc.call("mail.alias.domain", "search_read", [("name", "=", "mycompany.com")],
                        fields=["default_from"])
    if odoo.source.major >= 19:
        assert "Keep 'Default From' of each domain (mycompany.com" in result.odoo_changes
        assert domain["default_from"] == "notifications"
    else:
        assert "clear 'Default From' of each domain (mycompany.com)" in result.odoo_changes
        assert not domain["default_from"]
