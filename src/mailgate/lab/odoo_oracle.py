"""Odoo's own code as the judge of mailgate's outbound decision (the differential tests).

For each case (outgoing servers with their from_filter, sequence and active flag; the alias
domain and its default From, or none; an author) Odoo is asked, inside `odoo-bin shell`, what it
would do with its own servers: which server `ir.mail_server._find_mail_server` picks, and which
From header and envelope sender its message preparation writes for that server's session. Each
case runs in a savepoint that is rolled back, and the shell rolls its transaction back at the
end, so the database is left as it was. All cases go through one shell (starting Odoo costs
seconds, a case milliseconds).

The script below is ours: it only calls Odoo's methods. 19.0 renamed `build_email` and
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


class Undo(Exception):
    pass


def run(case):
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


results = []
for case in cases:
    try:
        with env.cr.savepoint():
            try:
                results.append(run(case))
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
    assert odoo.tree is not None, "start the Odoo first"
    with tempfile.TemporaryDirectory(prefix="mgoracle") as scratch:
        cases_file, results_file = Path(scratch) / "cases.json", Path(scratch) / "results.json"
        cases_file.write_text(json.dumps([asdict(case) for case in cases]))
        script = (f"CASES_FILE = {str(cases_file)!r}\nRESULTS_FILE = {str(results_file)!r}\n"
                  f"RECIPIENT = {RECIPIENT!r}\n" + _SCRIPT)
        shell = subprocess.run(
            [odoo.python, str(odoo.tree / "odoo-bin"), "shell", "-c", str(odoo.config_path), "-d", odoo.database,
             "--no-http", "--log-level=warn"],
            input=script.encode(), capture_output=True, timeout=timeout, cwd=odoo.base)
        if shell.returncode != 0 or not results_file.exists():
            output = (shell.stdout + shell.stderr).decode(errors="replace")[-3000:]
            raise OdooError(f"odoo-bin shell exited {shell.returncode}\n{output}")
        results: list[dict[str, Any]] = json.loads(results_file.read_text())
    return results
