"""When a token is handed out and when it is refreshed (docs/rules.md A1-A3): pure, no clock."""

from __future__ import annotations

import pytest

from mailgate.rules.oauth import (
    REFRESH_AHEAD,
    RETRY_MAX,
    TokenState,
    failed,
    refresh_due,
    refreshed,
    retry_delay,
    starts_streak,
    usable,
)

T0 = 1_800_000_000.0
HOUR = refreshed(TokenState(), "tok", 3600, T0)


@pytest.mark.parametrize("now, is_usable, due", [
    (T0, True, False),
    (T0 + 3600 - REFRESH_AHEAD - 1, True, False),
    (T0 + 3600 - REFRESH_AHEAD, True, True),      # refreshed ahead, still handed out meanwhile
    (T0 + 3600 - 31, True, True),
    (T0 + 3600 - 30, False, True),               # too close to expiry for Postfix to log in with
    (T0 + 3600, False, True),
])
def test_an_hour_long_token(now, is_usable, due):
    assert usable(HOUR, now) is is_usable
    assert refresh_due(HOUR, now) is due


def test_no_token_is_due_at_once_and_never_usable():
    assert refresh_due(TokenState(), T0) and not usable(TokenState(), T0)


def test_a_short_lived_token_is_refreshed_at_half_its_life():
    short = refreshed(TokenState(), "tok", 40, T0)
    assert not refresh_due(short, T0 + 19) and refresh_due(short, T0 + 20)
    assert usable(short, T0 + 29) and not usable(short, T0 + 30)


def test_failures_back_off_and_keep_the_old_token():
    after = failed(HOUR, "unreachable", T0 + 3400)
    assert after.access_token == "tok" and usable(after, T0 + 3400)
    assert not refresh_due(after, T0 + 3404) and refresh_due(after, T0 + 3405)
    assert [retry_delay(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert retry_delay(30) == RETRY_MAX
    assert retry_delay(30, mail_waiting=True) == 5
    many = failed(failed(failed(HOUR, "x", T0), "x", T0), "x", T0)
    assert not refresh_due(many, T0 + 19) and refresh_due(many, T0 + 19, mail_waiting=True)


def test_a_streak_is_logged_once_unless_the_error_changes():
    one = failed(HOUR, "invalid_grant", T0)
    two = failed(one, "invalid_grant", T0 + 5)
    three = failed(two, "unreachable", T0 + 15)
    assert starts_streak(HOUR, one) and not starts_streak(one, two) and starts_streak(two, three)
    back = refreshed(three, "new", 3600, T0 + 40)
    assert back.failures == 0 and starts_streak(back, failed(back, "invalid_grant", T0 + 50))
