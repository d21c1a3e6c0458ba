"""The Odoo-side change: what the administrator does in Odoo once mailgate runs, told on stderr."""

from __future__ import annotations

from mailgate.commands.importodoo.model import MASS_PORT, SUBMISSION_PORT, Odoo, oneline
from mailgate.commands.importodoo.servers import mass_server


def odoo_changes(odoo: Odoo, slugs: dict[int, str], deactivated: set[str]) -> str:
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
            lines.append(f"       - {oneline(server['name'])!r} ({server['smtp_host']}{port}) -> mailgate server "
                         f"{slug}{later}")
    else:
        lines.append("  2. No active outgoing server to archive.")
    if odoo.domains:
        names = ", ".join(str(d["name"]) for d in odoo.domains)
        default_from = f"Settings > Technical > Email Domains: clear 'Default From' of each domain ({names})"
    else:
        default_from = "Settings > Technical > System Parameters: delete mail.default.from"
    lines.append(f"  3. Leave Odoo's default From empty, so that Odoo passes each author's From through and "
                 f"mailgate rewrites it where needed: {default_from}; delete mail.default.from_filter if set.")
    mass, _ = mass_server(odoo, slugs)
    if mass:
        lines.append(f"  4. Email Marketing settings, Dedicated Server: create a second server 127.0.0.1:{MASS_PORT} "
                     "(no encryption, no login, no From Filter) and choose it there: mailgate sends that mail "
                     f"through its server {mass}.")
    lines.append("  Keep the alias domain, catchall, bounce and business aliases as they are: Odoo still writes "
                 "them into Reply-To and Return-Path, and mailgate checks them at SMTP time.")
    return "\n".join(lines)
