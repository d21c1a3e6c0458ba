"""docs/rules.md B1-B3 and Q as tables: what a report may record, the blacklist rule, stale tokens, where
reports go, the quota."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mailgate.config import BounceSettings
from mailgate.configfile import parse_config
from mailgate.rules.blacklist import record_and_judge, reevaluate_blacklist
from mailgate.rules.bounces import (
    UNTIED_ROWS_PER_REPORT,
    blacklist_verdict,
    report_destination,
    screen_failed,
    token_is_stale,
)
from mailgate.rules.quota import quota_allows, quota_key, quota_limit
from mailgate.rules.reason_vocabulary import is_hard
from mailgate.rules.reputation import (
    PairCount,
    alert_fields,
    alerts_after,
    new_alerts,
    over_threshold,
    window_start,
)
from mailgate.rules.tokens import TokenSigner
from mailgate.store.interface import BounceFact, BounceRecord, SenderSideCount

DAY = 86400.0
NOW = 2_000_000_000.0


def facts(*days_ago: float, permanent: bool | None = True, reason: str = "userunknown") -> list[BounceFact]:
    return [BounceFact(i, NOW - d * DAY, permanent, reason, is_hard(reason, permanent)) for i, d in enumerate(days_ago)]


@pytest.mark.parametrize("days_ago, due", [
    ((0, 2, 4, 6, 8), True),               # five hard bounces over eight days
    ((0, 1, 2, 3, 4), False),              # five within four days: one bad week blacklists nobody
    ((0, 0, 0, 0, 7), False),              # spread exactly seven days: "more than" seven needed
    ((0, 0, 0, 0, 7.01), True),            # the five need not each be a week apart
    ((0, 10, 20, 30), False),              # only four
    ((0, 10, 20, 30, 100), False),         # the oldest is outside 91 days: four remain
    ((0, 10, 20, 30, 40, 90), True),
])
def test_blacklist_rule(days_ago, due):
    assert blacklist_verdict(facts(*days_ago), BounceSettings(), NOW).due is due


def test_blacklist_names_the_bounces_that_caused_it():
    verdict = blacklist_verdict(facts(0, 2, 4, 6, 8), BounceSettings(), NOW)
    assert sorted(verdict.bounce_ids) == [0, 1, 2, 3, 4] and "5 hard bounces (userunknown)" in verdict.reason


def test_documented_window_of_thirty_days():
    assert blacklist_verdict(facts(0, 10, 20, 25, 40), BounceSettings(window_days=91), NOW).due
    assert not blacklist_verdict(facts(0, 10, 20, 25, 40), BounceSettings(window_days=30), NOW).due


@pytest.mark.parametrize("reason, permanent, count, due", [
    ("userunknown", True, "recipient", True),
    ("hostunknown", True, "recipient", True),
    ("notaccept", True, "recipient", True),
    ("notaccept", False, "recipient", False),    # a temporary "not accepting mail" is maintenance
    ("blocked", True, "recipient", False),       # a block list refusing us is not the address's fault
    ("spamdetected", True, "recipient", False),
    ("mailboxfull", True, "recipient", False),
    ("blocked", True, "permanent", True),        # mailgate's rule before reasons: every 5.x.x
    ("mailboxfull", False, "permanent", False),
    ("undefined", None, "permanent", False),
    ("mailboxfull", False, "all", True),         # Odoo's rule: every bounce
    ("undefined", None, "all", True),
])
def test_bounces_count_by_mode(reason, permanent, count, due):
    """B3 `bounces.count`: which bounces count toward the blacklist."""
    verdict = blacklist_verdict(facts(0, 2, 4, 6, 8, permanent=permanent, reason=reason),
                                BounceSettings(count=count), NOW)
    assert verdict.due is due


def test_token_lifetime():
    signer = TokenSigner(b"k" * 32)
    token = signer.verify(signer.make(7, "s", NOW - 31 * DAY))
    assert token_is_stale(token, BounceSettings(token_days=30), NOW)
    assert not token_is_stale(signer.verify(signer.make(7, "s", NOW - 2 * DAY)), BounceSettings(token_days=30), NOW)


CONFIG = parse_config("alias_domain: mycompany.com\n", check_files=False).config


@pytest.mark.parametrize("original, expected", [
    ("bounce+991-mail.mail-17@mycompany.com", "original"),
    ("bounce@mycompany.com", "original"),
    ("admin@example.com", "odoo"),
    ("jane@mycompany.com", "odoo"),
    (None, "odoo"),
])
def test_report_destination(original, expected):
    assert report_destination(CONFIG, original) == expected


def test_report_destination_discard():
    config = parse_config("alias_domain: mycompany.com\nbounces: {forward: discard}\n", check_files=False).config
    assert report_destination(config, "admin@example.com") == "discard"
    assert report_destination(config, "bounce+1@mycompany.com") == "original"


@pytest.mark.parametrize("scope, sender, sasl, key", [
    ("sender_domain", "a@Shop.example", None, "domain:shop.example"),
    ("sender_domain", "", None, None),
    ("gateway", "a@x.example", None, "gateway"),
    ("sasl_user", "a@x.example", "Odoo", "sasl:odoo"),
    ("sasl_user", "a@x.example", None, "domain:x.example"),
])
def test_quota_key(scope, sender, sasl, key):
    config = parse_config(f"quota: {{scope: {scope}}}\n", check_files=False).config
    assert quota_key(config, sender, sasl) == key


def test_quota_limits_and_allowance():
    config = parse_config("quota: {daily: 200, mass_daily: 5000}\n", check_files=False).config
    assert quota_limit(config, False) == 200 and quota_limit(config, True) == 5000
    assert quota_allows(199, 200) and not quota_allows(200, 200) and quota_allows(10**9, None)


# -- B1: a report counts only for the message's own recipients, once, with bounded work ------------

SENT_TO = {"a@customer.example", "b@customer.example"}


def sent_to(candidates: list[str]) -> set[str]:
    return {c for c in candidates if c in SENT_TO}


def test_a_report_is_recorded_only_for_the_messages_recipients():
    addresses = ["a@customer.example", "stranger@else.example", "b@customer.example", "a@customer.example"]
    screen = screen_failed(addresses, 2, sent_to)
    assert screen.recorded == (0, 2)
    assert (screen.not_recipients, screen.repeated, screen.over_limit) == (1, 1, 0)


def test_a_report_naming_five_hundred_strangers_is_bounded_by_the_messages_recipients():
    addresses = [f"victim{n}@else.example" for n in range(500)] + ["a@customer.example"]
    looked_at: list[list[str]] = []
    screen = screen_failed(addresses, 2, lambda c: looked_at.append(c) or sent_to(c))
    assert screen.recorded == ()
    assert len(looked_at[0]) == 2 + UNTIED_ROWS_PER_REPORT, "only as many addresses as the message could fail"
    assert screen.not_recipients == 2 + UNTIED_ROWS_PER_REPORT and screen.over_limit == 501 - 12


def test_a_report_tied_to_no_known_recipients_writes_a_few_rows_that_never_count():
    addresses = [f"r{n}@else.example" for n in range(50)]
    screen = screen_failed(addresses, None, lambda c: pytest.fail("no recipients to look at"))
    assert screen.recorded == tuple(range(UNTIED_ROWS_PER_REPORT)) and screen.over_limit == 40


class OneMessageStore:
    """What `record_and_judge` asks of a store, for one address's rows."""

    def __init__(self):
        self.rows: list[BounceRecord] = []

    def bounce_recorded(self, message, recipient):
        return any(r.message == message and r.recipient == recipient for r in self.rows)

    def record_bounce(self, record):
        self.rows.append(record)
        return len(self.rows)

    def countable_bounces(self, address, since):
        return [BounceFact(i, r.created_at, r.permanent, r.reason, r.hard) for i, r in enumerate(self.rows, 1)
                if r.recipient == address and r.matched and not r.stale]

    def blacklist_add(self, *args):
        return True


def test_a_message_fails_once_per_recipient_however_many_reports_say_so():
    """B1/B3: five reports (five Message-IDs) on one message are one bounce, never a blacklist."""
    store = OneMessageStore()
    record = BounceRecord(NOW, "a@customer.example", "5.1.1", "failed", True, "userunknown", None, None, 7, "t", "dsn",
                          hard=True)
    outcomes = [record_and_judge(store, BounceSettings(), replace(record, created_at=NOW + d * 2 * DAY),
                                 NOW + d * 2 * DAY) for d in range(5)]
    assert [o.repeat for o in outcomes] == [False, True, True, True, True]
    assert len(store.rows) == 1 and not any(o.blacklisted for o in outcomes)
    # the same failure on five messages does count (the control)
    outcomes = [record_and_judge(store, BounceSettings(), replace(record, message=10 + d, created_at=NOW + d * 2 * DAY),
                                 NOW + d * 2 * DAY) for d in range(5)]
    assert outcomes[-1].blacklisted


def test_a_report_to_odoos_own_pre_token_address_goes_to_odoo_as_addressed():
    """T1: `bounce+991-mail.mail-17@` is Odoo's own form, on mail Odoo sent before the cut-over."""
    config = parse_config("alias_domain: mycompany.com\nbounces: {forward: discard}\n", check_files=False).config
    assert report_destination(config, None, to_odoo_own=True) == "odoo"
    assert report_destination(config, "bounce+991-mail.mail-17@mycompany.com") == "original"


# --- B3 once more after the reasons migration; B6 the reputation alert ---------------------------

def _store(tmp_path):
    from mailgate.store.sqlite import SQLiteStore
    return SQLiteStore(tmp_path / "store.sqlite3")


def _bounce(recipient: str, days_ago: float, reason: str, *, server: str = "transactional",
            permanent: bool = True) -> BounceRecord:
    return BounceRecord(NOW - days_ago * DAY, recipient, "5.7.1", "failed", permanent, reason, None, None, None,
                        server, "dsn", hard=is_hard(reason, permanent))


def test_reevaluation_frees_an_address_listed_for_bounces_that_no_longer_count(tmp_path, caplog):
    """B3: listed under `count: permanent` for block-list refusals, judged again under the
    default `count: recipient`: it comes off; one listed for unknown users stays; an operator's
    entry is never re-judged. The serve step logs each and takes the task once."""
    import logging
    from types import SimpleNamespace

    from mailgate.commands.serve import reevaluate_once
    store = _store(tmp_path)
    with store.transaction():
        blocked = [store.record_bounce(_bounce("good@big.example", d, "blocked")) for d in (0, 2, 4, 6, 8)]
        gone = [store.record_bounce(_bounce("gone@big.example", d, "userunknown")) for d in (0, 2, 4, 6, 8)]
        store.blacklist_add("good@big.example", NOW, "5 permanent bounces", "rule", blocked)
        store.blacklist_add("gone@big.example", NOW, "5 hard bounces", "rule", gone)
        store.blacklist_add("manual@big.example", NOW, "operator", "operator", [])
    assert reevaluate_blacklist(store, BounceSettings(count="permanent"), NOW) == []
    runtime = SimpleNamespace(store=store, config=SimpleNamespace(bounces=BounceSettings()), clock=lambda: NOW)
    with caplog.at_level(logging.INFO, logger="mailgate"):
        reevaluate_once(runtime, logging.getLogger("mailgate"))
        reevaluate_once(runtime, logging.getLogger("mailgate"))   # the task was taken: nothing again
    assert store.blacklisted(["good@big.example", "gone@big.example", "manual@big.example"]) == {
        "gone@big.example", "manual@big.example"}
    assert caplog.text.count("rcpt=<good@big.example> action=remove reason=re-evaluated") == 1
    assert caplog.text.count("event=blacklist-reevaluation count=recipient removed=1") == 1
    store.close()


def test_reputation_windows_are_fixed_and_shared():
    settings = BounceSettings(reputation_window_minutes=60)
    assert window_start(settings, 7200.0 + 59 * 60) == 7200.0 and window_start(settings, 7200.0) == 7200.0


def test_over_threshold_sums_reasons_per_server_and_domain():
    counts = [SenderSideCount("transactional", "big.example", "blocked", 6),
              SenderSideCount("transactional", "big.example", "spamdetected", 4),
              SenderSideCount("mass", "big.example", "blocked", 9),
              SenderSideCount("transactional", "small.example", "authfailure", 12)]
    assert over_threshold(counts, 10) == [PairCount("transactional", "small.example", "authfailure", 12),
                                          PairCount("transactional", "big.example", "blocked", 10)]


def test_one_reputation_alert_per_window_server_and_domain(tmp_path):
    """B6: 9 sender-side bounces: nothing; the 10th: one alert; more in the window: no more;
    the next window counts again. Recipient-fault bounces never count toward it."""
    store = _store(tmp_path)
    settings = BounceSettings(reputation_threshold=10, reputation_window_minutes=60)
    start = window_start(settings, NOW)
    at = start + 60
    seen = []
    with store.transaction():
        for n in range(25):
            store.record_bounce(replace(_bounce(f"u{n}@big.example", 0, "blocked" if n % 2 else "spamdetected"),
                                        created_at=at + n))
            store.record_bounce(replace(_bounce(f"x{n}@big.example", 0, "userunknown"), created_at=at + n))
            seen.append(alerts_after(store, settings, ["blocked"], at + n))
    assert [n for n, alerts in enumerate(seen) if alerts] == [9]
    alert = seen[9][0]
    assert (alert.server, alert.domain, alert.reason, alert.bounces, alert.window_start) == (
        "transactional", "big.example", "blocked", 10, start)     # 5 and 5: the tie goes alphabetically
    assert alert_fields(alert) == {"event": "reputation", "server": "transactional", "domain": "big.example",
                                   "reason": "blocked", "count": 10}
    later = start + 3600 + 5
    with store.transaction():
        for n in range(10):
            store.record_bounce(replace(_bounce(f"v{n}@big.example", 0, "blocked"), created_at=later))
        assert len(alerts_after(store, settings, ["blocked"], later)) == 1
    assert alerts_after(store, settings, ["userunknown"], later) == []      # no sender-side bounce: no query
    assert new_alerts(store, BounceSettings(reputation_threshold=None), later) == []
    assert len(store.reputation_alerts(0.0)) == 2
    store.close()
