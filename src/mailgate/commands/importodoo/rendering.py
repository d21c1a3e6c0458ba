"""The YAML as a whole, section by section: the alias domain and its addresses, the allowed alias
domains, the business aliases and the loop guard (the servers are in `servers`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mailgate.commands.importodoo.model import Odoo, oneline
from mailgate.commands.importodoo.servers import render_mass, render_servers
from mailgate.commands.importodoo.yamlout import Out, mailgate_rejects, scalar


def render(odoo: Odoo, out: Out, secrets_dir: Path) -> dict[int, str]:
    """Append the YAML to `out`; return the mailgate name given to each ir_mail_server id."""
    version = f"Odoo {odoo.version}" if odoo.version else "Odoo"
    layout = ("Odoo 17+ layout: mail_alias_domain" if "mail_alias_domain" in odoo.tables
              else "Odoo 16 and older layout: ir_config_parameter")
    out.note(f"mailgate configuration imported from the Odoo database {odoo.database!r} ({version}, {layout})")
    out.note("by `mailgate import-odoo`. [brackets] name where each value came from in Odoo. Keys that are")
    out.note("not here keep mailgate's defaults (see mailgate.example.yaml). Check: mailgate check-config")
    out.add()
    main, context = _alias_settings(odoo, out)
    _render_allowed(odoo, out)
    _render_aliases(odoo, out, main, context)
    _render_loop(odoo, out)
    slugs = render_servers(odoo, out, secrets_dir)
    render_mass(odoo, out, slugs)
    return slugs


def _alias_settings(odoo: Odoo, out: Out) -> tuple[dict[str, Any], str]:
    """The alias domains (Odoo 17+: every mail_alias_domain row; before: the one-domain keys from
    the system parameters); returns the main domain's values, and the YAML of the domains
    written, against which each alias is checked."""
    if "mail_alias_domain" in odoo.tables and odoo.domains:
        return _render_alias_domains(odoo, out)
    if "mail_alias_domain" in odoo.tables:
        main = dict(odoo.domains[0]) if odoo.domains else {}
        label = f"mail_alias_domain {main['name']!r}" if main else "mail_alias_domain (no row)"
        source = {k: f"{label}.{k}" for k in ("catchall_alias", "bounce_alias", "default_from")}
        source["name"] = f"{label} (sequence {main['sequence']}, the first by sequence)" if main else label
        if main.get("companies"):
            source["name"] += f", used by {main['companies']}"
    else:
        main = {"name": odoo.params.get("mail.catchall.domain"),
                "catchall_alias": odoo.params.get("mail.catchall.alias"),
                "bounce_alias": odoo.params.get("mail.bounce.alias"),
                "default_from": odoo.params.get("mail.default.from")}
        source = {"name": "mail.catchall.domain", "catchall_alias": "mail.catchall.alias",
                  "bounce_alias": "mail.bounce.alias", "default_from": "mail.default.from"}
    for odoo_key, key, default in (("name", "alias_domain", "unset"), ("default_from", "default_from", "notifications"),
                                   ("catchall_alias", "catchall_alias", "catchall"),
                                   ("bounce_alias", "bounce_alias", "bounce")):
        value = (main.get(odoo_key) or "").strip()
        if key != "default_from":
            value = value.lower()
        main[odoo_key] = _emit_scalar(out, key, value, f"[{source[odoo_key]}]", default) or None
    out.add()
    return main, f"alias_domain: {scalar(main['name'])}\n" if main.get("name") else ""


def _render_alias_domains(odoo: Odoo, out: Out) -> tuple[dict[str, Any], str]:
    """`alias_domains:`, one entry per mail_alias_domain row in Odoo's order, each value checked
    by the loader; a row whose name mailgate refuses is left out with a warning."""
    out.add("alias_domains:  # [mail_alias_domain] in Odoo's order: sequence, then id")
    written: list[dict[str, Any]] = []
    for row in odoo.domains:
        name = (row.get("name") or "").strip().lower()
        label = f"mail_alias_domain {row['id']}"
        used = f", used by {row['companies']}" if row.get("companies") else ""
        problem = mailgate_rejects(f"alias_domains: [{scalar(name)}]\n") if name else "no name"
        if problem:
            out.warn(f"[{label}] {name!r} is not usable ({oneline(problem)}): left out, with its aliases", "  ")
            continue
        out.add(f"  - name: {scalar(name)}  # [{label}, sequence {row.get('sequence')}]{oneline(used)}")
        entry = {"id": row["id"], "name": name}
        for key, default in (("bounce_alias", "bounce"), ("catchall_alias", "catchall"),
                             ("default_from", "notifications")):
            value = (row.get(key) or "").strip()
            value = value if key == "default_from" else value.lower()
            usable = value and not mailgate_rejects(f"alias_domains:\n  - {{name: {scalar(name)}, "
                                                    f"{key}: {scalar(value)}}}\n")
            if usable:
                out.add(f"    {key}: {scalar(value)}  # [{label}.{key}]")
            elif value:
                out.warn(f"[{label}.{key}] {value!r} is not usable: mailgate's default applies ({default})", "    ")
            entry[key] = value if usable else default
        written.append(entry)
    out.add()
    context = f"alias_domains: [{', '.join(scalar(d['name']) for d in written)}]\n" if written else ""
    return (written[0] if written else {}), context


def _emit_scalar(out: Out, key: str, value: str | int, source: str, default: str, section: str = "") -> str | int:
    """`key: value` when mailgate accepts it, else a comment keeping mailgate's default."""
    indent = "  " if section else ""
    if not value:
        out.note(f"{source} not set in Odoo: mailgate's default applies ({key}: {default})", indent)
        return ""
    item = f"{key}: {scalar(value)}"
    problem = mailgate_rejects(f"{section}: {{{item}}}\n" if section else item + "\n")
    if problem:
        out.warn(f"{source} {value!r} is not usable ({problem}): mailgate's default applies ({default})", indent)
        return ""
    out.add(f"{indent}{key}: {scalar(value)}  # {source}")
    return value


def _render_allowed(odoo: Odoo, out: Out) -> None:
    raw = odoo.params.get("mail.catchall.domain.allowed", "")
    domains = [d.strip().lower() for d in raw.split(",") if d.strip()]
    good = [d for d in domains if not mailgate_rejects(f"allowed_alias_domains: [{scalar(d)}]\n")]
    for bad in sorted(set(domains) - set(good)):
        out.warn(f"[mail.catchall.domain.allowed] {bad!r} is not a domain name: left out")
    if good:
        out.add(f"allowed_alias_domains: [{', '.join(scalar(d) for d in dict.fromkeys(good))}]  "
                "# [mail.catchall.domain.allowed] (the alias domains are always added)")
    else:
        out.note("[mail.catchall.domain.allowed] not set in Odoo: mailgate's default, the alias domains only")
    out.add()


def _render_aliases(odoo: Odoo, out: Out, main: dict[str, Any], context: str) -> None:
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
    kept: dict[str, str | None] = {}
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
            entries.append(f"  # {oneline(label)}: no model (alias_model_id): left out")
            continue
        # a name already given on another domain takes the `name@domain` key
        key = f"{name}@{domain_name}" if name in kept else name
        fields_: dict[str, object] = {"target": f"odoo:{alias['model']}"}
        if domain and alias["domain_id"] != main_id and key == name:
            fields_["domain"] = domain_name
        if alias["incoming_local"] or (legacy and alias["incoming_local"] is None):
            fields_["incoming_local"] = True
        body = ", ".join(f"{k}: {scalar(v)}" for k, v in fields_.items())
        rejection = mailgate_rejects(f"{context}aliases:\n  {scalar(key)}: {{{body}}}\n")
        if rejection:
            entries.append(f"  # WARNING: {oneline(label)} left out: {oneline(rejection)}")
            out.warnings.append(f"{oneline(label)} left out: {oneline(rejection)}")
            continue
        kept[name] = domain_name
        entries.append(f"  {scalar(key)}: {{{body}}}  # {oneline(label)}")
    out.add("aliases:" if kept else "aliases: {}")
    out.lines.extend(entries)
    out.add()


def _render_loop(odoo: Odoo, out: Out) -> None:
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
    good = [s for s in senders if not mailgate_rejects(f"loop: {{allowed_senders: [{scalar(s)}]}}\n")]
    for bad in sorted(set(senders) - set(good)):
        out.warn(f"[mail_gateway_allowed] {bad!r} is not an address: left out", "  ")
    out.add(f"  allowed_senders: [{', '.join(scalar(s) for s in dict.fromkeys(good))}]  "
            "# [mail_gateway_allowed.email] (Settings > Technical > Gateway Allowed)")
    out.add()
