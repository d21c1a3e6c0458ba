"""docs/rules.md B2-B3 and Q as tables: the blacklist rule, stale tokens, where reports go, the quota."""

from __future__ import annotations

import pytest

from mailgate.config import BounceSettings
from mailgate.configfile import parse_config
from mailgate.rules.bounces import blacklist_verdict, report_destination, token_is_stale
from mailgate.rules.quota import quota_allows, quota_key, quota_limit
from mailgate.rules.tokens import TokenSigner
from mailgate.store.interface import BounceFact

DAY = 86400.0
NOW = 2_000_000_000.0


def facts(*days_ago: float, permanent: bool | None = True) -> list[BounceFact]:
    return [BounceFact(i, NOW - d * DAY, permanent) for i, d in enumerate(days_ago)]


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
    assert sorted(verdict.bounce_ids) == [0, 1, 2, 3, 4] and "5 hard bounces" in verdict.reason


def test_documented_window_of_thirty_days():
    assert blacklist_verdict(facts(0, 10, 20, 25, 40), BounceSettings(window_days=91), NOW).due
    assert not blacklist_verdict(facts(0, 10, 20, 25, 40), BounceSettings(window_days=30), NOW).due


@pytest.mark.parametrize("permanent, count_soft, due", [
    (True, False, True), (False, False, False), (None, False, False), (False, True, True), (None, True, True),
])
def test_soft_bounces_count_only_with_count_soft(permanent, count_soft, due):
    verdict = blacklist_verdict(facts(0, 2, 4, 6, 8, permanent=permanent), BounceSettings(count_soft=count_soft), NOW)
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
