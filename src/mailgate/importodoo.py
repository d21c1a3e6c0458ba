"""`mailgate import-odoo`: turn an Odoo database's mail settings into a mailgate configuration.

An operator moving from Odoo's own outgoing servers to mailgate should not retype what Odoo
already knows: the servers (`ir_mail_server`), the alias domain with its catchall, bounce and
default From (system parameters up to Odoo 16, `mail_alias_domain` from Odoo 17), the business
aliases (`mail_alias`), the loop guard and the mass-mailing server. The database is opened
read-only; the generated YAML names the Odoo source of every value, says which keys keep
mailgate's default, and is checked with mailgate's own loader before it is handed out.
Passwords go only into 0600 files next to it, never into the YAML, a message or a log.
"""

from __future__ import annotations

import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote

from mailgate.configfile import ConfigError, parse_config

_PARAMS = ("mail.catchall.domain", "mail.catchall.alias", "mail.bounce.alias", "mail.default.from",
           "mail.default.from_filter", "mail.catchall.domain.allowed", "mail.gateway.loop.minutes",
           "mail.gateway.loop.threshold", "mass_mailing.outgoing_mail_server", "mass_mailing.mail_server_id")
_TABLES = ("ir_config_parameter", "ir_mail_server", "ir_model", "mail_alias", "mail_alias_domain",
           "mail_gateway_allowed", "res_company", "ir_module_module")
_SERVER_COLUMNS = ("id", "name", "smtp_host", "smtp_port", "smtp_encryption", "smtp_user", "smtp_pass",
                   "from_filter", "sequence", "active")
# Odoo 18 adds *_strict variants (the same modes, with certificate validation).
_SECURITY = {"none": "none", "starttls": "starttls", "starttls_strict": "starttls", "ssl": "tls", "ssl_strict": "tls"}
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}
SUBMISSION_PORT, MASS_PORT = 10025, 10026


class ImportFailed(Exception):
    """The import cannot go on; the message is one line, safe to show (no password)."""


@dataclass(frozen=True)
class ImportResult:
    yaml_text: str
    odoo_changes: str                      # what to change in Odoo once mailgate runs
    secret_files: tuple[Path, ...]         # one 0600 file per server with a password
    layout: str                            # "mail_alias_domain" (Odoo 17+) or "ir_config_parameter"
    warnings: tuple[str, ...] = ()


@dataclass
class _Odoo:
    """What was read, before any mapping: Odoo's values as they are stored."""

    database: str
    version: str | None
    tables: set[str]
    params: dict[str, str]
    domains: list[dict[str, Any]]          # mail_alias_domain rows, main first ([] before 17)
    servers: list[dict[str, Any]]
    aliases: list[dict[str, Any]]
    allowed_senders: list[str] | None      # None: no mail_gateway_allowed table


@dataclass
class _Out:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    secrets: dict[Path, str] = field(default_factory=dict)
    deactivated: set[str] = field(default_factory=set)    # active in Odoo, not usable as imported

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def note(self, text: str, indent: str = "") -> None:
        self.lines.append(f"{indent}# {_oneline(text)}")

    def warn(self, text: str, indent: str = "") -> None:
        self.note(f"WARNING: {text}", indent)
        self.warnings.append(_oneline(text))


# -- public API ------------------------------------------------------------------------

def import_odoo(dsn: str, *, output_dir: Path, secrets_dir: Path | None = None) -> ImportResult:
    """Read the Odoo database at `dsn`; write one password file per server under `secrets_dir`
    (default `output_dir/secrets`) and return the YAML for `output_dir`, with the Odoo-side change.

    The YAML names the password files by absolute path, so it loads wherever it is read from.
    """
    secrets_dir = (secrets_dir or Path(output_dir) / "secrets").absolute()
    odoo = _read(dsn)
    out = _Out()
    slugs = _render(odoo, out, secrets_dir)
    text = "\n".join(out.lines) + "\n"
    _write_secrets(secrets_dir, out.secrets)
    try:
        parse_config(text, "<import-odoo>", check_files=True, base=Path(output_dir).absolute())
    except ConfigError as exc:
        raise ImportFailed(f"the generated configuration does not load (a bug): {_oneline(str(exc))}") from None
    layout = "mail_alias_domain" if "mail_alias_domain" in odoo.tables else "ir_config_parameter"
    changes = _odoo_changes(odoo, slugs, out.deactivated)
    return ImportResult(text, changes, tuple(sorted(out.secrets)), layout, tuple(out.warnings))


def main_import(dsn: str, output: Path | None, secrets_dir: Path | None = None, *, force: bool = False,
                stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The CLI: YAML to `output` (or stdout), the Odoo-side change to stderr; 0, or 1 with one line."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        if output is not None and output.exists() and not force:
            raise ImportFailed(f"{output} exists; not overwriting it (move it away first)")
        output_dir = output.absolute().parent if output is not None else Path.cwd()
        result = import_odoo(dsn, output_dir=output_dir, secrets_dir=secrets_dir)
        if output is None:
            stdout.write(result.yaml_text)
        else:
            _write_text(output, result.yaml_text, 0o644)
    except ImportFailed as exc:
        print(f"mailgate import-odoo: error: {exc}", file=stderr)
        return 1
    except OSError as exc:
        print(f"mailgate import-odoo: error: {exc.filename or ''}: {exc.strerror or exc}", file=stderr)
        return 1
    for warning in result.warnings:
        print(f"mailgate import-odoo: warning: {warning}", file=stderr)
    where = f"wrote {output}" if output is not None else "configuration written to stdout"
    secrets_note = f"; {len(result.secret_files)} password file(s) (0600) in {result.secret_files[0].parent}" \
        if result.secret_files else ""
    print(f"mailgate import-odoo: {where}{secrets_note}; check it with: mailgate check-config", file=stderr)
    print(result.odoo_changes, file=stderr)
    return 0


# -- reading ---------------------------------------------------------------------------

def _read(dsn: str) -> _Odoo:
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


def _read_odoo(conn: Any) -> _Odoo:
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
    auth = ", smtp_authentication" if "smtp_authentication" in columns["ir_mail_server"] else ""
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
    return _Odoo(database, version, set(columns), params, domains, servers, aliases, allowed)


# -- rendering -------------------------------------------------------------------------

def _render(odoo: _Odoo, out: _Out, secrets_dir: Path) -> dict[int, str]:
    """Append the YAML to `out`; return the mailgate name given to each ir_mail_server id."""
    version = f"Odoo {odoo.version}" if odoo.version else "Odoo"
    layout = ("Odoo 17+ layout: mail_alias_domain" if "mail_alias_domain" in odoo.tables
              else "Odoo 16 and older layout: ir_config_parameter")
    out.note(f"mailgate configuration imported from the Odoo database {odoo.database!r} ({version}, {layout})")
    out.note("by `mailgate import-odoo`. [brackets] name where each value came from in Odoo. Keys that are")
    out.note("not here keep mailgate's defaults (see mailgate.example.yaml). Check: mailgate check-config")
    out.add()
    main = _alias_settings(odoo, out)
    _render_allowed(odoo, out)
    _render_aliases(odoo, out, main)
    _render_loop(odoo, out)
    slugs = _render_servers(odoo, out, secrets_dir)
    _render_mass(odoo, out, slugs)
    return slugs


def _alias_settings(odoo: _Odoo, out: _Out) -> dict[str, Any]:
    """alias_domain, default_from, catchall and bounce aliases; returns the main domain's values."""
    if "mail_alias_domain" in odoo.tables:
        main = dict(odoo.domains[0]) if odoo.domains else {}
        label = f"mail_alias_domain {main['name']!r}" if main else "mail_alias_domain (no row)"
        source = {k: f"{label}.{k}" for k in ("catchall_alias", "bounce_alias", "default_from")}
        source["name"] = f"{label} (sequence {main['sequence']}, the first by sequence)" if main else label
        if main.get("companies"):
            source["name"] += f", used by {main['companies']}"
    else:
        main = {"name": odoo.params.get("mail.catchall.domain"), "catchall_alias": odoo.params.get("mail.catchall.alias"),
                "bounce_alias": odoo.params.get("mail.bounce.alias"), "default_from": odoo.params.get("mail.default.from")}
        source = {"name": "mail.catchall.domain", "catchall_alias": "mail.catchall.alias",
                  "bounce_alias": "mail.bounce.alias", "default_from": "mail.default.from"}
    for odoo_key, key, default in (("name", "alias_domain", "unset"), ("default_from", "default_from", "notifications"),
                                   ("catchall_alias", "catchall_alias", "catchall"),
                                   ("bounce_alias", "bounce_alias", "bounce")):
        value = (main.get(odoo_key) or "").strip()
        if key != "default_from":
            value = value.lower()
        main[odoo_key] = _emit_scalar(out, key, value, f"[{source[odoo_key]}]", default) or None
    for other in odoo.domains[1:]:
        used = f", used by {other['companies']}" if other.get("companies") else ""
        out.warn(f"[mail_alias_domain {other['name']!r}{used}] another alias domain: its aliases carry it as "
                 f"their domain, but its catchall {other['catchall_alias']!r} and bounce "
                 f"{other['bounce_alias']!r} addresses are not handled (mailgate has one catchall and bounce)")
    out.add()
    return main


def _emit_scalar(out: _Out, key: str, value: str | int, source: str, default: str, section: str = "") -> str | int:
    """`key: value` when mailgate accepts it, else a comment keeping mailgate's default."""
    indent = "  " if section else ""
    if not value:
        out.note(f"{source} not set in Odoo: mailgate's default applies ({key}: {default})", indent)
        return ""
    item = f"{key}: {_scalar(value)}"
    problem = _mailgate_rejects(f"{section}: {{{item}}}\n" if section else item + "\n")
    if problem:
        out.warn(f"{source} {value!r} is not usable ({problem}): mailgate's default applies ({default})", indent)
        return ""
    out.add(f"{indent}{key}: {_scalar(value)}  # {source}")
    return value


def _render_allowed(odoo: _Odoo, out: _Out) -> None:
    raw = odoo.params.get("mail.catchall.domain.allowed", "")
    domains = [d.strip().lower() for d in raw.split(",") if d.strip()]
    good = [d for d in domains if not _mailgate_rejects(f"allowed_alias_domains: [{_scalar(d)}]\n")]
    for bad in sorted(set(domains) - set(good)):
        out.warn(f"[mail.catchall.domain.allowed] {bad!r} is not a domain name: left out")
    if good:
        out.add(f"allowed_alias_domains: [{', '.join(_scalar(d) for d in dict.fromkeys(good))}]  "
                "# [mail.catchall.domain.allowed] (the alias domains are always added)")
    else:
        out.note("[mail.catchall.domain.allowed] not set in Odoo: mailgate's default, the alias domains only")
    out.add()


def _render_aliases(odoo: _Odoo, out: _Out, main: dict[str, Any]) -> None:
    if "mail_alias" not in odoo.tables:
        out.note("[mail_alias] no such table (the mail module is not installed): no business aliases")
        out.add("aliases: {}")
        out.add()
        return
    domains = {d["id"]: d for d in odoo.domains}
    main_id = odoo.domains[0]["id"] if odoo.domains else None
    legacy = "mail_alias_domain" not in odoo.tables
    reserved = {main.get("catchall_alias") or "catchall", main.get("bounce_alias") or "bounce"}
    out.note("[mail_alias] Odoo's aliases with a name; target odoo:<ir_model.model of alias_model_id>")
    if legacy:
        out.note("Odoo 16 has no alias_incoming_local: it matched every alias by the local part of a recipient "
                 "on an allowed domain, which is incoming_local: true (Odoo 17's upgrade sets the same)")
    entries: list[str] = []
    kept: dict[str, str] = {}
    ordered = sorted(odoo.aliases, key=lambda a: (a["domain_id"] not in (None, main_id), a["id"]))
    for alias in ordered:
        name = alias["alias_name"].strip().lower()
        domain = domains.get(alias["domain_id"])
        domain_name = domain["name"].lower() if domain else main.get("name")
        label = f"[mail_alias {alias['id']}] {name}@{domain_name}"
        skip_names = {domain["catchall_alias"], domain["bounce_alias"]} if domain else reserved
        if name in skip_names:
            continue
        if not alias["model"]:
            entries.append(f"  # {_oneline(label)}: no model (alias_model_id): left out")
            continue
        if name in kept:
            problem = f"{_oneline(label)} left out: mailgate holds one alias per name (kept {name}@{kept[name]})"
            entries.append(f"  # WARNING: {problem}")
            out.warnings.append(problem)
            continue
        fields_ = {"target": f"odoo:{alias['model']}"}
        if domain and alias["domain_id"] != main_id:
            fields_["domain"] = domain_name
        if alias["incoming_local"] or (legacy and alias["incoming_local"] is None):
            fields_["incoming_local"] = True
        body = ", ".join(f"{k}: {_scalar(v)}" for k, v in fields_.items())
        context = f"alias_domain: {_scalar(main['name'])}\n" if main.get("name") else ""
        problem = _mailgate_rejects(f"{context}aliases:\n  {_scalar(name)}: {{{body}}}\n")
        if problem:
            entries.append(f"  # WARNING: {_oneline(label)} left out: {_oneline(problem)}")
            out.warnings.append(f"{_oneline(label)} left out: {_oneline(problem)}")
            continue
        kept[name] = domain_name
        entries.append(f"  {_scalar(name)}: {{{body}}}  # {_oneline(label)}")
    out.add("aliases:" if kept else "aliases: {}")
    out.lines.extend(entries)
    out.add()


def _render_loop(odoo: _Odoo, out: _Out) -> None:
    out.add("loop:")
    for key, param, default in (("minutes", "mail.gateway.loop.minutes", 120),
                                ("threshold", "mail.gateway.loop.threshold", 20)):
        raw = odoo.params.get(param, "")
        value = int(raw) if re.fullmatch(r"\d+", raw) else 0
        if raw and not value:
            out.warn(f"[{param}] {raw!r} is not a positive number: mailgate's default applies ({default})", "  ")
        elif not raw:
            out.note(f"[{param}] not set in Odoo: mailgate's default applies ({key}: {default}, as in Odoo)", "  ")
        else:
            _emit_scalar(out, key, value, f"[{param}]", str(default), "loop")
    out.note("action: not an Odoo setting; mailgate's default applies (reject: 550 5.7.1)", "  ")
    if odoo.allowed_senders is None:
        out.note("[mail_gateway_allowed] no such table (before Odoo 16): no allowed senders", "  ")
        out.add()
        return
    senders = [s.strip() for s in odoo.allowed_senders]
    good = [s for s in senders if not _mailgate_rejects(f"loop: {{allowed_senders: [{_scalar(s)}]}}\n")]
    for bad in sorted(set(senders) - set(good)):
        out.warn(f"[mail_gateway_allowed] {bad!r} is not an address: left out", "  ")
    out.add(f"  allowed_senders: [{', '.join(_scalar(s) for s in dict.fromkeys(good))}]  "
            "# [mail_gateway_allowed.email] (Settings > Technical > Gateway Allowed)")
    out.add()


def _render_servers(odoo: _Odoo, out: _Out, secrets_dir: Path) -> dict[int, str]:
    slugs: dict[int, str] = {}
    if not odoo.servers:
        out.note("[ir_mail_server] Odoo has no outgoing mail server: mail takes Postfix's default route")
        out.add("servers: []")
        out.add()
        return slugs
    out.note("[ir_mail_server] in Odoo's order (sequence, then id). Odoo 16/17 did not verify the servers' TLS")
    out.note("certificates; mailgate does (tls_verify: true, its default): set tls_verify: false for one that fails")
    out.add("servers:")
    for server in odoo.servers:
        slugs[server["id"]] = slug = _slug(server["name"], set(slugs.values()))
        _render_server(server, slug, out, secrets_dir)
    default_filter = odoo.params.get("mail.default.from_filter", "")
    out.add()
    if not default_filter:
        out.note("[mail.default.from_filter] not set in Odoo: mailgate's default applies (no filter)")
    elif _mailgate_rejects(f"default_from_filter: {_scalar(default_filter)}\n"):
        out.warn(f"[mail.default.from_filter] {default_filter!r} is not a From filter: mailgate's default applies")
    else:
        out.add(f"default_from_filter: {_scalar(default_filter)}  # [mail.default.from_filter]")
    out.add()
    return slugs


def _render_server(server: dict[str, Any], slug: str, out: _Out, secrets_dir: Path) -> None:
    ind = "    "
    sequence = f", sequence {server['sequence']}" if server["sequence"] is not None else ""
    out.add(f"  # [ir_mail_server {server['id']} {_oneline(server['name'])!r}{sequence}]")
    out.add(f"  - name: {slug}")
    host = (server["smtp_host"] or "").strip()
    out.add(f"{ind}host: {_scalar(host or 'missing.invalid')}  # [smtp_host]")
    if not host:
        out.warn(f"server {slug}: no smtp_host in Odoo; set host by hand", ind)
    if server["smtp_port"]:
        out.add(f"{ind}port: {int(server['smtp_port'])}  # [smtp_port]")
    else:
        out.note("[smtp_port] not set in Odoo: mailgate's default applies (587)", ind)
    security = _SECURITY.get(server["smtp_encryption"] or "")
    if security:
        out.add(f"{ind}security: {security}  # [smtp_encryption {server['smtp_encryption']}]")
    else:
        out.note(f"[smtp_encryption] {server['smtp_encryption']!r}: mailgate's default from the port applies", ind)
    active = bool(server["active"]) and bool(host)
    method = server.get("smtp_authentication") or "login"
    user, password = (server["smtp_user"] or "").strip(), server["smtp_pass"] or ""
    if method != "login":
        out.warn(f"server {slug}: Odoo authenticates it with {method!r} (smtp_authentication), which mailgate "
                 "does not import; it is made inactive until you set its credentials", ind)
        out.deactivated.add(slug)
        active = False
    elif user and password:
        path = secrets_dir / slug
        out.secrets[path] = password
        out.add(f"{ind}username: {_scalar(user)}  # [smtp_user]")
        out.add(f"{ind}password_file: {_scalar(str(path))}  # [smtp_pass], 0600")
    elif user or password:
        out.warn(f"server {slug}: Odoo has {'a username but no password' if user else 'a password but no username'}"
                 "; no login imported", ind)
    from_filter = ", ".join(p.strip() for p in (server["from_filter"] or "").split(",") if p.strip())
    if from_filter and _mailgate_rejects(f"default_from_filter: {_scalar(from_filter)}\n"):
        out.warn(f"server {slug}: from_filter {from_filter!r} is not a list of domains and addresses; the server "
                 "is made inactive (an empty filter would let it send for anybody)", ind)
        out.add(f"{ind}from_filter: null  # [from_filter] unusable, see above")
        out.deactivated.add(slug)
        active = False
    else:
        out.add(f"{ind}from_filter: {_scalar(from_filter) if from_filter else 'null'}  # [from_filter]")
    if server["sequence"] is not None:
        out.add(f"{ind}priority: {int(server['sequence'])}  # [sequence]")
    else:
        out.note("[sequence] not set in Odoo: mailgate's default applies (priority: 10)", ind)
    out.add(f"{ind}active: {_scalar(active)}  # [active {_scalar(bool(server['active']))}]")


def _mass_server(odoo: _Odoo, slugs: dict[int, str]) -> tuple[str | None, str]:
    """The mailgate name of Email Marketing's dedicated server, and the raw setting."""
    dedicated = odoo.params.get("mass_mailing.outgoing_mail_server", "").lower() in ("true", "1")
    raw_id = odoo.params.get("mass_mailing.mail_server_id", "") if dedicated else ""
    return (slugs.get(int(raw_id)) if raw_id.isdigit() else None), raw_id


def _render_mass(odoo: _Odoo, out: _Out, slugs: dict[int, str]) -> None:
    slug, raw_id = _mass_server(odoo, slugs)
    if not raw_id:
        out.note("[mass_mailing.outgoing_mail_server / mass_mailing.mail_server_id] no dedicated mass-mailing "
                 "server in Odoo: mailgate's default applies (mass mail follows the normal server choice)")
        return
    if slug is None:
        out.warn(f"[mass_mailing.mail_server_id] {raw_id!r} names no ir_mail_server: no mass server")
        return
    out.note("[mass_mailing.mail_server_id] Email Marketing's dedicated server. Odoo submits mass mail to the")
    out.note(f"listener 'mass' (127.0.0.1:{MASS_PORT}, see the Odoo-side change), which marks it as mass mail")
    out.add(f"mass_mail: {{server: {slug}, listeners: [mass]}}")


# -- the Odoo-side change --------------------------------------------------------------

def _odoo_changes(odoo: _Odoo, slugs: dict[int, str], deactivated: set[str]) -> str:
    """What the administrator changes in Odoo so that its mail goes through mailgate."""
    handled = [s for s in odoo.servers if s["active"]]
    lines = ["Odoo-side change, once mailgate and Postfix run:",
             "  1. Settings > Technical > Outgoing Mail Servers: create one server for mailgate: SMTP server "
             f"127.0.0.1, port {SUBMISSION_PORT}, Connection Encryption: None, no username or password, "
             "From Filter empty, Priority 1 (the smallest number: Odoo tries it first)."]
    if handled:
        lines.append("  2. Archive the servers now handled by mailgate (their settings are in the YAML):")
        for server in handled:
            slug = slugs[server["id"]]
            port = f":{server['smtp_port']}" if server["smtp_port"] else ""
            later = " (inactive in mailgate until you complete it, see the YAML)" if slug in deactivated else ""
            lines.append(f"       - {_oneline(server['name'])!r} ({server['smtp_host']}{port}) -> mailgate server "
                         f"{slug}{later}")
    else:
        lines.append("  2. No active outgoing server to archive.")
    if odoo.domains:
        default_from = (f"Settings > Technical > Email Domains: clear 'Default From' of "
                        f"{odoo.domains[0]['name']}")
    else:
        default_from = "Settings > Technical > System Parameters: delete mail.default.from"
    lines.append(f"  3. Leave Odoo's default From empty, so that Odoo passes each author's From through and "
                 f"mailgate rewrites it where needed: {default_from}; delete mail.default.from_filter if set.")
    mass, _ = _mass_server(odoo, slugs)
    if mass:
        lines.append(f"  4. Email Marketing settings, Dedicated Server: create a second server 127.0.0.1:{MASS_PORT} "
                     "(no encryption, no login, no From Filter) and choose it there: mailgate sends that mail "
                     f"through its server {mass}.")
    lines.append("  Keep the alias domain, catchall, bounce and business aliases as they are: Odoo still writes "
                 "them into Reply-To and Return-Path, and mailgate checks them at SMTP time.")
    return "\n".join(lines)


# -- helpers ---------------------------------------------------------------------------

def _mailgate_rejects(snippet: str) -> str | None:
    """mailgate's own verdict on a YAML fragment: the first error, or None when it loads."""
    try:
        parse_config(snippet, "<value>", check_files=False)
    except ConfigError as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        return f"{errors[0].key}: {errors[0].message}" if errors else None
    return None


def _scalar(value: Any) -> str:
    """A YAML scalar: plain when unambiguous, else a double-quoted (JSON) string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@+-]*", text) and text.lower() not in _YAML_WORDS
            and not re.fullmatch(r"[0-9._+-]+(e[0-9+-]*)?", text, re.I)):
        return text
    return json.dumps(text, ensure_ascii=False)


def _slug(name: str | None, taken: set[str]) -> str:
    """A mailgate server name (`^[a-z0-9][a-z0-9_-]{0,40}$`) from an Odoo name, unique in `taken`."""
    text = unicodedata.normalize("NFKD", name or "").encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9_-]+", "-", text).strip("-_")[:41].rstrip("-_") or "server"
    candidate, number = text, 2
    while candidate in taken:
        suffix = f"-{number}"
        candidate, number = text[:41 - len(suffix)].rstrip("-_") + suffix, number + 1
    return candidate


def _oneline(text: str) -> str:
    return " ".join(str(text).split())


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
    text = _oneline(message)
    for secret in sorted((c for c in candidates if c), key=len, reverse=True):
        text = text.replace(secret, "***")
    return re.sub(r'"[^"\s]*://[^"\s]*"', '"<the DSN>"', text)


def _write_secrets(directory: Path, secrets: dict[Path, str]) -> None:
    if not secrets:
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, password in secrets.items():
        _write_text(path, password, 0o600)


def _write_text(path: Path, text: str, mode: int) -> None:
    """Write through a temporary file in the same folder, created with `mode`, then rename."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
