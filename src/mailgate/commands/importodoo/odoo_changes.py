"""The Odoo-side change: what the administrator does in Odoo once mailgate runs, told on stderr."""

from __future__ import annotations

from mailgate.commands.importodoo.model import MASS_PORT, SUBMISSION_PORT, Odoo, oneline
from mailgate.commands.importodoo.servers import mass_server

WRITES_DEFAULT_FROM_ITSELF = 19  # the first Odoo series that sends every notification from the default From


def major_version(odoo: Odoo) -> int | None:
    """The series' major number from base's installed version ("18.0.1.3" -> 18), or None."""
    head = (odoo.version or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _default_from_step(odoo: Odoo) -> str:
    """Step 3. Up to 18.0 an empty default From makes Odoo pass each author's From through, for
    mailgate to rewrite where no upstream server may send it. 19.0 writes the default From into
    every notification itself and cannot send one without it: there it stays, and mailgate keeps
    it (it is on the alias domain)."""
    major = major_version(odoo)
    names = ", ".join(str(d["name"]) for d in odoo.domains)
    if major is not None and major >= WRITES_DEFAULT_FROM_ITSELF and odoo.domains:
        return (f"  3. Keep 'Default From' of each domain ({names}; Settings > Technical > Email Domains): "
                f"Odoo {major} sends every notification from it and fails to send one without it; "
                "delete mail.default.from_filter if set.")
    if odoo.domains:
        default_from = f"Settings > Technical > Email Domains: clear 'Default From' of each domain ({names})"
    else:
        default_from = "Settings > Technical > System Parameters: delete mail.default.from"
    return (f"  3. Leave Odoo's default From empty, so that Odoo passes each author's From through and "
            f"mailgate rewrites it where needed: {default_from}; delete mail.default.from_filter if set.")


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
    lines.append(_default_from_step(odoo))
    mass, _ = mass_server(odoo, slugs)
    if mass:
        lines.append(f"  4. Email Marketing settings, Dedicated Server: create a second server 127.0.0.1:{MASS_PORT} "
                     "(no encryption, no login, no From Filter) and choose it there: mailgate sends that mail "
                     f"through its server {mass}.")
    lines.append("  Keep the alias domain, catchall, bounce and business aliases as they are: Odoo still writes "
                 "them into Reply-To and Return-Path, and mailgate checks them at SMTP time.")
    return "\n".join(lines)
