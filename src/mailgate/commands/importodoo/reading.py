"""Reading Odoo: a read-only connection, the tables and columns this Odoo version has, then the
rows as they are stored. Connection errors are told without the DSN's password."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from mailgate.commands.importodoo.model import ImportFailed, Odoo, oneline
from mailgate.commands.importodoo.oauth import OAUTH_COLUMNS, OAUTH_PARAMS

_PARAMS = ("mail.catchall.domain", "mail.catchall.alias", "mail.bounce.alias", "mail.default.from",
           "mail.default.from_filter", "mail.catchall.domain.allowed", "mail.gateway.loop.minutes",
           "mail.gateway.loop.threshold", "mass_mailing.outgoing_mail_server", "mass_mailing.mail_server_id",
           *OAUTH_PARAMS)
_TABLES = ("ir_config_parameter", "ir_mail_server", "ir_model", "mail_alias", "mail_alias_domain",
           "mail_gateway_allowed", "res_company", "ir_module_module")
_SERVER_COLUMNS = ("id", "name", "smtp_host", "smtp_port", "smtp_encryption", "smtp_user", "smtp_pass",
                   "from_filter", "sequence", "active")


def read(dsn: str) -> Odoo:
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError:
        raise ImportFailed("the PostgreSQL driver is missing: pip install 'psycopg[binary]'") from None
    try:
        conn = psycopg.connect(dsn, connect_timeout=10, autocommit=True, row_factory=dict_row)
    except psycopg.Error as exc:
        raise ImportFailed(f"cannot connect to {_describe_dsn(dsn)}: {_scrub(str(exc), dsn)}") from None
    with conn:
        try:
            conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            return _read_odoo(conn)
        except psycopg.Error as exc:
            raise ImportFailed(f"reading the Odoo database failed: {_scrub(str(exc), dsn)}") from None


def _read_odoo(conn: Any) -> Odoo:
    database = conn.info.dbname
    rows = conn.execute("SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = ANY(%s)", [list(_TABLES)])
    columns: dict[str, set[str]] = {}
    for row in rows:
        columns.setdefault(row["table_name"], set()).add(row["column_name"])
    missing = [t for t in ("ir_config_parameter", "ir_mail_server") if t not in columns]
    if missing:
        raise ImportFailed(f"database {database!r} is not an Odoo database (no table {', '.join(missing)})")
    lacking = [c for c in _SERVER_COLUMNS if c not in columns["ir_mail_server"]]
    if lacking:
        raise ImportFailed(f"unsupported Odoo version: ir_mail_server has no column {', '.join(lacking)}")
    params = {r["key"]: (r["value"] or "").strip() for r in
              conn.execute("SELECT key, value FROM ir_config_parameter WHERE key = ANY(%s)", [list(_PARAMS)])}
    version = None
    if "ir_module_module" in columns:
        found = conn.execute("SELECT latest_version FROM ir_module_module WHERE name = 'base'").fetchone()
        version = found and found["latest_version"]
    optional = ("smtp_authentication", *OAUTH_COLUMNS)
    auth = "".join(f", {c}" for c in optional if c in columns["ir_mail_server"])
    servers = conn.execute(f"SELECT {', '.join(_SERVER_COLUMNS)}{auth} FROM ir_mail_server "
                           "ORDER BY sequence, id").fetchall()
    domains = []
    if "mail_alias_domain" in columns:
        companies = ("(SELECT string_agg(c.name, ', ' ORDER BY c.id) FROM res_company c "
                     "WHERE c.alias_domain_id = d.id)" if "alias_domain_id" in columns.get("res_company", ())
                     else "NULL")
        domains = conn.execute("SELECT d.id, d.name, d.catchall_alias, d.bounce_alias, d.default_from, "
                               f"d.sequence, {companies} AS companies FROM mail_alias_domain d "
                               "ORDER BY d.sequence, d.id").fetchall()
    aliases = []
    if "mail_alias" in columns and "ir_model" in columns:
        alias_columns = columns["mail_alias"]
        local = "a.alias_incoming_local" if "alias_incoming_local" in alias_columns else "NULL"
        domain = "a.alias_domain_id" if "alias_domain_id" in alias_columns else "NULL"
        aliases = conn.execute(f"SELECT a.id, a.alias_name, m.model, {local} AS incoming_local, "
                               f"{domain} AS domain_id FROM mail_alias a "
                               "LEFT JOIN ir_model m ON m.id = a.alias_model_id "
                               "WHERE a.alias_name IS NOT NULL AND a.alias_name <> '' ORDER BY a.id").fetchall()
    allowed = None
    if "mail_gateway_allowed" in columns:
        email = "COALESCE(email_normalized, email)" if "email_normalized" in columns["mail_gateway_allowed"] \
            else "email"
        allowed = [r["email"] for r in conn.execute(
            f"SELECT {email} AS email FROM mail_gateway_allowed ORDER BY id").fetchall() if r["email"]]
    return Odoo(database, version, set(columns), params, domains, servers, aliases, allowed)


def _describe_dsn(dsn: str) -> str:
    """user@host:port/dbname from a DSN, never its password."""
    try:
        from psycopg.conninfo import conninfo_to_dict
        info = conninfo_to_dict(dsn)
    except Exception:
        return "the database (the DSN could not be read)"
    user = f"{info['user']}@" if info.get("user") else ""
    port = f":{info['port']}" if info.get("port") else ""
    return f"{user}{info.get('host') or 'localhost'}{port}/{info.get('dbname') or '?'}"


def _scrub(message: str, dsn: str) -> str:
    """One line, with any password the DSN holds (raw or URL-encoded) replaced by ***."""
    candidates = set(re.findall(r"://[^/@]*?:([^@/]*)@", dsn))
    candidates |= {m.strip("'") for m in re.findall(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)}
    candidates |= {unquote(c) for c in candidates}
    text = oneline(message)
    for secret in sorted((c for c in candidates if c), key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r'"[^"\s]*://[^"\s]*"', '"<the DSN>"', text)
