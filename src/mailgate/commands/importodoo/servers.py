"""The outgoing servers in the YAML (ir_mail_server; each password is set aside for its own 0600
file, never written into the YAML) and Email Marketing's dedicated server."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from mailgate.commands.importodoo.model import MASS_PORT, Odoo, oneline
from mailgate.commands.importodoo.oauth import OAUTH_METHODS, render_oauth
from mailgate.commands.importodoo.yamlout import Out, mailgate_rejects, scalar

# Odoo 18 adds *_strict variants (the same modes, with certificate validation).
_SECURITY = {"none": "none", "starttls": "starttls", "starttls_strict": "starttls", "ssl": "tls", "ssl_strict": "tls"}


def render_servers(odoo: Odoo, out: Out, secrets_dir: Path) -> dict[int, str]:
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
        _render_server(server, slug, out, secrets_dir, odoo)
    default_filter = odoo.params.get("mail.default.from_filter", "")
    out.add()
    if not default_filter:
        out.note("[mail.default.from_filter] not set in Odoo: mailgate's default applies (no filter)")
    elif mailgate_rejects(f"default_from_filter: {scalar(default_filter)}\n"):
        out.warn(f"[mail.default.from_filter] {default_filter!r} is not a From filter: mailgate's default applies")
    else:
        out.add(f"default_from_filter: {scalar(default_filter)}  # [mail.default.from_filter]")
    out.add()
    return slugs


def _render_server(server: dict[str, Any], slug: str, out: Out, secrets_dir: Path, odoo: Odoo) -> None:
    ind = "    "
    sequence = f", sequence {server['sequence']}" if server["sequence"] is not None else ""
    out.add(f"  # [ir_mail_server {server['id']} {oneline(server['name'])!r}{sequence}]")
    out.add(f"  - name: {slug}")
    host = (server["smtp_host"] or "").strip()
    out.add(f"{ind}host: {scalar(host or 'missing.invalid')}  # [smtp_host]")
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
    oauth = method in OAUTH_METHODS
    if oauth:
        active = render_oauth(server, slug, odoo, out, secrets_dir, ind) and active
    elif method != "login":
        out.warn(f"server {slug}: Odoo authenticates it with {method!r} (smtp_authentication), which mailgate "
                 "does not import; it is made inactive until you set its credentials", ind)
        out.deactivated.add(slug)
        active = False
    elif user and password:
        path = secrets_dir / slug
        out.secrets[path] = password
        out.add(f"{ind}username: {scalar(user)}  # [smtp_user]")
        out.add(f"{ind}password_file: {scalar(str(path))}  # [smtp_pass], 0600")
    elif user or password:
        out.warn(f"server {slug}: Odoo has {'a username but no password' if user else 'a password but no username'}"
                 "; no login imported", ind)
    from_filter = ", ".join(p.strip() for p in (server["from_filter"] or "").split(",") if p.strip())
    if from_filter and mailgate_rejects(f"default_from_filter: {scalar(from_filter)}\n"):
        out.warn(f"server {slug}: from_filter {from_filter!r} is not a list of domains and addresses; the server "
                 "is made inactive (an empty filter would let it send for anybody)", ind)
        out.add(f"{ind}from_filter: null  # [from_filter] unusable, see above")
        out.deactivated.add(slug)
        active = False
    elif oauth and not from_filter:
        out.note("[from_filter] empty in Odoo: an OAuth server's default applies (its username, as Odoo forces it)",
                 ind)
    else:
        out.add(f"{ind}from_filter: {scalar(from_filter) if from_filter else 'null'}  # [from_filter]")
    if server["sequence"] is not None:
        out.add(f"{ind}priority: {int(server['sequence'])}  # [sequence]")
    else:
        out.note("[sequence] not set in Odoo: mailgate's default applies (priority: 10)", ind)
    out.add(f"{ind}active: {scalar(active)}  # [active {scalar(bool(server['active']))}]")


def mass_server(odoo: Odoo, slugs: dict[int, str]) -> tuple[str | None, str]:
    """The mailgate name of Email Marketing's dedicated server, and the raw setting."""
    dedicated = odoo.params.get("mass_mailing.outgoing_mail_server", "").lower() in ("true", "1")
    raw_id = odoo.params.get("mass_mailing.mail_server_id", "") if dedicated else ""
    return (slugs.get(int(raw_id)) if raw_id.isdigit() else None), raw_id


def render_mass(odoo: Odoo, out: Out, slugs: dict[int, str]) -> None:
    slug, raw_id = mass_server(odoo, slugs)
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


def _slug(name: str | None, taken: set[str]) -> str:
    """A mailgate server name (`^[a-z0-9][a-z0-9_-]{0,40}$`) from an Odoo name, unique in `taken`."""
    text = unicodedata.normalize("NFKD", name or "").encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9_-]+", "-", text).strip("-_")[:41].rstrip("-_") or "server"
    candidate, number = text, 2
    while candidate in taken:
        suffix = f"-{number}"
        candidate, number = text[:41 - len(suffix)].rstrip("-_") + suffix, number + 1
    return candidate
