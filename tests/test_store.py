"""The store interface, against both backends: the embedded SQLite file and a real PostgreSQL
started by the tests (private data directory, loopback). The rules never know which one they use.
"""

from __future__ import annotations

import threading
import uuid

import pytest

from mailgate.store import (BounceRecord, DeliveryRecord, InboundRecord, OutboundRecord, SQLiteStore,
                            open_store)

NOW = 1_900_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        backend = SQLiteStore(tmp_path / "store.sqlite3")
    else:
        server = request.getfixturevalue("postgres")
        name = f"t{uuid.uuid4().hex[:12]}"
        server.create_database(name)
        backend = open_store(server.dsn(name))
    yield backend
    backend.close()


def outbound(queue_id: str = "Q1", message_id: str | None = "<m1@x>", server: str | None = "trans",
             tokenised: bool = True) -> OutboundRecord:
    return OutboundRecord(queue_id, message_id, "a@x.example", "bounce@mycompany.com", "a@x.example",
                          '"a" <n@mycompany.com>', server, False, "ORIGINATING", None, NOW, tokenised)


def bounce(recipient: str, days_ago: float = 0, permanent: bool | None = True, **extra) -> BounceRecord:
    fields = dict(created_at=NOW - days_ago * 86400, recipient=recipient, status="5.1.1", action="failed",
                  permanent=permanent, reason="no such user", reporting_mta="mx.example", remote_mta=None,
                  message=None, server="trans", source="dsn")
    fields.update(extra)
    return BounceRecord(**fields)


def test_schema_is_current(store):
    assert store.schema_version == 5


def test_outbound_rows(store):
    row_id = store.record_outbound(outbound())
    assert store.outbound_message(row_id)["queue_id"] == "Q1"
    assert store.outbound_message(row_id)["tokenised"] == 1
    assert store.outbound_by_message_id("<m1@x>")["id"] == row_id
    assert store.outbound_by_queue_id("Q1")["id"] == row_id
    later = store.record_outbound(outbound("Q2", "<m2@x>"))
    assert store.known_outbound(["<none@x>", "<m1@x>", "<m2@x>"]) == "<m2@x>"
    assert store.known_outbound([]) is None and store.outbound_message(later + 100) is None


def test_inbound_counts_and_duplicates(store):
    with store.transaction("inbound:s@x"):
        store.record_inbound(InboundRecord("Q", "<i1@x>", "s@x", "alias:sales", "deliver", NOW), ["odoo:crm.lead"])
        store.record_inbound(InboundRecord("Q", "<i2@x>", "s@x", "alias:sales", "reject", NOW), [])
    assert store.already_received("<i1@x>") and not store.already_received("<i2@x>")
    assert store.recent_count("s@x", "odoo:crm.lead", NOW - 60) == 1
    assert store.recent_count("s@x", "odoo:crm.lead", NOW + 1) == 0


def test_transaction_rolls_back(store):
    with pytest.raises(RuntimeError):
        with store.transaction("inbound:r@x"):
            store.record_inbound(InboundRecord("Q", "<r@x>", "r@x", "alias:sales", "deliver", NOW), ["k"])
            raise RuntimeError("boom")
    assert not store.already_received("<r@x>") and store.recent_count("r@x", "k", 0) == 0


def test_bounces_resets_and_blacklist(store):
    with store.transaction("bounce:a@y"):
        ids = [store.record_bounce(bounce("a@y", d)) for d in (10, 8, 6)]
        store.record_bounce(bounce("a@y", 1, stale=True))
        store.record_bounce(bounce("a@y", 1, matched=False))
    facts = store.countable_bounces("a@y", NOW - 30 * 86400)
    assert [f.id for f in facts] == ids and all(f.permanent for f in facts)
    store.reset_bounces("a@y", NOW - 7 * 86400)
    assert [f.id for f in store.countable_bounces("a@y", 0)] == [ids[2]]
    assert store.blacklist_add("a@y", NOW, "5 hard bounces", "rule", ids)
    assert not store.blacklist_add("a@y", NOW, "again", "rule", ids)
    assert store.blacklisted(["a@y", "b@y"]) == {"a@y"}
    assert not store.blacklist_remove("a@y", NOW, "delivered", source="operator")
    assert store.blacklist_remove("a@y", NOW + 1, "delivered", source="rule")
    assert store.blacklisted(["a@y"]) == set()
    [entry] = store.blacklist_history("a@y")
    assert entry["removed_reason"] == "delivered" and entry["bounce_ids"] == ",".join(map(str, ids))
    assert [r["id"] for r in store.bounce_rows(ids=ids)] == sorted(ids, reverse=True)


def test_bounce_stats(store):
    with store.transaction():
        store.record_bounce(bounce("a@gmail.example", 0))
        store.record_bounce(bounce("b@gmail.example", 0, permanent=False, server="mass"))
        store.record_bounce(bounce("c@yahoo.example", 1, permanent=None))
    stats = store.bounce_stats(0)
    assert {r["kind"]: r["bounces"] for r in stats["per_kind"]} == {"hard": 1, "soft": 1, "unknown": 1}
    assert stats["top_domains"][0] == {"domain": "gmail.example", "bounces": 2}
    assert sum(r["bounces"] for r in stats["per_day"]) == 3 and all(len(r["day"]) == 10 for r in stats["per_day"])


def test_deliveries_and_log_position(store):
    store.record_delivery(DeliveryRecord(NOW, "Q1", "r@x", "mx[1.2.3.4]:25", "sent", "2.0.0", 0.5, "ok", None, "t"))
    store.record_delivery(DeliveryRecord(NOW, "Q1", "s@x", None, "deferred", "4.4.1", 1.0, "later", None, "t"))
    assert {(r["status"], r["count"]) for r in store.delivery_stats(0)} == {("sent", 1), ("deferred", 1)}
    assert store.delivery_totals()[0]["server"] == "t"
    assert store.log_position("/var/log/mail.log") is None
    store.save_log_position("/var/log/mail.log", 42, 1000, NOW)
    store.save_log_position("/var/log/mail.log", 42, 2000, NOW)
    assert store.log_position("/var/log/mail.log") == (42, 2000)


def test_quota(store):
    with store.transaction("quota:domain:x:transactional"):
        for _ in range(3):
            store.quota_take("domain:x", "transactional", NOW)
    assert store.quota_count("domain:x", "transactional", NOW - 10) == 3
    assert store.quota_count("domain:x", "mass", NOW - 10) == 0
    assert store.purge_quota(NOW + 60) == 3 and store.quota_count("domain:x", "transactional", 0) == 0


def test_counting_is_exact_under_concurrency(store):
    """Eight threads check-and-take one quota of 20: exactly 20 are taken, never 21."""
    taken: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(10):
            with store.transaction("quota:gateway:transactional"):
                allowed = store.quota_count("gateway", "transactional", 0) < 20
                if allowed:
                    store.quota_take("gateway", "transactional", NOW)
            with lock:
                taken.append(allowed)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert taken.count(True) == 20 and store.quota_count("gateway", "transactional", 0) == 20


def test_migrate_store_copies_everything(tmp_path, postgres):
    import subprocess
    import sys
    source = SQLiteStore(tmp_path / "old.sqlite3")
    row = source.record_outbound(outbound())
    with source.transaction():
        ids = [source.record_bounce(bounce("m@y", d, message=row)) for d in (9, 5, 1)]
        source.blacklist_add("m@y", NOW, "rule", "rule", ids)
        source.record_inbound(InboundRecord("Q", "<in@x>", "s@x", "alias:sales", "deliver", NOW), ["odoo:crm.lead"])
        source.quota_take("gateway", "transactional", NOW)
    source.close()
    name = f"m{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    command = [sys.executable, "-m", "mailgate", "migrate-store", "--from", str(tmp_path / "old.sqlite3"),
               "--to", postgres.dsn(name)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bounces: 3 row(s)" in result.stdout
    target = open_store(postgres.dsn(name))
    try:
        assert target.blacklist_history("m@y")[0]["bounce_ids"] == ",".join(map(str, ids))
        assert [r["id"] for r in target.bounce_rows(ids=ids)] == sorted(ids, reverse=True)
        assert target.already_received("<in@x>") and target.quota_count("gateway", "transactional", 0) == 1
        assert target.record_outbound(outbound("Q9", "<m9@x>")) == row + 1, "sequences continue after the copy"
    finally:
        target.close()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not empty" in again.stderr
