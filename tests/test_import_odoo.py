"""`mailgate import-odoo` against a real PostgreSQL holding Odoo's own tables and columns.

One private PostgreSQL serves the module. Two databases mimic the two layouts the importer must
read: Odoo 16 (alias settings in ir_config_parameter, mail_alias without alias_domain_id and
alias_incoming_local) and Odoo 17 (mail_alias_domain, per-alias domain and local-part flag); a
third has only base tables and odd values, a fourth no Odoo table at all.
Each generated YAML is loaded with mailgate's own loader, files checked, and the typed Config
is compared with what the Odoo rows say.
"""

from __future__ import annotations

import io
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.commands.importodoo import ImportResult, import_odoo, main_import
from mailgate.config import Config
from mailgate.configfile import load_config, parse_config
from mailgate.lab.postfix import make_basedir
from mailgate.lab.postgres import PrivatePostgres

OFFICE_PASSWORD = 's3cr3t: with spaces & "quotes"'
BREVO_PASSWORD = "xsmtpsib-0123456789abcdef"
GMAIL_PASSWORD = "abcd efgh ijkl mnop"

# Odoo's tables, reduced to the columns the importer reads plus a few it must ignore.
COMMON_SCHEMA = """
CREATE TABLE ir_module_module (id serial PRIMARY KEY, name varchar NOT NULL, state varchar, latest_version varchar);
CREATE TABLE ir_model (id serial PRIMARY KEY, model varchar NOT NULL UNIQUE, name jsonb);
CREATE TABLE ir_config_parameter (id serial PRIMARY KEY, key varchar NOT NULL UNIQUE, value text NOT NULL,
    create_uid integer, create_date timestamp, write_uid integer, write_date timestamp);
CREATE TABLE ir_mail_server (id serial PRIMARY KEY, name varchar NOT NULL, from_filter varchar,
    smtp_host varchar, smtp_port integer, smtp_authentication varchar NOT NULL, smtp_user varchar,
    smtp_pass varchar, smtp_encryption varchar NOT NULL, smtp_ssl_certificate bytea,
    smtp_ssl_private_key bytea, smtp_debug boolean, sequence integer, active boolean);
CREATE TABLE mail_gateway_allowed (id serial PRIMARY KEY, email varchar, email_normalized varchar);
INSERT INTO ir_module_module (name, state, latest_version) VALUES ('base', 'installed', '{version}');
INSERT INTO ir_model (model, name) VALUES ('crm.lead', '{{"en_US": "Lead"}}'),
    ('helpdesk.ticket', '{{"en_US": "Ticket"}}'), ('hr.applicant', '{{"en_US": "Applicant"}}'),
    ('project.task', '{{"en_US": "Task"}}');
"""

ODOO16 = COMMON_SCHEMA.format(version="16.0.1.3") + """
CREATE TABLE res_company (id serial PRIMARY KEY, name varchar NOT NULL);
CREATE TABLE mail_alias (id serial PRIMARY KEY, alias_name varchar UNIQUE,
    alias_model_id integer NOT NULL REFERENCES ir_model(id), alias_user_id integer,
    alias_defaults text NOT NULL DEFAULT '{}', alias_force_thread_id integer, alias_parent_model_id integer,
    alias_parent_thread_id integer, alias_contact varchar NOT NULL DEFAULT 'everyone', alias_bounced_content jsonb);
INSERT INTO res_company (name) VALUES ('My Company');
INSERT INTO ir_mail_server (name, smtp_host, smtp_port, smtp_authentication, smtp_user, smtp_pass,
        smtp_encryption, from_filter, sequence, active) VALUES
    ('Office 365 (transactional)', 'smtp.office365.com', 587, 'login', 'odoo@mycompany.com', @OFFICE@,
        'starttls', 'mycompany.com, brand.example', 10, true),
    ('Mass – Brevo', 'smtp-relay.brevo.com', 465, 'login', 'mass@mycompany.com', @BREVO@,
        'ssl', NULL, 20, true),
    ('Old server', 'mail.oldhost.example', 25, 'login', NULL, NULL, 'none', NULL, 5, false);
INSERT INTO ir_config_parameter (key, value) VALUES
    ('web.base.url', 'https://erp.mycompany.com'), ('database.secret', 'not-for-mailgate'),
    ('mail.catchall.domain', 'mycompany.com'), ('mail.catchall.alias', 'catchall'),
    ('mail.bounce.alias', 'bounce'), ('mail.default.from', 'notifications'),
    ('mail.catchall.domain.allowed', 'mycompany.com,Other-Brand.example'),
    ('mail.gateway.loop.minutes', '60'), ('mail.gateway.loop.threshold', '10'),
    ('mass_mailing.outgoing_mail_server', 'True'),
    ('mass_mailing.mail_server_id', (SELECT id::text FROM ir_mail_server WHERE smtp_host LIKE '%brevo%'));
INSERT INTO mail_alias (alias_name, alias_model_id) VALUES
    ('sales', (SELECT id FROM ir_model WHERE model = 'crm.lead')),
    ('support', (SELECT id FROM ir_model WHERE model = 'helpdesk.ticket')),
    ('jobs', (SELECT id FROM ir_model WHERE model = 'hr.applicant')),
    (NULL, (SELECT id FROM ir_model WHERE model = 'project.task')),
    ('', (SELECT id FROM ir_model WHERE model = 'project.task'));
INSERT INTO mail_gateway_allowed (email, email_normalized)
    VALUES ('Monitor@Partner.example', 'monitor@partner.example');
"""

ODOO17 = COMMON_SCHEMA.format(version="17.0.1.3") + """
CREATE TABLE mail_alias_domain (id serial PRIMARY KEY, name varchar NOT NULL, sequence integer,
    bounce_alias varchar NOT NULL, catchall_alias varchar NOT NULL, default_from varchar);
CREATE TABLE res_company (id serial PRIMARY KEY, name varchar NOT NULL,
    alias_domain_id integer REFERENCES mail_alias_domain(id));
CREATE TABLE mail_alias (id serial PRIMARY KEY, alias_name varchar, alias_full_name varchar,
    alias_domain_id integer REFERENCES mail_alias_domain(id), alias_model_id integer NOT NULL REFERENCES ir_model(id),
    alias_defaults text NOT NULL DEFAULT '{}', alias_force_thread_id integer, alias_parent_model_id integer,
    alias_parent_thread_id integer, alias_contact varchar NOT NULL DEFAULT 'everyone',
    alias_incoming_local boolean, alias_bounced_content jsonb, alias_status varchar);
INSERT INTO mail_alias_domain (name, sequence, bounce_alias, catchall_alias, default_from) VALUES
    ('brand.example', 20, 'bounce-brand', 'catchall-brand', 'news@brand.example'),
    ('mycompany.com', 10, 'bounces', 'replies', 'notifications');
INSERT INTO res_company (name, alias_domain_id) VALUES ('My Company', 2), ('Brand Ltd', 1);
INSERT INTO ir_mail_server (name, smtp_host, smtp_port, smtp_authentication, smtp_user, smtp_pass,
        smtp_encryption, from_filter, sequence, active) VALUES
    ('Gmail', 'smtp.gmail.com', 587, 'login', 'odoo@mycompany.com', @GMAIL@, 'starttls',
        'odoo@mycompany.com,mycompany.com', 10, true),
    ('Gmail', 'smtp.gmail.com', 465, 'login', NULL, NULL, 'ssl', 'brand.example', 10, false),
    ('Certificate relay', 'relay.mycompany.com', 465, 'certificate', NULL, NULL, 'ssl', NULL, 30, true);
INSERT INTO ir_config_parameter (key, value) VALUES
    ('mail.catchall.domain', 'stale.example'),
    ('mail.catchall.domain.allowed', 'mycompany.com,partner-portal.example'),
    ('mail.default.from_filter', 'mycompany.com');
INSERT INTO mail_alias (alias_name, alias_domain_id, alias_incoming_local, alias_model_id) VALUES
    ('sales', 2, false, (SELECT id FROM ir_model WHERE model = 'crm.lead')),
    ('support', 2, NULL, (SELECT id FROM ir_model WHERE model = 'helpdesk.ticket')),
    ('jobs', 2, true, (SELECT id FROM ir_model WHERE model = 'hr.applicant')),
    ('sales', 1, false, (SELECT id FROM ir_model WHERE model = 'crm.lead')),
    ('press', 1, false, (SELECT id FROM ir_model WHERE model = 'crm.lead')),
    ('bounces', 2, false, (SELECT id FROM ir_model WHERE model = 'crm.lead')),
    (NULL, 2, false, (SELECT id FROM ir_model WHERE model = 'project.task'));
"""

# Odoo 17 with google_gmail and microsoft_outlook: a Gmail server with Odoo's client set up, an
# Outlook one whose tokens came through Odoo's IAP proxy (no client id or secret).
OAUTH = COMMON_SCHEMA.format(version="17.0.1.3") + """
ALTER TABLE ir_mail_server ADD COLUMN google_gmail_refresh_token varchar,
    ADD COLUMN microsoft_outlook_refresh_token varchar;
INSERT INTO ir_mail_server (name, smtp_host, smtp_port, smtp_authentication, smtp_user, smtp_pass,
        smtp_encryption, from_filter, sequence, active, google_gmail_refresh_token, microsoft_outlook_refresh_token)
    VALUES
    ('Gmail OAuth', 'smtp.gmail.com', 587, 'gmail', 'odoo@mycompany.com', NULL, 'starttls', NULL, 10, true,
        @GMAIL_REFRESH@, NULL),
    ('Outlook', 'smtp.outlook.com', 587, 'outlook', 'odoo@mycompany.com', NULL, 'starttls',
        'odoo@mycompany.com', 20, true, NULL, '0.AXoA-outlook-refresh');
INSERT INTO ir_config_parameter (key, value) VALUES ('mail.catchall.domain', 'mycompany.com'),
    ('google_gmail_client_id', '1234-abc.apps.googleusercontent.com'), ('google_gmail_client_secret', @GMAIL_CLIENT@);
"""
GMAIL_REFRESH, GMAIL_CLIENT = "1//0g-refresh-token", "GOCSPX-client-secret"

# Only the base module: no mail tables, odd values where Odoo stores free text.
BARE = COMMON_SCHEMA.format(version="16.0.1.3") + """
INSERT INTO ir_mail_server (name, smtp_host, smtp_port, smtp_authentication, smtp_user, smtp_pass,
        smtp_encryption, from_filter, sequence, active) VALUES
    ('Relay', 'relay.example.net', NULL, 'login', 'odoo', NULL, 'starttls', 'not a domain!', NULL, true);
INSERT INTO ir_config_parameter (key, value) VALUES
    ('mail.gateway.loop.minutes', 'abc'), ('mail.catchall.domain.allowed', 'good.example, bad domain');
"""


@pytest.fixture(scope="module")
def pg() -> Iterator[PrivatePostgres]:
    base = make_basedir("mgpg")
    server = PrivatePostgres(base)
    try:
        server.start()
        passwords = {"office": OFFICE_PASSWORD, "brevo": BREVO_PASSWORD, "gmail": GMAIL_PASSWORD,
                     "gmail_refresh": GMAIL_REFRESH, "gmail_client": GMAIL_CLIENT}
        for name, schema in (("odoo16", ODOO16), ("odoo17", ODOO17), ("bare", BARE), ("oauth", OAUTH)):
            server.create_database(name)
            server.execute(_bind(schema, passwords), database=name)
        server.create_database("notodoo")
        server.execute("CREATE TABLE customers (id serial, name text)", database="notodoo")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _bind(schema: str, values: dict[str, str]) -> str:
    """Inline the passwords as SQL literals (several statements in one call take no parameters)."""
    for name, value in values.items():
        schema = schema.replace(f"@{name.upper()}@", "'" + value.replace("'", "''") + "'")
    return schema


@pytest.fixture(scope="module")
def imported16(pg: PrivatePostgres, tmp_path_factory) -> tuple[ImportResult, Path]:
    out = tmp_path_factory.mktemp("odoo16")
    return import_odoo(pg.dsn("odoo16"), output_dir=out), out


@pytest.fixture(scope="module")
def imported17(pg: PrivatePostgres, tmp_path_factory) -> tuple[ImportResult, Path]:
    out = tmp_path_factory.mktemp("odoo17")
    return import_odoo(pg.dsn("odoo17"), output_dir=out, secrets_dir=out / "elsewhere"), out


def _load(result: ImportResult, folder: Path) -> Config:
    path = folder / "mailgate.yaml"
    path.write_text(result.yaml_text)
    return load_config(path, check_files=True).config


def _secret(path: Path | None) -> str:
    assert path is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path.read_text()


@pytest.mark.e2e
def test_odoo16_layout(imported16) -> None:
    result, folder = imported16
    assert result.layout == "ir_config_parameter"
    parse_config(result.yaml_text, check_files=True)
    config = _load(result, folder)
    assert config.alias_domain == "mycompany.com"
    main = config.alias_domains[0]
    assert (main.default_from, main.catchall_alias, main.bounce_alias) == ("notifications", "catchall", "bounce")
    assert config.allowed_alias_domains == ("mycompany.com", "other-brand.example")
    assert (config.loop.minutes, config.loop.threshold, config.loop.action) == (60, 10, "reject")
    assert config.loop.allowed_senders == ("monitor@partner.example",)
    assert config.default_from_filter.is_empty


@pytest.mark.e2e
def test_odoo16_servers(imported16) -> None:
    result, folder = imported16
    config = _load(result, folder)
    old, office, brevo = config.servers                      # Odoo's order: sequence, then id
    assert (office.name, office.host, office.port, office.security) == (
        "office-365-transactional", "smtp.office365.com", 587, "starttls")
    assert office.username == "odoo@mycompany.com" and _secret(office.password_file) == OFFICE_PASSWORD
    assert office.from_filter.domains == ("mycompany.com", "brand.example")
    assert (office.priority, office.active) == (10, True)
    assert (brevo.name, brevo.port, brevo.security, brevo.priority) == ("mass-brevo", 465, "tls", 20)
    assert _secret(brevo.password_file) == BREVO_PASSWORD and brevo.from_filter.is_empty
    assert (old.name, old.security, old.active, old.username, old.password_file) == (
        "old-server", "none", False, None, None)
    assert office.password_file.parent == folder / "secrets"
    assert stat.S_IMODE(office.password_file.parent.stat().st_mode) == 0o700
    assert config.mass_mail.server == "mass-brevo" and config.mass_server == brevo
    assert config.mass_mail.listeners == ("mass",)
    assert sorted(result.secret_files) == sorted([office.password_file, brevo.password_file])


@pytest.mark.e2e
def test_odoo16_aliases_match_by_local_part(imported16) -> None:
    """Odoo 16 matched aliases by local part: the import keeps that with incoming_local."""
    config = _load(*imported16)
    aliases = {a.name: a for a in config.aliases}
    assert set(aliases) == {"sales", "support", "jobs"}
    assert aliases["sales"].target == "odoo:crm.lead"
    assert aliases["support"].target == "odoo:helpdesk.ticket"
    assert aliases["jobs"].target == "odoo:hr.applicant"
    assert all(a.domain == "mycompany.com" and a.incoming_local for a in aliases.values())


@pytest.mark.e2e
def test_odoo17_layout(imported17) -> None:
    result, folder = imported17
    assert result.layout == "mail_alias_domain"
    config = _load(result, folder)
    assert config.alias_domain == "mycompany.com"        # first by sequence, not the stale parameter
    main, brand = config.alias_domains                    # every mail_alias_domain row, in sequence order
    assert (main.catchall_alias, main.bounce_alias, main.default_from) == ("replies", "bounces", "notifications")
    assert (brand.name, brand.catchall_alias, brand.bounce_alias, brand.notification_address) == (
        "brand.example", "catchall-brand", "bounce-brand", "news@brand.example")
    assert "used by Brand Ltd" in result.yaml_text and "used by My Company" in result.yaml_text
    assert config.allowed_alias_domains == ("mycompany.com", "brand.example", "partner-portal.example")
    assert (config.loop.minutes, config.loop.threshold, config.loop.allowed_senders) == (120, 20, ())
    assert "[mail.gateway.loop.minutes] not set in Odoo" in result.yaml_text
    assert config.default_from_filter.domains == ("mycompany.com",)
    assert config.mass_mail.server is None and config.mass_server is None


@pytest.mark.e2e
def test_odoo17_servers(imported17) -> None:
    result, folder = imported17
    config = _load(result, folder)
    gmail, gmail2, cert = config.servers
    assert (gmail.name, gmail.port, gmail.security, gmail.active) == ("gmail", 587, "starttls", True)
    assert gmail.from_filter.addresses == ("odoo@mycompany.com",)
    assert gmail.from_filter.domains == ("mycompany.com",)
    assert _secret(gmail.password_file) == GMAIL_PASSWORD
    assert gmail.password_file.parent == folder / "elsewhere"
    assert (gmail2.name, gmail2.port, gmail2.security, gmail2.active) == ("gmail-2", 465, "tls", False)
    assert gmail2.from_filter.domains == ("brand.example",)
    assert (cert.name, cert.active, cert.username) == ("certificate-relay", False, None)
    assert any("certificate" in w for w in result.warnings)


@pytest.mark.e2e
def test_odoo17_aliases(imported17) -> None:
    result, folder = imported17
    loaded = _load(result, folder).aliases
    aliases = {a.name: a for a in loaded if a.domain == "mycompany.com" or a.name == "press"}
    assert sorted(a.address for a in loaded) == ["jobs@mycompany.com", "press@brand.example", "sales@brand.example",
                                                  "sales@mycompany.com", "support@mycompany.com"]
    assert (aliases["sales"].domain, aliases["sales"].incoming_local) == ("mycompany.com", False)
    assert aliases["support"].incoming_local is False
    assert (aliases["jobs"].target, aliases["jobs"].incoming_local) == ("odoo:hr.applicant", True)
    assert (aliases["press"].domain, aliases["press"].target) == ("brand.example", "odoo:crm.lead")
    assert '  sales@brand.example: {target: "odoo:crm.lead"}' in result.yaml_text   # one name, two domains
    assert not any("catchall-brand" in w for w in result.warnings)   # the second domain is whole


@pytest.mark.e2e
def test_yaml_is_commented_and_holds_no_password(imported16, imported17) -> None:
    for result, _ in (imported16, imported17):
        text = result.yaml_text
        for secret in (OFFICE_PASSWORD, BREVO_PASSWORD, GMAIL_PASSWORD, "not-for-mailgate"):
            assert secret not in text and secret not in result.odoo_changes
        assert "[ir_mail_server" in text and "# [smtp_pass], 0600" in text
        assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 10
        assert text.endswith("\n") and "not set in Odoo: mailgate's default applies" in text


@pytest.mark.e2e
def test_odoo_side_change(imported16, imported17) -> None:
    change16, change17 = imported16[0].odoo_changes, imported17[0].odoo_changes
    assert "127.0.0.1, port 10025" in change16 and "Encryption: None" in change16
    assert "'Office 365 (transactional)'" in change16 and "'Mass – Brevo'" in change16
    assert "'Old server'" not in change16                       # already archived in Odoo
    assert "mail.default.from" in change16 and "127.0.0.1:10026" in change16
    assert "Email Domains" in change17 and "mycompany.com" in change17
    assert "10026" not in change17
    assert "'Certificate relay' (relay.mycompany.com:465) -> mailgate server certificate-relay (inactive" in change17


@pytest.mark.e2e
def test_missing_and_odd_values_keep_mailgate_defaults(pg: PrivatePostgres, tmp_path: Path) -> None:
    result = import_odoo(pg.dsn("bare"), output_dir=tmp_path)
    config = _load(result, tmp_path)
    assert config.alias_domain is None and config.aliases == () and config.default_from == "notifications"
    assert config.allowed_alias_domains == ("good.example",)
    assert (config.loop.minutes, config.loop.threshold) == (120, 20)
    (relay,) = config.servers
    assert (relay.port, relay.priority, relay.username, relay.active) == (587, 10, None, False)
    assert relay.from_filter.is_empty and result.secret_files == ()
    text = result.yaml_text
    assert "[mail.catchall.domain] not set in Odoo: mailgate's default applies" in text
    assert "[smtp_port] not set in Odoo" in text and "no such table" in text
    for expected in ("'bad domain'", "'abc'", "a username but no password", "'not a domain!'"):
        assert any(expected in w for w in result.warnings), expected


@pytest.mark.e2e
def test_main_writes_file_and_refuses_to_overwrite(pg: PrivatePostgres, tmp_path: Path) -> None:
    output, err = tmp_path / "etc" / "mailgate.yaml", io.StringIO()
    output.parent.mkdir()
    assert main_import(pg.dsn("odoo16"), output, stdout=io.StringIO(), stderr=err) == 0
    assert (load_config(output).config.servers[1].password_file
            == tmp_path / "etc" / "secrets" / "office-365-transactional")
    assert "Odoo-side change" in err.getvalue() and pg.password not in err.getvalue()
    again = io.StringIO()
    assert main_import(pg.dsn("odoo16"), output, stderr=again) == 1
    assert "exists" in again.getvalue() and len(again.getvalue().splitlines()) == 1


@pytest.mark.e2e
def test_main_to_stdout(pg: PrivatePostgres, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    assert main_import(pg.dsn("odoo17"), None, tmp_path / "s", stdout=out, stderr=err) == 0
    assert out.getvalue().startswith("# mailgate configuration imported")
    assert (tmp_path / "s" / "gmail").read_text() == GMAIL_PASSWORD
    assert GMAIL_PASSWORD not in err.getvalue() and "warning:" in err.getvalue()


@pytest.mark.parametrize("dsn, expected", [
    ("postgresql://odoo:hunter2-secret@127.0.0.1:1/odoo", "cannot connect to odoo@127.0.0.1:1/odoo"),
    ("not a dsn password=hunter2-secret", "cannot connect"),
    ("postgresql://odoo:hunter2-secret@[bad/odoo", "cannot connect"),
])
def test_bad_dsn_is_one_clear_line(dsn: str, expected: str, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main_import(dsn, None, tmp_path / "s", stdout=out, stderr=err) == 1
    message = err.getvalue()
    assert message.startswith("mailgate import-odoo: error: ") and expected in message
    assert len(message.splitlines()) == 1 and "hunter2" not in message and "Traceback" not in message
    assert out.getvalue() == "" and not (tmp_path / "s").exists()


@pytest.mark.e2e
def test_wrong_password_and_missing_database(pg: PrivatePostgres, tmp_path: Path) -> None:
    wrong = pg.dsn("odoo16").replace(pg.password, "wrong-hunter2")
    for dsn, expected in ((wrong, "password authentication failed"), (pg.dsn("nosuchdb"), "does not exist")):
        err = io.StringIO()
        assert main_import(dsn, None, tmp_path / "s", stdout=io.StringIO(), stderr=err) == 1
        assert expected in err.getvalue() and len(err.getvalue().splitlines()) == 1
        assert "hunter2" not in err.getvalue() and pg.password not in err.getvalue()


@pytest.mark.e2e
def test_not_an_odoo_database(pg: PrivatePostgres, tmp_path: Path) -> None:
    err = io.StringIO()
    assert main_import(pg.dsn("notodoo"), None, tmp_path / "s", stdout=io.StringIO(), stderr=err) == 1
    assert "'notodoo' is not an Odoo database (no table ir_config_parameter, ir_mail_server)" in err.getvalue()
    assert len(err.getvalue().splitlines()) == 1


@pytest.mark.e2e
def test_harness_retries_a_taken_port_and_stops_cleanly(monkeypatch) -> None:
    """The harness itself: a port taken between the check and the bind is retried; stop leaves
    no process of the cluster behind."""
    import socket

    import mailgate.lab.postgres as lab_postgres
    from mailgate.lab.ports import free_port

    base = make_basedir("mgpg")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = iter([busy.getsockname()[1], free_port()])
        monkeypatch.setattr(lab_postgres, "free_port", lambda: next(ports))
        server = PrivatePostgres(base)
        try:
            with server:
                assert server.port != busy.getsockname()[1]
                assert server.execute("SELECT current_user") == [("postgres",)]
                assert server.postmaster_pid() in server.processes()
            assert server.processes() == [] and server.postmaster_pid() is None
        finally:
            server.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.e2e
def test_gmail_and_outlook_servers_become_xoauth2_servers(pg: PrivatePostgres, tmp_path: Path) -> None:
    result = import_odoo(pg.dsn("oauth"), output_dir=tmp_path)
    gmail, outlook = _load(result, tmp_path).servers
    assert (gmail.name, gmail.auth, gmail.active) == ("gmail-oauth", "xoauth2", True)
    assert gmail.username == "odoo@mycompany.com"
    assert gmail.oauth.provider == "google" and gmail.oauth.client_id == "1234-abc.apps.googleusercontent.com"
    assert _secret(gmail.oauth.refresh_token_file).strip() == GMAIL_REFRESH
    assert _secret(gmail.oauth.client_secret_file).strip() == GMAIL_CLIENT
    assert gmail.from_filter.addresses == ("odoo@mycompany.com",)  # Odoo's empty filter: the account
    assert GMAIL_REFRESH not in result.yaml_text and GMAIL_CLIENT not in result.yaml_text
    # Outlook through Odoo's IAP proxy: nothing to refresh with; said, and the server kept inactive.
    assert (outlook.name, outlook.auth, outlook.active, outlook.oauth) == ("outlook", "password", False, None)
    iap = next(w for w in result.warnings if "server outlook" in w)
    assert "IAP" in iap and "Microsoft Entra ID" in iap and "mailgate oauth login outlook" in iap
    assert "0.AXoA-outlook-refresh" not in result.yaml_text
    assert "outlook (inactive in mailgate until you complete it" in result.odoo_changes
