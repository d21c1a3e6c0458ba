"""The outbound rows' group-commit writer: committed before the answer, many to a commit, one
bad row failing only its own message."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from mailgate.store import OutboundRecord
from mailgate.store.groupcommit import OutboundWriter, WriterStopped
from mailgate.store.sqlite import SQLiteStore


def record(n: int, queue_id: str | None = None) -> OutboundRecord:
    return OutboundRecord(queue_id=queue_id or f"Q{n}", message_id=f"<{n}@x>", envelope_from_original="a@x",
                          envelope_from="bounce@x", header_from_before="a@x", header_from_after="a@x",
                          server="trans", mass=False, listener="ORIGINATING", sasl_user=None,
                          created_at=time.time(), tokenised=True, recipient_digests=(f"d{n}",))


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(tmp_path / "store.db")
    yield store
    store.close()


def run_together(work, arguments) -> None:
    """`work(argument)` for each argument, in threads released at once (so that they queue together)."""
    go = threading.Event()

    def run(argument) -> None:
        go.wait()
        work(argument)

    threads = [threading.Thread(target=run, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join()


def committed_ids(store: SQLiteStore) -> set[int]:
    """Read on a connection of its own: what any other reader (the bounce path) sees."""
    with sqlite3.connect(store.path) as conn:
        return {row[0] for row in conn.execute("select id from messages")}


def test_a_row_is_committed_before_record_returns_and_blacklist_is_read(store):
    store.blacklist_add("x@customer.example", time.time(), "test", "operator", [])
    writer = OutboundWriter(store)
    try:
        row_id, blocked = writer.record(record(1), ["x@customer.example", "y@customer.example"])
        assert row_id in committed_ids(store)
        assert blocked == {"x@customer.example"}
        assert store.outbound_message(row_id).queue_id == "Q1"
    finally:
        writer.stop()


def test_concurrent_messages_share_commits_and_each_gets_its_own_row(store):
    writer = OutboundWriter(store)
    results: dict[int, int] = {}

    def send(n: int) -> None:
        results[n] = writer.record(record(n), [])[0]

    run_together(send, range(40))
    writer.stop()
    assert len(set(results.values())) == 40
    assert set(results.values()) <= committed_ids(store)
    for n, row_id in results.items():
        assert store.outbound_message(row_id).queue_id == f"Q{n}"
    assert writer.batches <= 40


class OneBadRow:
    """A store whose record_outbound fails for one queue id: the batch fails, then each row alone."""

    def __init__(self, store: SQLiteStore, bad: str) -> None:
        self.inner, self.bad = store, bad

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def record_outbound(self, rec: OutboundRecord) -> int:
        if rec.queue_id == self.bad:
            raise sqlite3.IntegrityError("bad row")
        return self.inner.record_outbound(rec)


def test_one_bad_row_fails_only_its_own_message(store):
    writer = OutboundWriter(OneBadRow(store, "BAD"))  # type: ignore[arg-type]
    outcomes: dict[str, object] = {}

    def send(queue_id: str) -> None:
        try:
            outcomes[queue_id] = writer.record(record(hash(queue_id) % 1000, queue_id), [])[0]
        except sqlite3.IntegrityError as exc:
            outcomes[queue_id] = exc

    run_together(send, [f"Q{n}" for n in range(10)] + ["BAD"])
    writer.stop()
    assert isinstance(outcomes.pop("BAD"), sqlite3.IntegrityError)
    assert set(outcomes.values()) <= committed_ids(store) and len(outcomes) == 10
    assert len(committed_ids(store)) == 10


def test_a_failed_commit_answers_every_waiter_and_nothing_is_left_half_written(store):
    writer = OutboundWriter(store)
    blocker = sqlite3.connect(store.path, timeout=30, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        store.close()
        import mailgate.store.sqlite as sqlite_module
        original = sqlite_module.BUSY_TIMEOUT_MS
        sqlite_module.BUSY_TIMEOUT_MS = 50
        try:
            with pytest.raises(sqlite3.OperationalError):
                writer.record(record(1), [])
        finally:
            sqlite_module.BUSY_TIMEOUT_MS = original
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert committed_ids(store) == set()
    row_id, _ = writer.record(record(2), [])
    assert committed_ids(store) == {row_id}
    writer.stop()


def test_a_stopped_writer_refuses_instead_of_accepting_unrecorded(store):
    writer = OutboundWriter(store)
    writer.stop()
    with pytest.raises(WriterStopped):
        writer.record(record(1), [])


def wal_bytes(store: SQLiteStore) -> int:
    """The WAL file's size: it grows until a checkpoint lets the next writer start it again from
    its beginning (the file keeps its size)."""
    wal = Path(store.path + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_background_checkpoints_keep_checkpoints_out_of_commits(tmp_path):
    """With `background_checkpoints` no commit checkpoints (the WAL only grows, past SQLite's
    1,000-page default); `checkpoint()` copies it into the file, and the next writer starts the
    WAL again from its beginning."""
    store = SQLiteStore(tmp_path / "store.db", background_checkpoints=True)
    writer = OutboundWriter(store)
    for n in range(1500):
        writer.record(record(n), [])
    grown = wal_bytes(store)
    assert grown > 1000 * 4096  # the default would have checkpointed and restarted the WAL
    store.checkpoint()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("select count(*) from messages").fetchone()[0] == 1500
        busy, frames, done = conn.execute("pragma wal_checkpoint(passive)").fetchone()
    assert busy == 0 and frames == done
    writer.record(record(2000), [])
    assert wal_bytes(store) == grown  # the WAL is rewritten from its start, not extended
    writer.stop()
    store.close()


def test_a_long_wal_is_started_again_even_with_a_reader_always_on_it(tmp_path, monkeypatch):
    """A reader that began before the last commits keeps a PASSIVE checkpoint from finishing, and
    then the next writer cannot start the WAL again: under steady load it only grows. Past
    WAL_RESTART_PAGES the checkpoint waits for such a reader (RESTART), briefly, and the next
    commit writes from the WAL's start."""
    import mailgate.store.sqlite as sqlite_module
    monkeypatch.setattr(sqlite_module, "WAL_RESTART_PAGES", 50)
    store = SQLiteStore(tmp_path / "store.db", background_checkpoints=True)
    for n in range(200):
        store.record_outbound(record(n))
    store.checkpoint()
    reader = sqlite3.connect(store.path, check_same_thread=False, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("select count(*) from messages").fetchone()   # its snapshot: before what follows
    for n in range(200, 400):
        store.record_outbound(record(n))
    started = time.monotonic()
    store.checkpoint()              # the reader stays: the checkpoint gives up after its short wait
    assert time.monotonic() - started < 2
    assert store._execute("PRAGMA busy_timeout").fetchone()[0] == sqlite_module.BUSY_TIMEOUT_MS
    grown = wal_bytes(store)
    threading.Timer(0.03, lambda: reader.execute("COMMIT")).start()  # the reader ends during the wait
    store.checkpoint()
    store.record_outbound(record(400))
    assert wal_bytes(store) == grown   # written from the WAL's start, not appended
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("select count(*) from messages").fetchone()[0] == 401
    reader.close()
    store.close()


class StuckStore:
    """A store whose record_outbound blocks until released: a leader stuck in its batch."""

    def __init__(self, store: SQLiteStore) -> None:
        self.inner = store
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def record_outbound(self, rec: OutboundRecord) -> int:
        if rec.queue_id == "STUCK":
            self.entered.set()
            self.release.wait(30)
        return self.inner.record_outbound(rec)


def test_a_message_waiting_too_long_is_refused_and_the_writer_goes_on(store, monkeypatch):
    import mailgate.store.groupcommit as groupcommit
    monkeypatch.setattr(groupcommit, "ANSWER_TIMEOUT", 0.3)
    stuck = StuckStore(store)
    writer = OutboundWriter(stuck)  # type: ignore[arg-type]
    outcomes: dict[str, object] = {}

    def send(queue_id: str) -> None:
        try:
            outcomes[queue_id] = writer.record(record(len(outcomes) + 100, queue_id), [])[0]
        except WriterStopped as exc:
            outcomes[queue_id] = exc

    leader = threading.Thread(target=send, args=("STUCK",))
    leader.start()
    assert stuck.entered.wait(10)
    follower = threading.Thread(target=send, args=("LATE",))
    follower.start()
    follower.join(10)
    assert isinstance(outcomes["LATE"], WriterStopped)   # tempfailed, never accepted unrecorded
    stuck.release.set()
    leader.join(10)
    assert outcomes["STUCK"] in committed_ids(store)
    row_id, _ = writer.record(record(7, "AFTER"), [])    # the lead was not lost with the late message
    assert row_id in committed_ids(store)
    assert "LATE" not in {store.outbound_message(i).queue_id for i in committed_ids(store)}


def test_the_lead_passes_on_and_every_message_of_a_long_burst_is_committed(store):
    writer = OutboundWriter(store, max_batch=3)
    results: dict[int, int] = {}

    def send(n: int) -> None:
        results[n] = writer.record(record(n), [])[0]

    run_together(send, range(60))
    assert len(results) == 60 and set(results.values()) <= committed_ids(store)
    assert writer.batches >= 20   # never more than max_batch a commit
