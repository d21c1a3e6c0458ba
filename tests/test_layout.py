"""The house as the README describes it: the rules wing is pure, the top-level folders are honest.

A rule module (src/mailgate/rules/) imports only the standard library, the configuration objects,
other rules and the store interface. Checked twice: statically (every `mailgate` import a rule
names is one of those) and for real (each rule module imported alone in a fresh interpreter
leaves no adapter, command, store backend or their libraries in sys.modules).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mailgate.rules

RULES = Path(mailgate.rules.__file__).parent
REPO = Path(__file__).resolve().parents[1]
RULE_MODULES = sorted(f"mailgate.rules.{p.stem}" for p in RULES.glob("*.py") if p.stem != "__init__")
# What a rule may import from the project: the typed configuration (and the socket-spec value it
# carries), other rules, and the store's interface.
ALLOWED = ("mailgate.config", "mailgate.infra.socketspec", "mailgate.rules", "mailgate.store.interface")
# What must never be loaded by importing a rule: adapters, commands, backends and their libraries.
FORBIDDEN = ("mailgate.milter", "mailgate.policy", "mailgate.commands", "mailgate.odoo", "mailgate.lab",
             "mailgate.store.sql", "mailgate.store.sqlite", "mailgate.store.postgres", "mailgate.store.migrate",
             "mailgate.infra.runtime", "mailgate.infra.sockets", "mailgate.configfile", "mailgate.bounceparse",
             "sqlite_utils", "sqlite3", "psycopg", "psycopg_pool", "milter", "Milter", "yaml", "asyncio",
             "prometheus_client", "mailgate.infra.metrics")


def test_there_are_rules() -> None:
    assert {"mailgate.rules.outbound", "mailgate.rules.inbound", "mailgate.rules.loop", "mailgate.rules.bounces",
            "mailgate.rules.quota", "mailgate.rules.retention", "mailgate.rules.classify"} <= set(RULE_MODULES)


@pytest.mark.parametrize("module", RULE_MODULES)
def test_a_rule_names_only_allowed_project_modules(module: str) -> None:
    path = RULES / f"{module.rsplit('.', 1)[1]}.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    ours = [n for n in names if n == "mailgate" or n.startswith("mailgate.")]
    wrong = [n for n in ours if not any(n == a or n.startswith(a + ".") for a in ALLOWED)]
    assert not wrong, f"{module} imports {wrong}"
    third_party = [n for n in names if not n.startswith("mailgate") and n.split(".")[0] not in sys.stdlib_module_names
                   and n != "__future__"]
    assert not third_party, f"{module} imports {third_party}"


@pytest.mark.e2e
@pytest.mark.parametrize("module", RULE_MODULES)
def test_a_rule_imported_alone_loads_no_adapter(module: str) -> None:
    probe = (f"import json, sys; import {module}; "
             f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('mailgate', *{FORBIDDEN!r}))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                       check=True, cwd="/").stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"importing {module} loaded {bad}"


MAP_INTRO = {
    "milter": ("The milter adapter: Postfix's milter protocol (pymilter) in, the rules' decisions out.\n"
               "Its sources are the package `mailgate.milter`, under `src/mailgate/milter/`. This folder holds\n"
               "no Python on purpose: pymilter installs a top-level module named `milter`, and nothing of ours\n"
               "may shadow it (tests/test_packaging.py checks `import milter` is pymilter's).\n\n"
               "Postfix side: `smtpd_milters` and `non_smtpd_milters` point at `listen.milter`, with\n"
               "`milter_default_action = tempfail`; each smtpd service names its role with\n"
               "`-o milter_macro_daemon_name=...` (see `mailgate postfix-config`)."),
    "policy": ("The lookup (socketmap) and policy (SMTP access policy delegation) services, with their wire\n"
               "codecs apart from the servers. Their sources are the package `mailgate.policy`, under\n"
               "`src/mailgate/policy/`; this folder is a map, and `import policy` from the repository root\n"
               "fails on purpose (its `__init__.py` says where to look) instead of giving an empty namespace.\n\n"
               "Postfix side: `sender_dependent_default_transport_maps`, `transport_maps` and each server's\n"
               "`smtp_sasl_password_maps` are `socketmap:` tables on `listen.lookup`; `check_policy_service`\n"
               "points at `listen.policy` (see `mailgate postfix-config`)."),
}


def render_map(folder: str) -> str:
    """The README of a top-level map folder: every module of `mailgate.<folder>` with the first
    sentence of its docstring (`python tests/test_layout.py` rewrites both maps)."""
    package = REPO / "src" / "mailgate" / folder
    lines = [f"# {folder}/", "", MAP_INTRO[folder], "", "Modules (generated from their docstrings by "
             "`python tests/test_layout.py`; a test checks this list):", ""]
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        summary = " ".join(doc.split("\n\n")[0].split())
        lines.append(f"- `{path.relative_to(REPO)}` — {summary}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("folder", ["milter", "policy"])
def test_top_level_folder_maps_every_module_of_its_package(folder: str) -> None:
    """`milter/` and `policy/` at the top are maps, not code (pymilter owns the top-level name
    `milter`): their README lists every module of `mailgate.<folder>`, as generated."""
    readme = (REPO / folder / "README.md").read_text()
    assert readme == render_map(folder), f"{folder}/README.md is out of date: run `python tests/test_layout.py`"
    python = [p.name for p in (REPO / folder).iterdir() if p.suffix == ".py" and p.name != "__init__.py"]
    assert not python, f"{folder}/ holds Python: {python}"


@pytest.mark.e2e
def test_top_level_policy_folder_is_not_an_importable_namespace() -> None:
    """From the repository root, `import policy` must not quietly give an empty namespace package."""
    result = subprocess.run([sys.executable, "-c", "import policy; print(policy.__file__)"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "mailgate.policy" in result.stderr, result.stdout + result.stderr


RULES_DOC = REPO / "docs" / "rules.md"
CITATION = re.compile(r"docs/rules\.md,? ((?:[OIBTRA]\d(?:\.\d)?|Q)(?:(?:-|, | and | to )(?:[OIBTRA]?\d(?:\.\d)?|Q))*)")


def _ids_defined() -> set[str]:
    text = RULES_DOC.read_text()
    return set(re.findall(r"^\*\*([OIBTRA]\d|Q)\b", text, flags=re.M))


def test_every_rule_id_the_code_and_tests_cite_is_in_the_rules_document() -> None:
    defined = _ids_defined()
    assert {"O1", "O7", "I1", "I7", "B1", "B3", "Q", "T1", "R1", "A1", "A3"} <= defined, sorted(defined)
    cited: dict[str, str] = {}
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "tests").glob("*.py")]:
        for found in CITATION.finditer(path.read_text()):
            for rule in re.findall(r"[OIBTRA]\d|Q", found.group(1)):
                cited.setdefault(rule, str(path.relative_to(REPO)))
    missing = {rule: where for rule, where in cited.items() if rule not in defined}
    assert not missing, f"cited but not in docs/rules.md: {missing}"


def test_the_rules_document_stands_alone() -> None:
    """It is the project's own statement of the rules: nothing outside the repository is cited."""
    text = RULES_DOC.read_text()
    for outside in ("../shared", "odoo-rules", "design.md"):
        assert outside not in text, outside


if __name__ == "__main__":
    for name in MAP_INTRO:
        (REPO / name / "README.md").write_text(render_map(name))
