"""Operator commands over a real store file: bounce parse, bounces list/stats, blacklist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.store import BounceRecord
from mailgate.store.sqlite import SQLiteStore

# Each test runs the operator commands as programs: the e2e set.
pytestmark = pytest.mark.e2e

SAMPLES = Path(__file__).resolve().parent / "bounces"
DAY = 86400.0


def run(config: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailgate", *args, "--config", str(config)], input=stdin,
                          capture_output=True, timeout=60)


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "mailgate.yaml"
    path.write_text("alias_domain: mycompany.com\ndatabase: store.sqlite3\n")
    store = SQLiteStore(tmp_path / "store.sqlite3")
    now = 1_900_000_000.0
    with store.transaction():
        for number, (recipient, permanent) in enumerate([("a@gmail.example", True), ("a@gmail.example", True),
                                                         ("b@yahoo.example", False)]):
            store.record_bounce(BounceRecord(now - number * DAY, recipient, "5.1.1" if permanent else "4.2.2",
                                             "failed", permanent, "userunknown" if permanent else "mailboxfull",
                                             "mx.example", None, None, "transactional", "dsn",
                                             diagnostic="no such user", hard=permanent))
    store.close()
    return path


def test_bounce_parse_json_shape(config):
    result = run(config, "bounce", "parse", str(SAMPLES / "postfix-dsn.eml"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"is_bounce", "recipients", "token"} and data["is_bounce"] is True
    assert set(data["recipients"][0]) == {"address", "permanent", "hard", "status", "reason", "diagnostic"}
    assert (data["recipients"][0]["reason"], data["recipients"][0]["hard"]) == ("userunknown", True)
    from_stdin = run(config, "bounce", "parse", "-", stdin=(SAMPLES / "postfix-dsn.eml").read_bytes())
    assert json.loads(from_stdin.stdout) == data


def test_bounces_list_and_stats(config):
    listed = json.loads(run(config, "bounces", "list", "--json").stdout)["bounces"]
    assert [b["recipient"] for b in listed] == ["a@gmail.example", "a@gmail.example", "b@yahoo.example"]
    only = json.loads(run(config, "bounces", "list", "--address", "B@yahoo.example", "--json").stdout)["bounces"]
    assert len(only) == 1 and only[0]["kind"] == "soft"
    stats = json.loads(run(config, "bounces", "stats", "--json").stdout)
    assert {r["kind"]: r["bounces"] for r in stats["per_kind"]} == {"hard": 2, "soft": 1}
    assert stats["per_server"] == [{"server": "transactional", "bounces": 3}]
    assert stats["top_domains"][0] == {"domain": "gmail.example", "bounces": 2}
    assert {(r["reason"], r["bounces"], r["hard"]) for r in stats["per_reason"]} == {
        ("userunknown", 2, 2), ("mailboxfull", 1, 0)}
    assert {b["reason"] for b in listed} == {"userunknown", "mailboxfull"} and listed[0]["diagnostic"] == "no such user"
    table = run(config, "bounces", "stats").stdout.decode()
    assert "# per day" in table and "gmail.example" in table and "# per reason" in table
    assert "userunknown" in run(config, "bounces", "list").stdout.decode()
    bad = run(config, "bounces", "list", "--since", "yesterday")
    assert bad.returncode == 2 and b"--since" in bad.stderr


def test_blacklist_commands(config):
    assert run(config, "blacklist", "add", "x@customer.example", "--reason", "asked").returncode == 0
    again = run(config, "blacklist", "add", "X@customer.example", "--json")
    assert json.loads(again.stdout) == {"address": "x@customer.example", "action": "add", "changed": False}
    listed = json.loads(run(config, "blacklist", "list", "--json").stdout)["blacklist"]
    assert [e["address"] for e in listed] == ["x@customer.example"]
    assert run(config, "blacklist", "remove", "x@customer.example").returncode == 0
    why = run(config, "blacklist", "why", "x@customer.example").stdout.decode()
    assert "not blacklisted" in why and "asked" in why and "removed" in why
    assert run(config, "blacklist", "add", "not-an-address").returncode == 2


def test_blacklist_list_shows_the_bounces_and_reasons_that_put_an_address_there(config):
    """docs/rules.md B3: per address, how many bounces and which reasons."""
    store = SQLiteStore(config.parent / "store.sqlite3")
    ids = [row.id for row in store.bounce_rows(address="a@gmail.example")]
    with store.transaction():
        store.blacklist_add("a@gmail.example", 1_900_000_000.0, "2 hard bounces", "rule", ids)
    store.close()
    [entry] = json.loads(run(config, "blacklist", "list", "--json").stdout)["blacklist"]
    assert (entry["address"], entry["bounces"], entry["reasons"]) == ("a@gmail.example", 2, "userunknown x2")
    assert [c["reason"] for c in entry["causes"]] == ["userunknown", "userunknown"]
    table = run(config, "blacklist", "list").stdout.decode()
    assert table.splitlines()[0].split() == ["address", "since", "source", "bounces", "reasons", "reason"]
    assert "userunknown x2" in table
    why = run(config, "blacklist", "why", "a@gmail.example").stdout.decode()
    assert "userunknown" in why and "no such user" in why
