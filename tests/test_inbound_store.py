"""The inbound role over a real SQLite file: atomic loop counting, restarts, duplicates."""

from __future__ import annotations

import threading

from mailgate.configfile import parse_config
from mailgate.infra.runtime import Runtime
from mailgate.milter.facts import MessageFacts
from mailgate.milter.inbound import process_inbound
from mailgate.rules.tokens import TokenSigner
from mailgate.store.sqlite import SQLiteStore

CONFIG = parse_config("""
alias_domain: mycompany.com
aliases: {sales: {target: "odoo:crm.lead"}}
loop: {minutes: 120, threshold: 20}
""", check_files=False).config


def facts(number: int, sender: str = "robot@spam.example") -> MessageFacts:
    return MessageFacts(listener="INBOUND", envelope_sender=sender, recipients=["sales@mycompany.com"],
                        headers=[("From", sender), ("To", "sales@mycompany.com"),
                                 ("Message-ID", f"<m{number}-{threading.get_ident()}@spam.example>")])


def runtime(path, now: float = 1_800_000_000.0) -> Runtime:
    return Runtime(CONFIG, SQLiteStore(path), TokenSigner(b"k" * 32), clock=lambda: now)


def test_concurrent_deliveries_admit_exactly_the_threshold(tmp_path):
    """8 threads race 10 messages each from one sender: exactly 20 are delivered, never 21."""
    gateway = runtime(tmp_path / "db.sqlite3")
    actions: list[str] = []
    lock = threading.Lock()

    def deliver_many(worker: int) -> None:
        for number in range(10):
            effects = process_inbound(gateway, facts(worker * 100 + number), f"Q{worker}{number}")
            with lock:
                actions.append(effects.decision.action)

    threads = [threading.Thread(target=deliver_many, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert actions.count("deliver") == 20 and actions.count("reject") == 60


def test_counts_survive_a_restart_and_expire_with_the_window(tmp_path):
    path = tmp_path / "db.sqlite3"
    first = runtime(path)
    for number in range(20):
        assert process_inbound(first, facts(number), "Q").decision.action == "deliver"
    first.store.close()
    again = runtime(path)
    assert process_inbound(again, facts(99), "Q").decision.action == "reject"
    later = runtime(path, now=1_800_000_000.0 + 121 * 60)
    assert process_inbound(later, facts(100), "Q").decision.action == "deliver"


def test_dropped_and_refused_messages_do_not_count_as_received(tmp_path):
    gateway = runtime(tmp_path / "db.sqlite3")
    refused = MessageFacts(listener="INBOUND", envelope_sender="a@x.example", recipients=["nobody@mycompany.com"],
                           headers=[("From", "a@x.example"), ("Message-ID", "<same@x.example>")])
    assert process_inbound(gateway, refused, "Q1").decision.action == "reject"
    accepted = MessageFacts(listener="INBOUND", envelope_sender="a@x.example", recipients=["sales@mycompany.com"],
                            headers=[("From", "a@x.example"), ("Message-ID", "<same@x.example>")])
    delivered = process_inbound(gateway, accepted, "Q2")
    assert delivered.decision.action == "deliver" and delivered.unconfirmed_row is not None
    # until Postfix goes on past Q2 (the milter then confirms it), Q2 may not be queued at all
    assert process_inbound(gateway, accepted, "Q3").decision.action == "deliver"
    gateway.store.confirm_inbound(delivered.unconfirmed_row)
    assert process_inbound(gateway, accepted, "Q4").decision.action == "drop"
