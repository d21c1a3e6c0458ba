"""Odoo's own code as the judge of mailgate's decisions (the differential tests).

For each case (outgoing servers with their from_filter, sequence and active flag; the alias
domain and its default From, or none; an author) Odoo is asked, inside `odoo-bin shell`, what it
would do with its own servers: which server `ir.mail_server._find_mail_server` picks, and which
From header and envelope sender its message preparation writes for that server's session. Each
case runs in a savepoint that is rolled back, and the shell rolls its transaction back at the
end, so the database is left as it was. All cases go through one shell (starting Odoo costs
seconds, a case milliseconds).

Inbound, Odoo's `mail.thread.message_route` is asked for the routes of generated messages
(aliases of every kind, catchall, bounce, foreign domains, replies), after `message_parse`, as
`message_process` calls them, with the aliases, the allowed alias domains and the threads of the
case set up in the same rolled-back transaction. A thread is a record (of `res.partner`, or of
another model, `mail.blacklist`, so that a reply can also be a forward to another model's alias)
holding a message with a given Message-ID; a route to it is answered as `reply:<Message-ID>`,
as mailgate labels a reply.

The scripts below are ours: it only calls Odoo's methods. 19.0 renamed `build_email` and
`_prepare_email_message` to `_build_email__` and `_prepare_email_message__`; both names are tried.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mailgate.lab.odoo import LabOdoo, OdooError

RECIPIENT = "rcpt@customer.example"

_SCRIPT = r'''
import json
from types import SimpleNamespace

cases = json.load(open(CASES_FILE))
Servers = env["ir.mail_server"]
prepare = getattr(Servers, "_prepare_email_message", None) or getattr(Servers, "_prepare_email_message__")
build = getattr(Servers, "build_email", None) or getattr(Servers, "_build_email__")
company = env.company
domain = company.alias_domain_id or env["mail.alias.domain"].create({"name": "placeholder.example"})


def answer(case):
    Servers.with_context(active_test=False).search([]).write({"active": False})
    for server in case["servers"]:
        Servers.create({"name": server["name"], "smtp_host": "localhost", "smtp_encryption": "none",
                        "from_filter": server["from_filter"] or False, "sequence": server["sequence"],
                        "active": server["active"]})
    if case["alias_domain"]:
        domain.write({"name": case["alias_domain"], "bounce_alias": "bounce", "catchall_alias": "catchall",
                      "default_from": case["default_from"] or False})
        company.alias_domain_id = domain
    else:
        company.alias_domain_id = False
    env.invalidate_all()
    chosen, smtp_from = Servers._find_mail_server(case["author"])
    message = build(email_from=case["author"], email_to=[RECIPIENT], subject="case", body="case")
    session = SimpleNamespace(smtp_from=smtp_from,
                              from_filter=chosen.from_filter if chosen else Servers._get_default_from_filter())
    envelope, _, message = prepare(message, session)
    return {"server": chosen.name if chosen else None, "header_from": message["From"], "envelope_from": envelope}

'''


_INBOUND_SCRIPT = r'''
import email
import email.policy
import json

setup = json.load(open(SETUP_FILE))
cases = json.load(open(CASES_FILE))
Thread = env["mail.thread"]
domain = env.company.alias_domain_id or env["mail.alias.domain"].create({"name": setup["alias_domain"]})
domain.write({"name": setup["alias_domain"], "bounce_alias": "bounce", "catchall_alias": "catchall"})
env.company.alias_domain_id = domain
env["mail.alias"].search([("alias_name", "in", [a["name"] for a in setup["aliases"]])]).unlink()
model = env["ir.model"]._get_id("res.partner")
for alias in setup["aliases"]:
    env["mail.alias"].create({"alias_name": alias["name"], "alias_model_id": model, "alias_domain_id": domain.id,
                              "alias_contact": "everyone", "alias_incoming_local": alias["incoming_local"]})
env["ir.config_parameter"].set_param("mail.catchall.domain.allowed", setup["allowed"] or False)
threads = {}
for number, thread in enumerate(setup.get("threads", [])):
    partner = thread["model"] == "res.partner"
    record = env[thread["model"]].create({"name": f"Thread {number}"} if partner else {"email": f"t{number}@x.example"})
    env["mail.message"].create({"model": thread["model"], "res_id": record.id, "message_id": thread["message_id"],
                                "message_type": "email", "body": "thread"})
    threads[(thread["model"], record.id)] = thread["message_id"]
env.flush_all()


def answer(raw):
    message = email.message_from_string(raw, policy=email.policy.SMTP)
    parsed = Thread.message_parse(message)
    if parsed.get("is_bounce"):
        return {"routes": ["bounce"]}
    try:
        found = Thread.message_route(message, parsed)
    except ValueError:
        return {"routes": []}
    if not found:
        return {"routes": ["catchall"]}
    labels = []
    for model, thread_id, _values, _user, alias in found:
        if thread_id and (model, thread_id) in threads:
            labels.append("reply:" + threads[(model, thread_id)])
        elif alias:
            labels.append("alias:" + alias.alias_name)
    return {"routes": sorted(labels)}

'''

# Shared by both scripts: `answer` for each case in a savepoint that is always rolled back.
_EACH_IN_SAVEPOINT = r'''

class Undo(Exception):
    pass


results = []
for case in cases:
    try:
        with env.cr.savepoint():
            try:
                results.append(answer(case))
            except Exception as exc:
                results.append({"error": f"{type(exc).__name__}: {exc}"})
            raise Undo()
    except Undo:
        pass
    env.invalidate_all()
env.cr.rollback()
json.dump(results, open(RESULTS_FILE, "w"))
'''


@dataclass(frozen=True)
class ServerCase:
    name: str
    from_filter: str | None
    sequence: int
    active: bool = True


@dataclass(frozen=True)
class OutboundCase:
    servers: tuple[ServerCase, ...]
    alias_domain: str | None
    default_from: str | None
    author: str


def ask_odoo_outbound(odoo: LabOdoo, cases: list[OutboundCase], timeout: float = 600.0) -> list[dict[str, Any]]:
    """Odoo's answer for every case: {"server", "header_from", "envelope_from"}, or {"error"}."""
    return _run_in_shell(odoo, _SCRIPT, [asdict(case) for case in cases], {}, timeout)


def ask_odoo_inbound(odoo: LabOdoo, setup: dict[str, Any], messages: list[str],
                     timeout: float = 600.0) -> list[dict[str, Any]]:
    """Odoo's routes for every message: {"routes": ["bounce"] | ["catchall"] | ["reply:MESSAGE-ID"] |
    ["alias:NAME", ...] | []}.

    `setup` holds `alias_domain`, `aliases` ([{"name", "incoming_local"}], on res.partner),
    `allowed` (mail.catchall.domain.allowed, "" for unset) and `threads` ([{"model", "message_id"}],
    created in that order, so the last is the most recent)."""
    return _run_in_shell(odoo, _INBOUND_SCRIPT, messages, setup, timeout)


def _run_in_shell(odoo: LabOdoo, script: str, cases: list[Any], setup: dict[str, Any],
                  timeout: float) -> list[dict[str, Any]]:
    assert odoo.tree is not None, "start the Odoo first"
    with tempfile.TemporaryDirectory(prefix="mgoracle") as scratch:
        files = {name: Path(scratch) / f"{name}.json" for name in ("cases", "setup", "results")}
        files["cases"].write_text(json.dumps(cases))
        files["setup"].write_text(json.dumps(setup))
        head = "".join(f"{name.upper()}_FILE = {str(path)!r}\n" for name, path in files.items())
        shell = subprocess.run(
            [odoo.python, str(odoo.tree / "odoo-bin"), "shell", "-c", str(odoo.config_path), "-d", odoo.database,
             "--no-http", "--log-level=warn"],
            input=(head + f"RECIPIENT = {RECIPIENT!r}\n" + script + _EACH_IN_SAVEPOINT).encode(), capture_output=True,
            timeout=timeout, cwd=odoo.base)
        if shell.returncode != 0 or not files["results"].exists():
            output = (shell.stdout + shell.stderr).decode(errors="replace")[-3000:]
            raise OdooError(f"odoo-bin shell exited {shell.returncode}\n{output}")
        results: list[dict[str, Any]] = json.loads(files["results"].read_text())
    return results
