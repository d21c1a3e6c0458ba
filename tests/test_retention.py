"""Retention: the cutoff of each table from the configuration, and the purge against a real
SQLite file and a real PostgreSQL (rows older than every window that reads them go, in bounded
batches; the blacklist and the bounces it names stay; the all-time totals never go down)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import replace

import pytest

from mailgate.commands.watchlog import EXPIRY_HORIZON
from mailgate.configfile import parse_config
from mailgate.rules.retention import DAY, purge_expired, retention_cutoffs
from mailgate.store import DeliveryRecord, DeliveryTotal, InboundRecord
from mailgate.store.interface import ReputationAlert
from test_store import NOW, bounce, open_same, outbound, store  # noqa: F401  (fixtures)

CONFIG = parse_config("alias_domain: mycompany.com\n", check_files=False).config


def test_cutoffs_follow_the_longest_window_that_reads_each_table():
    cutoffs = retention_cutoffs(CONFIG, NOW)
    assert cutoffs == {
        "bounces": NOW - 91 * DAY, "bounce_resets": NOW - 91 * DAY, "deliveries": NOW - 91 * DAY,
        "messages": NOW - 91 * DAY, "inbound_messages": NOW - 120 * 60, "quota_counters": NOW - DAY,
        "reputation_alerts": NOW - 91 * DAY}


def test_cutoffs_never_shorter_than_the_token_lifetime_or_the_log_readers_horizon():
    short = parse_config("bounces: {window_days: 2, token_days: 200}\nloop: {minutes: 5}\n",
                         check_files=False).config
    cutoffs = retention_cutoffs(short, NOW)
    assert cutoffs["bounces"] == NOW - 2 * DAY
    assert cutoffs["messages"] == NOW - 200 * DAY, "a report on a 199-day-old token still finds its message"
    assert cutoffs["deliveries"] == NOW - EXPIRY_HORIZON, "watch-log reads a queue id's deferrals that far back"
    assert cutoffs["inbound_messages"] == NOW - 300


def delivery(at: float, status: str = "sent", server: str | None = "trans") -> DeliveryRecord:
    return DeliveryRecord(at, f"Q{at}", "r@x", None, status, "2.0.0", 0.1, "ok", None, server)


def count(store, table: str) -> int:
    return store._scalar(f"select count(*) from {table}")


def fill(store) -> dict[str, list[int]]:
    """Rows on each side of every cutoff; returns the ids of the bounces."""
    for days in (200, 100, 10):
        store.record_outbound(replace(outbound(f"Q{days}", f"<m{days}@x>"), created_at=NOW - days * DAY,
                                      recipient_digests=(f"digest-a-{days}", f"digest-b-{days}")))
    evidence = [store.record_bounce(bounce("listed@y", 100 + d)) for d in range(5)]
    store.blacklist_add("listed@y", NOW - 100 * DAY, "5 hard bounces", "rule", evidence)
    gone = [store.record_bounce(bounce(f"b{n}@y", 95, permanent=n % 2 == 0, server="mass")) for n in range(4)]
    kept = [store.record_bounce(bounce("b@y", 1))]
    for days, status in ((100, "sent"), (99, "bounced"), (99, "sent"), (1, "sent")):
        store.record_delivery(delivery(NOW - days * DAY, status))
    with store.transaction():
        store.record_inbound(InboundRecord("Q", "<old@x>", "old@x", "alias:sales", "deliver", NOW - 3 * 3600),
                             ["odoo:crm.lead", "odoo:helpdesk"])
        store.record_inbound(InboundRecord("Q", "<new@x>", "new@x", "alias:sales", "deliver", NOW - 60),
                             ["odoo:crm.lead"])
        store.reset_bounces("old@x", NOW - 92 * DAY)
        store.reset_bounces("new@x", NOW - 60)
        store.quota_take("gateway", "transactional", NOW - 2 * DAY)
        store.quota_take("gateway", "transactional", NOW - 60)
        for days in (100, 10):   # docs/rules.md B6: an old window's alert goes, a recent one stays
            store.record_reputation_alert(ReputationAlert(NOW - days * DAY, "trans", "y", "blocked", 10, NOW))
    return {"evidence": evidence, "gone": gone, "kept": kept}


def test_purge_deletes_what_no_window_reads(store):
    ids = fill(store)
    before = (store.delivery_totals(), store.bounce_kind_totals())
    deleted = purge_expired(store, CONFIG, NOW)
    assert deleted == {"bounces": 4, "bounce_resets": 1, "deliveries": 3, "messages": 2, "outbound_recipients": 4,
                       "inbound_messages": 1, "inbound_routes": 2, "quota_recipients": 1, "reputation_alerts": 1}
    assert [row["queue_id"] for row in store._rows("select queue_id from messages")] == ["Q10"]
    # docs/rules.md R1, B1: a message's recipients go with it, and only with it
    [kept_message] = store._rows("select id from messages")
    assert store._rows("select message, recipient_digest from outbound_recipients order by recipient_digest") == [
        {"message": kept_message["id"], "recipient_digest": "digest-a-10"},
        {"message": kept_message["id"], "recipient_digest": "digest-b-10"}]
    remaining = {row["id"] for row in store._rows("select id from bounces")}
    assert remaining == set(ids["evidence"] + ids["kept"]), "the bounces the blacklist names stay"
    assert store.blacklisted(["listed@y"]) == {"listed@y"} and count(store, "blacklist") == 1
    assert store.recent_count("new@x", "odoo:crm.lead", NOW - 3600) == 1 and count(store, "inbound_routes") == 1
    assert store.already_received("<new@x>") and not store.already_received("<old@x>")
    assert store.quota_count("gateway", "transactional", NOW - DAY) == 1
    assert [row["address"] for row in store._rows("select address from bounce_resets")] == ["new@x"]
    assert count(store, "deliveries") == 1
    assert (store.delivery_totals(), store.bounce_kind_totals()) == before, "all-time totals never go down"
    assert set(purge_expired(store, CONFIG, NOW).values()) == {0}, "nothing left to purge"


@contextmanager
def counting_transactions(store, monkeypatch):
    """How many transactions the store opened."""
    seen = {"transactions": 0}
    transaction = store.transaction

    @contextmanager
    def counted(*keys):
        seen["transactions"] += 1
        with transaction(*keys):
            yield
    monkeypatch.setattr(store, "transaction", counted)
    yield seen


def test_purge_runs_in_bounded_batches(store, monkeypatch):
    for day in range(7):
        store.record_delivery(delivery(NOW - (100 + day) * DAY))
    with counting_transactions(store, monkeypatch) as seen:
        assert store.purge({"deliveries": NOW - 91 * DAY}, batch=2) == {"deliveries": 7}
    assert seen["transactions"] == 4, "one transaction per batch of 2"
    assert count(store, "deliveries") == 0
    assert store.delivery_totals() == [DeliveryTotal("trans", "sent", 7)]


def test_batches_end_on_rows_that_share_one_time(store):
    """Bounces of one report share their time: batches smaller than such a group delete it all,
    and a group of kept rows larger than a batch does not stop the purge either."""
    listed = [store.record_bounce(bounce("listed@y", 100)) for _ in range(5)]
    store.blacklist_add("listed@y", NOW, "rule", "rule", listed)
    for n in range(5):
        store.record_bounce(bounce(f"r{n}@y", 100))
    store.record_bounce(bounce("later@y", 99))
    assert store.purge({"bounces": NOW - 91 * DAY}, batch=2) == {"bounces": 6}
    assert {row["id"] for row in store._rows("select id from bounces")} == set(listed)


def test_purge_never_touches_the_blacklist_or_unknown_tables(store):
    for table in ("blacklist", "log_positions", "store_identity"):
        with pytest.raises(ValueError, match="never deletes"):
            store.purge({table: NOW})


def test_gateways_purging_together_delete_and_count_each_row_once(open_same):
    """Two gateways sharing one store purge at the same moment: every row goes once, and the
    totals it leaves behind are counted once."""
    first, second = open_same(), open_same()
    for n in range(60):
        first.record_delivery(delivery(NOW - (100 + n / 100) * DAY, "sent" if n % 3 else "deferred"))
    before = first.delivery_totals()
    results: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.purge({"deliveries": NOW - 91 * DAY}, batch=5)))
               for s in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(result["deliveries"] for result in results) == 60 and count(first, "deliveries") == 0
    assert second.delivery_totals() == before
