"""The reply table (mailgate.rules.replies) holds every answer, and every answer agrees with itself.

An SMTP reply's basic code and its enhanced status code must be of the same class (RFC 3463:
a 5xx reply with a 4.x.x status confuses clients and log readers alike); an access(5) action
that carries a code follows the same rule, and one that defers carries a 4.x.x code. Every entry
is used somewhere in the source, so the table never lists an answer nobody gives.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mailgate.rules import replies
from mailgate.rules.replies import EXIT, HEALTH, HOLD_REASONS, LOOKUP, POLICY, POLICY_UNAVAILABLE, SMTP, SmtpReply

SOURCE = Path(replies.__file__).resolve().parents[1]
ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def source_text() -> str:
    return "\n".join(path.read_text() for path in SOURCE.rglob("*.py") if path.name != "replies.py")


@pytest.mark.parametrize("key", sorted(SMTP))
def test_smtp_reply_code_and_enhanced_status_agree(key: str) -> None:
    reply = SMTP[key]
    assert re.fullmatch(r"[245]\d\d", reply.code), reply
    assert ENHANCED.fullmatch(reply.status), reply
    assert reply.code[0] == reply.status[0], f"{key}: {reply}"
    assert reply.code[0] in "45", "a refusal or a deferral, never a success"
    assert reply.permanent == (reply.code[0] == "5")


def test_policy_unavailable_defers() -> None:
    assert POLICY_UNAVAILABLE.code[0] == POLICY_UNAVAILABLE.status[0] == "4"


@pytest.mark.parametrize("key", sorted(POLICY))
def test_policy_action_is_access5_and_codes_agree(key: str) -> None:
    action = POLICY[key]
    word = action.split(" ", 1)[0]
    if word.isdigit():
        code, status = action.split(" ")[:2]
        assert ENHANCED.fullmatch(status) and code[0] == status[0], f"{key}: {action}"
    elif word in ("DEFER_IF_PERMIT", "DEFER", "DEFER_IF_REJECT"):
        status = action.split(" ")[1]
        assert ENHANCED.fullmatch(status) and status[0] == "4", f"{key}: {action}"
    else:
        assert word in ("DUNNO", "OK", "HOLD", "REJECT", "DISCARD"), f"{key}: {action}"


@pytest.mark.parametrize("key", sorted(LOOKUP))
def test_lookup_answers_are_socketmap_statuses(key: str) -> None:
    status = LOOKUP[key].split(" ", 1)[0]
    assert status in ("TEMP", "PERM") or LOOKUP[key] == "unknown map name", LOOKUP[key]


def test_exit_statuses_follow_sysexits() -> None:
    assert EXIT["ok"] == 0 and EXIT["temp_failure"] == 75 and EXIT["data_error"] == 65 and EXIT["config"] == 78
    assert len(set(EXIT.values())) == len(EXIT), "one meaning per status"


@pytest.mark.parametrize(("table_name", "table"), [("SMTP", SMTP), ("POLICY", POLICY), ("LOOKUP", LOOKUP),
                                                   ("HOLD_REASONS", HOLD_REASONS), ("HEALTH", HEALTH),
                                                   ("EXIT", EXIT)])
def test_every_entry_is_used(table_name: str, table: dict) -> None:
    """Each key appears as `TABLE["key"]` in the source (POLICY's and LOOKUP's also through a
    verdict name: the policy and lookup services index them with the rule's verdict)."""
    text = source_text()
    unused = [key for key in table
              if f'{table_name}["{key}"]' not in text and f"{table_name}[\"{key}\"]" not in text
              and not (table_name in ("POLICY", "LOOKUP") and re.search(rf'"{key}"', text))]
    assert not unused, f"{table_name} entries nobody uses: {unused}"


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module that are not docstrings (prose may quote a reply)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_reply_literal_outside_the_table() -> None:
    """An SMTP reply written as a literal in an adapter or a command escapes the table (the lab's
    stand-in servers are not mailgate and keep their own)."""
    pattern = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")
    found = [f"{path.relative_to(SOURCE)}:{line}" for path in SOURCE.rglob("*.py")
             if path.name != "replies.py" and "lab" not in path.parts
             for line, text in _string_literals(path) if pattern.search(text)]
    assert not found, found


def test_replies_are_values() -> None:
    assert str(SmtpReply("451", "4.3.0", "x")) == "451 4.3.0 x"
