"""`mailgate stats`: the tables, the JSON, and Prometheus' text exposition format.

The exposition output is checked with a small parser written from the format's description
(https://prometheus.io/docs/instrumenting/exposition_formats/), strict about what Prometheus
rejects: HELP/TYPE before a family's samples, one TYPE per family, metric and label names,
label value escapes, numeric values.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from mailgate.commands.deliverystats import main_stats, prometheus_text, render_stats, summary
from mailgate.configfile import parse_config
from mailgate.rules.reason_vocabulary import is_hard
from mailgate.store import BounceRecord, DeliveryRecord, OutboundRecord
from mailgate.store.interface import ReputationAlert
from mailgate.store.sqlite import SQLiteStore

CONFIG = parse_config("alias_domain: mycompany.com\n", check_files=False).config
DAY1 = datetime(2026, 11, 1, 12, tzinfo=UTC).timestamp()
DAY2 = DAY1 + 86400
NOW = DAY2 + 3600

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)(?: (-?\d+))?")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_exposition(text: str) -> dict[str, dict]:
    """{family: {"type": ..., "help": ..., "samples": {frozenset(labels): value}}}; AssertionError
    on anything Prometheus would refuse."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# "):
            _, keyword, name, *rest = line.split(" ", 3)
            assert re.fullmatch(_NAME, name), line
            family = families.setdefault(name, {"samples": {}})
            if keyword == "TYPE":
                assert "type" not in family and not family["samples"], f"TYPE after samples or twice: {line}"
                assert rest and rest[0] in ("counter", "gauge", "histogram", "summary", "untyped"), line
                family["type"] = rest[0]
            elif keyword == "HELP":
                assert "help" not in family, line
                family["help"] = rest[0] if rest else ""
            continue
        assert line and not line.startswith("#"), repr(line)
        found = _SAMPLE.fullmatch(line)
        assert found, line
        name, body, value = found.group(1), found.group(2) or "", found.group(3)
        labels, position = {}, 0
        while position < len(body):
            label = _LABEL.match(body, position)
            assert label, f"bad labels in {line}"
            labels[label.group(1)] = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), label.group(2))
            position = label.end()
        assert name in families and "type" in families[name], f"sample before its TYPE: {line}"
        key = frozenset(labels.items())
        assert key not in families[name]["samples"], f"duplicate sample {line}"
        families[name]["samples"][key] = float(value)
    return families


def sample(families, name, **labels) -> float:
    return families[name]["samples"][frozenset(labels.items())]


@pytest.fixture
def store(tmp_path):
    opened = SQLiteStore(tmp_path / "db.sqlite3")
    for when, server, status, count in [(DAY1, "transactional", "sent", 3), (DAY1, "transactional", "bounced", 1),
                                        (DAY2, "transactional", "sent", 2), (DAY2, "mass", "deferred", 2),
                                        (DAY2, None, "sent", 1), (DAY2, 'we"ird\\name\n', "expired", 1)]:
        for n in range(count):
            opened.record_delivery(DeliveryRecord(at=when + n, queue_id=f"Q{when}{n}", recipient=f"r{n}@x.example",
                                                  relay="none", status=status, dsn=None, delay=None, reason=None,
                                                  message=None, server=server))
    for permanent, reason in ((True, "userunknown"), (True, "hostunknown"), (False, "mailboxfull"), (None, None)):
        opened.record_bounce(BounceRecord(created_at=DAY1, recipient="b@x.example", status=None, action="failed",
                                          permanent=permanent, reason=reason, reporting_mta=None, remote_mta=None,
                                          message=None, server=None, source="postfix-log",
                                          hard=is_hard(reason, permanent)))
    opened.blacklist_add("b@x.example", DAY1, "rule", "rule", [])
    opened.blacklist_add("c@x.example", DAY1, "operator", "operator", [])
    opened.blacklist_remove("c@x.example", DAY2, "cleared")
    opened.blacklist_add("d@x.example", DAY2, "operator", "operator", [])
    yield opened
    opened.close()


def test_summary_per_server_and_per_day(store):
    data = summary(store.delivery_stats(0.0))
    transactional = next(r for r in data["per_server"] if r["server"] == "transactional")
    assert (transactional["sent"], transactional["bounced"], transactional["deferred"], transactional["total"]) == \
        (5, 1, 0, 6)
    assert [(r["day"], r["total"]) for r in data["per_day"]] == [("2026-11-01", 4), ("2026-11-02", 6)]


def test_render_stats_is_two_aligned_tables(store):
    text = render_stats(store.delivery_stats(DAY2 - 3600))
    assert text.startswith("# per server\nserver")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("server"))
    assert header.split() == ["server", "sent", "deferred", "bounced", "expired", "total"]
    assert any(line.split()[:3] == ["mass", "0", "2"] for line in lines)
    assert "2026-11-01" not in text and "2026-11-02" in text
    assert render_stats([]).count("(none)") == 3     # no reputation alert either


def test_prometheus_exposition(store):
    families = parse_exposition(prometheus_text(store))
    assert families["mailgate_deliveries_total"]["type"] == "counter"
    assert sample(families, "mailgate_deliveries_total", server="transactional", status="sent") == 5
    assert sample(families, "mailgate_deliveries_total", server="mass", status="deferred") == 2
    assert sample(families, "mailgate_deliveries_total", server="-", status="sent") == 1
    assert sample(families, "mailgate_deliveries_total", server='we"ird\\name\n', status="expired") == 1
    assert families["mailgate_bounces_total"]["type"] == "counter"
    assert [sample(families, "mailgate_bounces_total", kind=k) for k in ("hard", "soft", "unknown")] == [2, 1, 1]
    assert families["mailgate_blacklisted_addresses"]["type"] == "gauge"
    assert sample(families, "mailgate_blacklisted_addresses") == 2
    assert all(f["help"] for f in families.values())


def test_prometheus_on_an_empty_store_still_names_every_family(tmp_path):
    families = parse_exposition(prometheus_text(SQLiteStore(tmp_path / "empty.sqlite3")))
    assert set(families) == {"mailgate_deliveries_total", "mailgate_bounces_total", "mailgate_blacklisted_addresses"}
    assert sample(families, "mailgate_blacklisted_addresses") == 0


@pytest.mark.parametrize("bad", [
    "mailgate_x 1\n",                                        # no TYPE
    "# TYPE mailgate_x counter\nmailgate_x{a=\"1} 1\n",       # unterminated label
    "# TYPE mailgate_x counter\nmailgate_x{a=\"\\q\"} 1\n",   # unknown escape
    "# TYPE mailgate_x counter\nmailgate_x 1\n# TYPE mailgate_x counter\n",
    "# TYPE mailgate_x counter\nmailgate_x one\n",
])
def test_the_checking_parser_refuses_what_prometheus_refuses(bad):
    with pytest.raises((AssertionError, ValueError)):
        parse_exposition(bad)


def test_main_stats(store, capsys):
    config = replace(CONFIG, database=store.path)
    assert main_stats(config, "2026-11-02", as_json=True, prometheus=False, now=NOW) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["day"] for r in data["rows"]} == {"2026-11-02"}
    assert {r["server"] for r in data["per_server"]} == {"transactional", "mass", "-", 'we"ird\\name\n'}
    assert main_stats(config, "7d", as_json=False, prometheus=False, now=NOW) == 0
    assert "# per day" in capsys.readouterr().out
    assert main_stats(config, None, as_json=False, prometheus=True, now=NOW) == 0
    parse_exposition(capsys.readouterr().out)
    assert main_stats(config, "a week", as_json=False, prometheus=False, now=NOW) == 2
    assert "--since" in capsys.readouterr().err


def test_per_domain_is_the_domain_each_message_left_with(tmp_path):
    """A company's mail is told apart by the alias domain it leaves with (its bounce address):
    each delivery attempt counts for the domain of its message's envelope sender."""
    two = SQLiteStore(tmp_path / "two.sqlite3")
    for queue_id, envelope in (("QA", "bounce+T1@MyCompany.com"), ("QB", "rebonds+T2@brand.example")):
        two.record_outbound(OutboundRecord(
            queue_id=queue_id, message_id=None, envelope_from_original="bounce@x", envelope_from=envelope,
            header_from_before=None, header_from_after=None, server="s", mass=False, listener=None,
            sasl_user=None, created_at=DAY1, tokenised=True))
    for n, (queue_id, status) in enumerate([("QA", "sent"), ("QA", "sent"), ("QB", "bounced"), ("QZ", "sent")]):
        two.record_delivery(DeliveryRecord(at=DAY1 + n, queue_id=queue_id, recipient=f"r{n}@x.example", relay="none",
                                           status=status, dsn=None, delay=None, reason=None, message=None, server="s"))
    rows = two.delivery_stats(0.0)
    two.close()
    per_domain = {r["domain"]: (r["sent"], r["bounced"]) for r in summary(rows)["per_domain"]}
    assert per_domain == {"mycompany.com": (2, 0), "brand.example": (0, 1), "-": (1, 0)}
    assert "# per domain\ndomain" in render_stats(rows)


def test_stats_shows_the_reputation_alerts_of_the_period(store, capsys):
    """docs/rules.md B6: receivers refusing us, per server and domain, in `stats`."""
    store.record_reputation_alert(ReputationAlert(DAY2, "transactional", "big.example", "blocked", 12, DAY2 + 60))
    store.record_reputation_alert(ReputationAlert(DAY1 - 86400, "mass", "old.example", "spamdetected", 10, DAY1))
    config = replace(CONFIG, database=store.path)
    assert main_stats(config, "2026-11-02", as_json=True, prometheus=False, now=NOW) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(a["server"], a["domain"], a["reason"], a["bounces"]) for a in data["reputation"]] == [
        ("transactional", "big.example", "blocked", 12)]
    assert main_stats(config, "2026-11-02", as_json=False, prometheus=False, now=NOW) == 0
    text = capsys.readouterr().out
    assert "# reputation alerts" in text and "big.example" in text and "old.example" not in text
