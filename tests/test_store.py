"""The store interface, against both backends: the embedded SQLite file and a real PostgreSQL
started by the tests (private data directory, loopback). The rules never know which one they use.
"""

from __future__ import annotations

import inspect
import json
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, replace

import pytest

from mailgate.rules.quota import WINDOW, recipients_within
from mailgate.store import (
    BlacklistEntry,
    BounceRecord,
    DeliveryRecord,
    DeliveryTotal,
    DomainBounces,
    InboundRecord,
    KindBounces,
    OutboundRecord,
    ServerBounces,
    StoredBounce,
    StoredDelivery,
    StoredOutbound,
    open_store,
    postgres as postgres_backend,
    sql as sql_backend,
    sqlite as sqlite_backend,
)
from mailgate.store.interface import PENDING_REEVALUATION, QuotaBatch, ReputationAlert, Store, StoreUnavailable
from mailgate.store.postgres import PostgresStore
from mailgate.store.sql import SQLStore
from mailgate.store.sqlite import SQLiteStore

NOW = 1_900_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def open_same(request, tmp_path):
    """Opens one of the test's stores by name (the same store for the same name), on each backend;
    all are closed at the end."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    made: set[str] = set()
    opened = []

    def open_it(name: str = "store"):
        if request.param == "sqlite":
            opened.append(SQLiteStore(tmp_path / f"{name}.sqlite3"))
        else:
            server = request.getfixturevalue("postgres")
            if name not in made:
                server.create_database(prefix + name)
                made.add(name)
            opened.append(open_store(server.dsn(prefix + name)))
        return opened[-1]
    yield open_it
    for backend in opened:
        backend.close()


@pytest.fixture
def store(open_same):
    return open_same()


def outbound(queue_id: str = "Q1", message_id: str | None = "<m1@x>", server: str | None = "trans",
             tokenised: bool = True) -> OutboundRecord:
    return OutboundRecord(queue_id, message_id, "a@x.example", "bounce@mycompany.com", "a@x.example",
                          '"a" <n@mycompany.com>', server, False, "ORIGINATING", None, NOW, tokenised)


def bounce(recipient: str, days_ago: float = 0, permanent: bool | None = True, **extra) -> BounceRecord:
    fields = dict(created_at=NOW - days_ago * 86400, recipient=recipient, status="5.1.1", action="failed",
                  permanent=permanent, reason="userunknown", reporting_mta="mx.example", remote_mta=None,
                  message=None, server="trans", source="dsn", diagnostic="no such user", hard=permanent is True)
    fields.update(extra)
    return BounceRecord(**fields)


def test_schema_is_current(store):
    assert store.schema_version == 10


def test_outbound_rows(store):
    row_id = store.record_outbound(outbound())
    stored = store.outbound_message(row_id)
    assert isinstance(stored, StoredOutbound)
    fields = asdict(outbound())
    del fields["recipient_digests"]
    assert stored == StoredOutbound(row_id, **{**fields, "tokenised": True, "recipient_count": 0})
    assert store.outbound_by_message_id("<m1@x>").id == row_id
    assert store.outbound_by_queue_id("Q1").id == row_id
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


def test_an_unconfirmed_inbound_row_is_no_duplicate_until_confirmed(store):
    """The milter writes the row before it answers; a milter killed in between leaves it
    unconfirmed, and the client's retry of that message must be delivered, not dropped."""
    row = store.record_inbound(InboundRecord("Q1", "<u@x>", "s@x", "alias:sales", "deliver", NOW, confirmed=0),
                               ["odoo:crm.lead"])
    assert not store.already_received("<u@x>")
    assert store.recent_count("s@x", "odoo:crm.lead", NOW - 60) == 1  # the loop guard counts it all the same
    store.confirm_inbound(row)
    assert store.already_received("<u@x>")


def open_at_version(open_same, monkeypatch, version: int):
    """The store as an older release made it: both backends' migrations cut to `version`."""
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", sqlite_backend.MIGRATIONS[:version])
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", postgres_backend.MIGRATIONS[:version])
    old = open_same()
    assert old.schema_version == version
    return old


def reopen_migrated(open_same, monkeypatch):
    """The same store opened by this release, which migrates it to the current version."""
    monkeypatch.undo()
    new = open_same()
    assert new.schema_version == len(sqlite_backend.MIGRATIONS)
    return new


def test_migration_from_v6_keeps_inbound_rows_received(open_same, monkeypatch):
    old = open_at_version(open_same, monkeypatch, 6)
    old._execute("insert into inbound_messages (queue_id, message_id, sender, routes, action, created_at) "
                 "values (?, ?, ?, ?, ?, ?)", ["Q", "<old@x>", "s@x", "alias:sales", "deliver", NOW])
    old.close()
    new = reopen_migrated(open_same, monkeypatch)
    assert new.already_received("<old@x>")


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
    assert isinstance(entry, BlacklistEntry) and not entry.active and entry.removed_reason == "delivered"
    assert entry.bounce_ids == ",".join(map(str, ids)) and entry.cause_ids == ids
    assert store.blacklist_entries() == [] and store.blacklist_entries(include_removed=True) == [entry]
    rows = store.bounce_rows(ids=ids)
    assert [r.id for r in rows] == sorted(ids, reverse=True)
    assert all(isinstance(r, StoredBounce) and r.permanent is True and r.kind == "hard" for r in rows)
    assert [r.stale for r in store.bounce_rows(address="a@y")].count(True) == 1


def test_bounce_stats(store):
    with store.transaction():
        store.record_bounce(bounce("a@gmail.example", 0))
        store.record_bounce(bounce("b@gmail.example", 0, permanent=False, server="mass"))
        store.record_bounce(bounce("c@yahoo.example", 1, permanent=None, reason="undefined"))
    stats = store.bounce_stats(0)
    assert {r.kind: r.bounces for r in stats.per_kind} == {"hard": 1, "soft": 1, "unknown": 1}
    assert stats.top_domains[0] == DomainBounces("gmail.example", 2)
    assert sum(r.bounces for r in stats.per_day) == 3 and all(len(r.day) == 10 for r in stats.per_day)
    assert sum(r.hard for r in stats.per_day) == 1
    assert sorted(stats.per_server, key=lambda r: r.server) == [ServerBounces("mass", 1), ServerBounces("trans", 2)]


def test_deliveries_and_log_position(store):
    store.record_delivery(DeliveryRecord(NOW, "Q1", "r@x", "mx[1.2.3.4]:25", "sent", "2.0.0", 0.5, "ok", None, "t"))
    store.record_delivery(DeliveryRecord(NOW, "Q1", "s@x", None, "deferred", "4.4.1", 1.0, "later", None, "t"))
    assert {(r.status, r.count) for r in store.delivery_stats(0)} == {("sent", 1), ("deferred", 1)}
    assert store.delivery_totals() == [DeliveryTotal("t", "deferred", 1), DeliveryTotal("t", "sent", 1)]
    attempts = store.deliveries_of("Q1", NOW - 1)
    assert [(a.recipient, a.status, a.relay) for a in attempts] == [("r@x", "sent", "mx[1.2.3.4]:25"),
                                                                    ("s@x", "deferred", None)]
    assert isinstance(attempts[0], StoredDelivery) and store.deliveries_of("Q1", NOW + 1) == []
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


def test_quota_batch_gives_back_takes_again_then_counts_and_takes_within_the_limit(store):
    """One batch: the give-back lowers its minute (never below zero), the take again adds, then
    each claimed counter is counted and takes what its limit leaves room for."""
    minute = NOW // 60 * 60
    store.quota_take_many([("domain:a", "transactional", minute - 60, 3), ("domain:b", "transactional", minute, 1)])
    counts = store.quota_batch(QuotaBatch(
        ("quota:domain:a:transactional", "quota:domain:b:transactional", "quota:domain:c:mass"),
        give_backs=(("domain:a", "transactional", minute - 60, 2), ("domain:b", "transactional", minute, 5)),
        retakes=(("domain:b", "transactional", minute - 60, 4),),
        claims=(("domain:a", "transactional", 5, 4), ("domain:b", "transactional", 2, 10), ("domain:c", "mass", 1, 0)),
        at=NOW, since=NOW - WINDOW))
    assert counts == {("domain:a", "transactional"): 1, ("domain:b", "transactional"): 4, ("domain:c", "mass"): 0}
    assert store.quota_count("domain:a", "transactional", NOW - WINDOW) == 4      # 1 + the 3 of 5 within 4
    assert store.quota_count("domain:b", "transactional", NOW - WINDOW) == 6      # 0 + 4 again + 2
    assert store.quota_count("domain:c", "mass", NOW - WINDOW) == 0               # a limit of 0 takes nothing
    # wanted 0 (a dry run): counted, nothing taken; a batch of give-backs alone counts nothing
    a_lock = ("quota:domain:a:transactional",)
    assert store.quota_batch(QuotaBatch(a_lock, claims=(("domain:a", "transactional", 0, 9),), at=NOW,
                                        since=NOW - WINDOW)) == {("domain:a", "transactional"): 4}
    assert store.quota_batch(QuotaBatch(("quota:domain:a:transactional",),
                                        give_backs=(("domain:a", "transactional", NOW, 1),))) == {}
    assert store.quota_count("domain:a", "transactional", NOW - WINDOW) == 3
    # the same counter and minute twice among the give-backs, and a minute with no row
    twice = ("domain:b", "transactional", minute, 1)
    store.quota_batch(QuotaBatch(("quota:domain:b:transactional",),
                                 give_backs=(twice, twice, ("domain:b", "transactional", minute - 3600, 1))))
    assert store.quota_count("domain:b", "transactional", NOW - WINDOW) == 4


def test_quota_batch_waits_for_the_counters_lock_and_counts_what_its_holder_took(open_same):
    """A batch on another store (another gateway) waits while the counter's lock is held, then
    counts what the holder committed: 29 of 30 taken, a batch wanting 2 gets 1."""
    first, second = open_same("shared"), open_same("shared")
    told: dict[str, dict] = {}

    def claim() -> None:
        told["counts"] = second.quota_batch(QuotaBatch(("quota:gateway:transactional",),
                                                       claims=(("gateway", "transactional", 2, 30),),
                                                       at=NOW, since=NOW - WINDOW))

    with first.transaction("quota:gateway:transactional"):
        first.quota_take("gateway", "transactional", NOW, 29)
        waiting = threading.Thread(target=claim)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()
    waiting.join(10)
    assert told["counts"] == {("gateway", "transactional"): 29}
    assert first.quota_count("gateway", "transactional", NOW - WINDOW) == 30


def test_quota_batches_over_two_stores_never_overshoot(open_same):
    """Two stores on the same data (two gateways on PostgreSQL), four threads each, batches
    claiming 1 to 3 recipients of one counter of 30, 240 wanted in all: exactly 30 are taken, no
    batch ever counts more, and the counts the batches were told let through exactly 30."""
    stores = [open_same("shared"), open_same("shared")]
    seen: list[tuple[int, int]] = []
    record = threading.Lock()

    def worker(store, seed: int) -> None:
        for round_no in range(20):
            wanted = 1 + (seed + round_no) % 3
            counts = store.quota_batch(QuotaBatch(("quota:gateway:transactional",),
                                                  claims=(("gateway", "transactional", wanted, 30),),
                                                  at=NOW, since=NOW - WINDOW))
            with record:
                seen.append((counts[("gateway", "transactional")], wanted))

    threads = [threading.Thread(target=worker, args=(stores[k % 2], k)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(count for count, _ in seen) == 30
    assert sum(recipients_within(count, wanted, 30) for count, wanted in seen) == 30
    assert stores[0].quota_count("gateway", "transactional", NOW - WINDOW) == 30
    assert stores[1].quota_count("gateway", "transactional", NOW - WINDOW) == 30


@pytest.mark.e2e
def test_migrate_store_copies_everything(tmp_path, postgres):
    import subprocess
    import sys
    source = SQLiteStore(tmp_path / "old.sqlite3")
    row = source.record_outbound(replace(outbound(), recipient_digests=("d-one", "d-two")))
    with source.transaction():
        ids = [source.record_bounce(bounce("m@y", d, message=row)) for d in (9, 5, 1)]
        source.blacklist_add("m@y", NOW, "rule", "rule", ids)
        source.record_inbound(InboundRecord("Q", "<in@x>", "s@x", "alias:sales", "deliver", NOW), ["odoo:crm.lead"])
        source.quota_take("gateway", "transactional", NOW)
    identity = source.store_id()
    source.close()
    name = f"m{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    command = [sys.executable, "-m", "mailgate", "migrate-store", "--from", str(tmp_path / "old.sqlite3"),
               "--to", postgres.dsn(name)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bounces: 3 row(s)" in result.stdout and "outbound_recipients: 2 row(s)" in result.stdout
    target = open_store(postgres.dsn(name))
    try:
        assert target.blacklist_history("m@y")[0].bounce_ids == ",".join(map(str, ids))
        assert [r.id for r in target.bounce_rows(ids=ids)] == sorted(ids, reverse=True)
        assert target.already_received("<in@x>") and target.quota_count("gateway", "transactional", 0) == 1
        assert target.sent_to(row, ["d-one", "d-two"]) == {"d-one", "d-two"}
        assert target.record_outbound(outbound("Q9", "<m9@x>")) == row + 1, "sequences continue after the copy"
        assert target.store_id() == identity, "the tokens already issued keep matching their rows"
    finally:
        target.close()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not empty" in again.stderr


def test_a_store_copies_into_another_through_the_interface(open_same):
    """What migrate-store uses, on each backend: whole tables out and in with their ids, the
    sequences continuing after them, the identity taken over."""
    source, target = open_same("source"), open_same("copy")
    row = source.record_outbound(replace(outbound(), recipient_digests=("d-one", "d-two")))
    ids = [source.record_bounce(bounce("c@y", d, message=row)) for d in (3, 2)]
    source.blacklist_add("c@y", NOW, "rule", "rule", ids)
    assert source.tables_with_rows(sql_backend.DATA_TABLES) == ["messages", "outbound_recipients", "bounces",
                                                                "blacklist"]
    assert target.tables_with_rows(sql_backend.DATA_TABLES) == []
    with target.transaction("copy"):
        for table in sql_backend.DATA_TABLES:
            for batch in source.table_rows(table, batch=1):
                assert len(batch.rows) == 1 and ("id" in batch.columns or table not in sql_backend.TABLES_WITH_IDS)
                target.insert_rows(table, batch.columns, batch.rows)
        target.reset_id_sequences()
        target.adopt_store_id(source.store_id())
    assert target.store_id() == source.store_id()
    assert target.bounce_rows() == source.bounce_rows() and target.blacklist_entries() == source.blacklist_entries()
    assert target.sent_to(row, ["d-one", "d-two", "d-other"]) == {"d-one", "d-two"}, "B1: the recipients came along"
    assert target.outbound_message(row).recipient_count == 2
    assert target.record_outbound(outbound("Q2", "<m2@x>")) == row + 1, "the ids continue after the copied ones"
    with pytest.raises(ValueError, match="not a table"):
        next(source.table_rows("store_identity"))


# The public methods of SQLStore that no caller needs through the interface.
NOT_IN_THE_INTERFACE = {
    "domain_of",   # a dialect hook of the backends (the SQL of an address's domain), not a query
}


def test_the_interface_declares_every_public_method_of_the_store():
    """Callers see a store through `Store` alone: a public method that exists only on the
    backends would tie its callers to one of them."""
    declared = {name for name in vars(Store) if not name.startswith("_")}
    for backend in (SQLStore, SQLiteStore, PostgresStore):
        public = {name for name, value in inspect.getmembers(backend)
                  if not name.startswith("_") and (callable(value) or isinstance(value, property))}
        assert public - NOT_IN_THE_INTERFACE == declared, backend
    for name in declared - {"schema_version"}:
        expected = list(inspect.signature(getattr(Store, name)).parameters)
        actual = list(inspect.signature(getattr(SQLStore, name)).parameters)
        assert actual[:len(expected)] == expected, name


def test_both_backends_are_stores(store):
    assert isinstance(store, Store)


# -- schema v6: the store's identity, covering indexes --------------------------------------------


def test_store_identity_is_random_per_store_and_kept(open_same):
    identity = open_same().store_id()
    assert len(identity) == 32 and int(identity, 16) >= 0
    assert open_same().store_id() == identity, "the same store, reopened, keeps its identity"
    assert open_same("recreated").store_id() != identity, "a re-created store gets another one"


def test_migration_from_v5_keeps_the_rows_and_adds_identity_and_indexes(open_same, monkeypatch):
    old = open_at_version(open_same, monkeypatch, 5)
    row = _old_outbound_row(old)
    _old_bounce_row(old, "5.1.1", "550 5.1.1 no such user", 1, message=row)
    old.record_delivery(DeliveryRecord(NOW, "Q1", "a@y", None, "bounced", "5.1.1", 1.0, "no", row, "trans"))
    old.close()
    new = reopen_migrated(open_same, monkeypatch)
    assert len(new.store_id()) == 32
    assert new.outbound_message(row).queue_id == "Q1"
    assert new.bounce_kind_totals() == [KindBounces("hard", 1)]
    assert new.delivery_totals() == [DeliveryTotal("trans", "bounced", 1)]


def _plans(store: SQLiteStore, calls) -> list[str]:
    statements: list[str] = []
    conn = store._db().conn
    conn.set_trace_callback(statements.append)
    try:
        for call in calls:
            call()
    finally:
        conn.set_trace_callback(None)
    return [row[3] for sql in statements for row in conn.execute("explain query plan " + sql)]


def test_operator_views_read_only_covering_indexes(tmp_path):
    store = SQLiteStore(tmp_path / "store.sqlite3")
    plans = _plans(store, [lambda: store.bounce_stats(0), lambda: store.bounce_stats(NOW),
                           lambda: store.delivery_stats(0), store.delivery_totals, store.bounce_kind_totals])
    reads = [plan for plan in plans if " bounces" in plan or " deliveries" in plan]
    assert reads and all("COVERING INDEX" in plan for plan in reads), plans


@pytest.mark.e2e
def test_postgres_has_the_covering_indexes(postgres):
    name = f"i{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    store = open_store(postgres.dsn(name))
    try:
        definitions = {row["indexname"]: row["indexdef"] for row in store._rows("select * from pg_indexes")}
    finally:
        store.close()
    assert "(created_at, hard, permanent, reason, server, recipient)" in definitions["bounces_reasons"]
    assert "(at, server, status)" in definitions["deliveries_stats"]
    assert "(server, status)" in definitions["deliveries_totals"]
    assert not {"bounces_created_at", "deliveries_at", "deliveries_server"} & set(definitions), "prefixes dropped"


@pytest.mark.e2e
def test_postgres_replaces_a_connection_the_server_ended_before_a_call_uses_it(postgres):
    """The pool checks an idle connection with a round trip only when its socket is readable: a
    session the server ended (restart, pg_terminate_backend) is, and is replaced before the next
    call, which succeeds."""
    name = f"t{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    store = open_store(postgres.dsn(name))
    try:
        backend = store._scalar("select pg_backend_pid()")
        assert postgres.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                                [name]) == [(True,)]
        deadline = time.monotonic() + 10
        while postgres.execute("select 1 from pg_stat_activity where pid = %s", [backend]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert store._scalar("select pg_backend_pid()") != backend
        assert store.quota_batch(QuotaBatch(("quota:gateway:transactional",),
                                            claims=(("gateway", "transactional", 1, 5),), at=NOW,
                                            since=NOW - WINDOW)) == {("gateway", "transactional"): 0}
    finally:
        store.close()


@pytest.mark.e2e
def test_postgres_quota_batch_commits_synchronously_on_a_server_that_does_not(postgres):
    """The lab's server runs with synchronous_commit off; a quota batch's transaction commits
    synchronously all the same (a crash must not lose takes: the quota would overshoot), and only
    that transaction."""
    name = f"t{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    store = open_store(postgres.dsn(name))
    try:
        assert store._scalar("show synchronous_commit") == "off"
        with store.transaction():
            store.quota_batch(QuotaBatch(("quota:gateway:transactional",), claims=(("gateway", "transactional", 1, 5),),
                                         at=NOW, since=NOW - WINDOW))
            assert store._scalar("show synchronous_commit") == "on"
        with store.transaction():
            assert store._scalar("show synchronous_commit") == "off"
    finally:
        store.close()


# -- SQLite: proven writable at start --------------------------------------------------------------


def _recording_connect(monkeypatch, read_only: bool = False) -> list:
    """Record every connection SQLiteStore opens (optionally opening them read-only, as SQLite
    does when the file system is read-only)."""
    opened: list = []
    original = SQLiteStore._connect

    def connect(self):
        db = original(self)
        if read_only:
            db.conn.close()
            db = sqlite_backend.sqlite_utils.Database(sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False))
        opened.append(db)
        return db
    monkeypatch.setattr(SQLiteStore, "_connect", connect)
    return opened


def _is_closed(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("select 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def test_the_migration_connection_is_closed_after_start(tmp_path, monkeypatch):
    opened = _recording_connect(monkeypatch)
    store = SQLiteStore(tmp_path / "store.sqlite3")
    assert len(opened) == 1 and _is_closed(opened[0].conn)
    store.record_outbound(outbound())
    assert len(opened) == 2 and not _is_closed(opened[1].conn)
    store.close()


def test_a_store_that_cannot_be_written_fails_at_start(tmp_path, monkeypatch):
    SQLiteStore(tmp_path / "store.sqlite3").close()
    opened = _recording_connect(monkeypatch, read_only=True)
    with pytest.raises(StoreUnavailable, match="cannot be written.*readonly"):
        SQLiteStore(tmp_path / "store.sqlite3")
    assert opened and all(_is_closed(db.conn) for db in opened)


def test_a_store_that_cannot_be_opened_fails_at_start(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="cannot be opened"):
        SQLiteStore(tmp_path / "file" / "store.sqlite3")


@pytest.mark.e2e
def test_a_read_only_postgres_database_fails_at_start(postgres):
    import psycopg
    name = f"r{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    open_store(postgres.dsn(name)).close()
    postgres.execute(f"alter database {name} set default_transaction_read_only = on")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        open_store(postgres.dsn(name))


# -- SQLite: connections reused across threads ------------------------------------------------------


def _connection_in_thread(store: SQLiteStore, work=lambda store: store.record_outbound(outbound())):
    """The connection a new thread used for `work` (a failure in `work` is swallowed)."""
    used = []

    def run() -> None:
        try:
            work(store)
        except sqlite3.Error:
            pass
        used.append(store._db().conn if getattr(store._local, "lease", None) else None)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return used[0]


def test_threads_one_after_another_reuse_one_connection(tmp_path):
    store = SQLiteStore(tmp_path / "store.sqlite3")
    connections = [_connection_in_thread(store) for _ in range(5)]
    assert all(conn is connections[0] for conn in connections)
    assert store.outbound_by_queue_id("Q1").queue_id == "Q1"
    store.close()


def test_a_connection_that_failed_is_not_reused(tmp_path):
    store = SQLiteStore(tmp_path / "store.sqlite3")
    healthy = _connection_in_thread(store)

    def fails(store: SQLiteStore) -> None:
        used.append(store._db().conn)
        store._execute("insert into no_such_table values (1)")
    used: list = []
    assert _connection_in_thread(store, fails) is None, "dropped at once"
    assert used == [healthy] and _is_closed(healthy)
    later = _connection_in_thread(store)
    assert later is not healthy
    store.close()


def test_a_connection_that_failed_in_a_transaction_is_not_reused(tmp_path):
    store = SQLiteStore(tmp_path / "store.sqlite3")
    first = _connection_in_thread(store)

    def fails(store: SQLiteStore) -> None:
        with store.transaction():
            store.record_outbound(outbound("Q-rolled-back"))
            store._execute("insert into no_such_table values (1)")
    assert _connection_in_thread(store, fails) is None, "dropped at once"
    assert _connection_in_thread(store) is not first
    assert store.outbound_by_queue_id("Q-rolled-back") is None
    store.close()


def test_concurrent_threads_get_distinct_connections_and_few_stay_idle(tmp_path):
    store = SQLiteStore(tmp_path / "store.sqlite3")
    count = sqlite_backend.IDLE_CONNECTIONS + 4
    together = threading.Barrier(count)
    used: list = []

    def work() -> None:
        store.record_outbound(outbound())
        used.append(store._db().conn)
        together.wait(10)
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(conn) for conn in used}) == count
    closed = [conn for conn in used if _is_closed(conn)]
    assert len(closed) == count - sqlite_backend.IDLE_CONNECTIONS, "idle ones beyond the cap are closed"
    store.close()
    assert all(_is_closed(conn) for conn in used), "close() ends the idle ones"


# -- operator views: the bounce window by default ----------------------------------------------------


@pytest.mark.e2e
def test_stats_views_read_the_bounce_window_unless_told_otherwise(tmp_path):
    config = tmp_path / "mailgate.yaml"
    config.write_text("alias_domain: mycompany.com\ndatabase: store.sqlite3\nbounces: {window_days: 10}\n")
    store = SQLiteStore(tmp_path / "store.sqlite3")
    now = time.time()
    for days in (1, 5, 30):
        store.record_bounce(bounce(f"a{days}@y", created_at=now - days * 86400))
        store.record_delivery(DeliveryRecord(now - days * 86400, "Q", "r@x", None, "sent", "2.0.0", 0.1, "ok",
                                             None, "t"))
    store.close()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mailgate", *args, "--config", str(config)], capture_output=True,
                              text=True, timeout=60)

    def bounces(*args: str) -> int:
        return sum(row["bounces"] for row in json.loads(run("bounces", "stats", "--json", *args).stdout)["per_kind"])

    def sent(*args: str) -> int:
        return sum(row["sent"] for row in json.loads(run("stats", "--json", *args).stdout)["per_server"])
    assert (bounces(), bounces("--all"), bounces("--since", "60d"), bounces("--since", "2d")) == (2, 3, 3, 1)
    assert (sent(), sent("--all"), sent("--since", "2d")) == (2, 3, 1)
    assert 'mailgate_deliveries_total{server="t",status="sent"} 3' in run("stats", "--prometheus").stdout
    assert run("stats", "--all", "--since", "7d").returncode == 2
    assert "# since " in run("bounces", "stats").stdout


# -- schema v8: whom a message was sent to, once per message and recipient (docs/rules.md B1) -------


def _old_outbound_row(store) -> int:
    """A message row as an older schema held it (no recipients column yet)."""
    return store._scalar("insert into messages (direction, queue_id, message_id, server, created_at, tokenised) "
                         "values ('outbound', 'Q1', '<m1@x>', 'trans', ?, 1) returning id", [NOW])


def test_a_message_keeps_its_recipients_digests_for_reports_to_check(store):
    """B1: a report counts only for recipients the message was sent to; a message has thousands
    of recipients at times, and the lookup of a report naming hundreds is batched."""
    digests = tuple(f"digest-{n:05}" for n in range(3000))
    row = store.record_outbound(replace(outbound(), recipient_digests=digests + digests[:5]))
    other = store.record_outbound(replace(outbound("Q2", "<m2@x>"), recipient_digests=("digest-elsewhere",)))
    assert store.outbound_message(row).recipient_count == 3000
    named = [f"digest-{n:05}" for n in range(0, 6000, 5)] + ["digest-elsewhere"]   # 1,201 candidates
    assert store.sent_to(row, named) == {f"digest-{n:05}" for n in range(0, 3000, 5)}
    assert store.sent_to(other, named) == {"digest-elsewhere"}
    assert store.sent_to(row, []) == set()


def test_the_message_row_and_its_recipients_are_written_together(store):
    """One transaction: the caller's when one is open (it rolls both back), else its own (a
    failing recipient insert leaves no message row without its recipients)."""
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.record_outbound(replace(outbound("Q-rolled"), recipient_digests=("d1",)))
            raise RuntimeError("boom")
    with pytest.raises((sqlite3.IntegrityError, postgres_backend.psycopg.IntegrityError)):
        store.record_outbound(replace(outbound("Q-broken"), recipient_digests=("d1", None)))
    assert store._scalar("select count(*) from messages") == 0
    assert store._scalar("select count(*) from outbound_recipients") == 0


def test_a_failure_is_recorded_once_per_message_and_recipient(store):
    row = store.record_outbound(replace(outbound(), recipient_digests=("d1",)))
    assert not store.bounce_recorded(row, "a@y")
    store.record_bounce(bounce("a@y", 1, message=row))
    assert store.bounce_recorded(row, "a@y")
    assert not store.bounce_recorded(row, "b@y") and not store.bounce_recorded(row + 1, "a@y")


def test_migration_from_v7_leaves_older_messages_with_unknown_recipients(open_same, monkeypatch):
    old = open_at_version(open_same, monkeypatch, 7)
    row = _old_outbound_row(old)
    old.close()
    new = reopen_migrated(open_same, monkeypatch)
    assert new.outbound_message(row).recipient_count is None, "a row from before: its recipients are unknown"
    assert new.sent_to(row, ["d1"]) == set()
    later = new.record_outbound(replace(outbound("Q2", "<m2@x>"), recipient_digests=("d1",)))
    assert new.outbound_message(later).recipient_count == 1 and new.sent_to(later, ["d1"]) == {"d1"}


# -- schema v9: a reason per bounce (docs/rules.md B4, B5), reputation alerts (B6) ------------------

def test_migration_from_v8_gives_every_bounce_its_reason(open_same, monkeypatch):
    """The text recorded so far moves to `diagnostic`; the reason and the hard flag are read
    from it; the blacklist is left to be judged once more (the task is taken once)."""
    full = (sqlite_backend.MIGRATIONS, postgres_backend.MIGRATIONS)
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", full[0][:8])
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", full[1][:8])
    old = open_same()
    assert old.schema_version == 8
    for status, text, permanent in (("5.1.1", "550 5.1.1 no such user", 1),
                                    ("5.7.1", "550 5.7.1 Service unavailable; host blocked using zen.example", 1),
                                    (None, None, None)):
        _old_bounce_row(old, status, text, permanent)
    old.close()
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", full[0])
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", full[1])
    monkeypatch.setattr(sql_backend, "CLASSIFY_BATCH", 2)       # three rows: two batches
    new = open_same()
    assert new.schema_version == len(sqlite_backend.MIGRATIONS)
    rows = sorted(new.bounce_rows(address="a@y"), key=lambda b: b.id)
    assert [(b.reason, b.hard, b.kind) for b in rows] == [
        ("userunknown", True, "hard"), ("blocked", False, "soft"), ("undefined", False, "unknown")]
    assert rows[1].diagnostic.startswith("550 5.7.1 Service unavailable")
    assert [(f.reason, f.hard) for f in new.countable_bounces("a@y", 0.0)][:2] == [("userunknown", True),
                                                                                  ("blocked", False)]
    assert new.take_pending_task(PENDING_REEVALUATION) and not new.take_pending_task(PENDING_REEVALUATION)


def _old_bounce_row(old: Store, status: str | None, text: str | None, permanent: int | None,
                    message: int | None = None) -> None:
    """A bounce as a store before schema v9 held it: the report's text in `reason`."""
    old._execute("insert into bounces (created_at, recipient, status, action, permanent, reason, message, server, "
                 "source, stale, matched) values (?, ?, ?, 'failed', ?, ?, ?, 'trans', 'dsn', 0, 1)",
                 [NOW, "a@y", status, permanent, text, message])


def test_bounce_stats_per_reason(store):
    with store.transaction():
        store.record_bounce(bounce("a@y"))
        store.record_bounce(bounce("b@y", reason="blocked", hard=False, status="5.7.1"))
        store.record_bounce(bounce("c@y", reason="blocked", hard=False, status="5.7.1"))
    per_reason = {(r.reason, r.bounces, r.hard) for r in store.bounce_stats(0.0).per_reason}
    assert per_reason == {("blocked", 2, 0), ("userunknown", 1, 1)}
    assert {(k.kind, k.bounces) for k in store.bounce_stats(0.0).per_kind} == {("soft", 2), ("hard", 1)}


def test_sender_side_counts_and_one_alert_per_window(store):
    with store.transaction():
        for n in range(3):
            store.record_bounce(bounce(f"u{n}@big.example", reason="blocked", hard=False))
        store.record_bounce(bounce("v@big.example", reason="spamdetected", hard=False, server="mass"))
        store.record_bounce(bounce("w@big.example", reason="userunknown"))
        store.record_bounce(bounce("x@big.example", days_ago=1, reason="blocked", hard=False))
    counts = store.sender_side_counts(NOW - 3600, ["blocked", "spamdetected"])
    assert [(c.server, c.domain, c.reason, c.bounces) for c in counts] == [
        ("trans", "big.example", "blocked", 3), ("mass", "big.example", "spamdetected", 1)]
    alert = ReputationAlert(NOW - 600, "trans", "big.example", "blocked", 3, NOW)
    assert store.record_reputation_alert(alert)
    assert not store.record_reputation_alert(replace(alert, bounces=4, at=NOW + 1))
    assert store.reputation_alerts(NOW - 3600) == [alert] and store.reputation_alerts(NOW) == []
