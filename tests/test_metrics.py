"""The metrics module's pieces without a gateway: joining the processes' samples, the lock-free
histogram, the store wrapper's counts, the bounce labels and the health answer."""

from __future__ import annotations

import io
import sqlite3
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from mailgate.commands.checkhealth import check_health
from mailgate.configfile import parse_config
from mailgate.infra.exposition import GatewayCollector, MetricsServer, merged
from mailgate.infra.health import StoreState, health_answer
from mailgate.infra.meteredstore import metered
from mailgate.infra.metrics import STORE_ERRORS, LoopHistogram, bounce_labels, bound, reply_key
from mailgate.infra.socketspec import SocketSpec
from mailgate.rules.replies import EXIT, HEALTH, SMTP
from mailgate.store import sqlite as sqlite_store
from mailgate.store.interface import BounceRecord
from mailgate.store.sqlite import SQLiteStore


def family(name: str, *samples: tuple[dict[str, str], float]) -> Metric:
    metric = Metric(name, "help", "counter")
    for labels, value in samples:
        metric.add_sample(f"{name}_total", labels, value)
    return metric


def test_samples_of_the_same_series_from_several_processes_are_summed_once() -> None:
    serving = [family("mailgate_refusals", ({"reply": "no_such_alias"}, 2.0))]
    milter = [family("mailgate_refusals", ({"reply": "no_such_alias"}, 1.0), ({"reply": "loop_reject"}, 4.0))]
    [joined] = merged([serving, milter])
    assert {(s.labels["reply"], s.value) for s in joined.samples} == {("no_such_alias", 3.0), ("loop_reject", 4.0)}


def test_the_loop_histogram_is_cumulative_and_counts_each_observation() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("mailgate_test_seconds", "test", label="map", registry=registry)
    for seconds in (0.00002, 0.00002, 0.003, 7.0):
        histogram.child("transport").observe(seconds)
    text = generate_latest(registry).decode()
    assert 'mailgate_test_seconds_bucket{le="2.5e-05",map="transport"} 2.0' in text
    assert 'mailgate_test_seconds_bucket{le="0.005",map="transport"} 3.0' in text
    assert 'mailgate_test_seconds_bucket{le="+Inf",map="transport"} 4.0' in text
    assert 'mailgate_test_seconds_count{map="transport"} 4.0' in text


def test_the_metered_store_counts_a_failed_operation_and_a_failed_begin(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "store.sqlite3"
    store = metered(SQLiteStore(path))
    errors, begins = bound(STORE_ERRORS, "check_writable"), bound(STORE_ERRORS, "transaction")
    before, begun = errors._value.get(), begins._value.get()
    store.check_writable()
    with store.transaction():
        store.quota_take("k", "s", 0.0)
    locker = sqlite3.connect(path, isolation_level=None, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError):
            store.check_writable()
        with pytest.raises(sqlite3.OperationalError), store.transaction():
            pass
    finally:
        locker.execute("ROLLBACK")
    with pytest.raises(LookupError), store.transaction():
        raise LookupError("the body's own failure is not the store's")
    assert errors._value.get() == before + 1 and begins._value.get() == begun + 1
    store.close()


def test_bounce_labels_are_bounded() -> None:
    """The reason label is a class of the vocabulary (docs/rules.md B4), never free text; the
    kind is B5's."""
    def record(reason: str | None, permanent: bool | None, hard: bool = False) -> BounceRecord:
        return BounceRecord(created_at=0.0, recipient="a@b.example", status=None, action=None,
                            permanent=permanent, reason=reason, reporting_mta=None, remote_mta=None,
                            message=None, server=None, source="dsn", stale=False, matched=True, hard=hard)
    assert bounce_labels(record("userunknown", True, hard=True)) == ("userunknown", "hard")
    assert bounce_labels(record("blocked", True)) == ("blocked", "soft")
    assert bounce_labels(record("mailboxfull", False)) == ("mailboxfull", "soft")
    assert bounce_labels(record(None, None)) == ("undefined", "unknown")
    assert bounce_labels(record("free text " * 20, True)) == ("undefined", "soft")


def test_reply_keys_come_from_the_table() -> None:
    assert reply_key(SMTP["loop_reject"]) == "loop_reject" and reply_key(None) == "none"


def test_health_names_every_problem() -> None:
    assert health_answer(True, StoreState(True), True, 2.0) == (True, HEALTH["ok"])
    ok, text = health_answer(False, StoreState(False, "OperationalError: locked"), True, 2.0)
    assert not ok and text == (f"milter_down: {HEALTH['milter_down']}; "
                               f"store_unwritable: {HEALTH['store_unwritable']} (OperationalError: locked)")
    ok, text = health_answer(True, StoreState(True, waiting_since=10.0), False, 2.0, now=lambda: 13.0)
    assert not ok and text.startswith("store_slow: ") and "3.0 s" in text and "config_not_loaded" in text


def test_the_listener_answers_metrics_health_and_nothing_else_and_check_health_reads_it() -> None:
    registry = CollectorRegistry()
    LoopHistogram("mailgate_probe_seconds", "probe", registry=registry).child().observe(0.001)
    state = {"healthy": False}
    server = MetricsServer(SocketSpec("inet", host="127.0.0.1", port=0),
                           GatewayCollector(registry, None, lambda: ()),
                           lambda: (state["healthy"], HEALTH["ok"] if state["healthy"] else "milter_down: x"))
    server.start_in_thread()
    try:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert "mailgate_probe_seconds_count 1.0" in answer.read().decode()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{server.url}/other", timeout=5)
        assert missing.value.code == 404
        config = parse_config("alias_domain: mycompany.com\n", check_files=False).config
        config = replace(config, listen=replace(config.listen, metrics=SocketSpec("inet", host="127.0.0.1",
                                                                                  port=server.server_address[1])))
        out = io.StringIO()
        assert check_health(config, out=out) == EXIT["failure"] and out.getvalue() == "milter_down: x\n"
        state["healthy"] = True
        assert check_health(config, out=io.StringIO()) == EXIT["ok"]
    finally:
        server.stop_thread()
    assert check_health(config, timeout=2) == EXIT["unavailable"]
    unset = replace(config, listen=replace(config.listen, metrics=None))
    assert check_health(unset) == EXIT["config"]
