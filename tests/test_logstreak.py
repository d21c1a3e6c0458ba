"""A failure's traceback once per streak (`TracebackStreak`), its line every time."""

from __future__ import annotations

import pytest

from mailgate.infra.logfmt import TracebackStreak


def failure(kind: type[Exception] = OSError) -> Exception:
    try:
        raise kind("database or disk is full")
    except Exception as exc:
        return exc


def other_statement() -> Exception:
    try:
        raise OSError("database or disk is full")
    except Exception as exc:
        return exc


def test_the_traceback_starts_a_streak_only() -> None:
    now = [0.0]
    streak = TracebackStreak(quiet_seconds=60, clock=lambda: now[0])
    assert streak.first(failure()) is True
    assert [streak.first(failure()) for _ in range(5)] == [False] * 5
    streak.succeeded()
    assert streak.first(failure()) is True           # a success ended the streak
    assert streak.first(failure(ValueError)) is True  # another failure is another streak
    assert streak.first(other_statement()) is True    # so is the same one raised elsewhere
    now[0] += 61
    assert streak.first(other_statement()) is True    # a quiet minute ends it too


@pytest.mark.parametrize("successes_between", [0, 1])
def test_policy_store_failures_log_one_traceback_per_streak(successes_between: int, tmp_path, monkeypatch,
                                                            caplog) -> None:
    """The policy service with a store whose writes fail (a full disk): a line per batch, the
    traceback once until a batch succeeds again."""
    import logging
    import sqlite3

    from mailgate.configfile import parse_config
    from mailgate.infra.runtime import Runtime
    from mailgate.policy.attributes import PolicyRequest
    from mailgate.policy.recipients import GatewayPolicy
    from mailgate.rules.tokens import TokenSigner
    from mailgate.store.sqlite import SQLiteStore

    config = parse_config("alias_domain: mycompany.com\nquota: {daily: 100}\n", "<test>", check_files=False).config
    store = SQLiteStore(tmp_path / "store.sqlite3")
    policy = GatewayPolicy(Runtime(config, store, TokenSigner(b"0123456789abcdef0123456789abcdef")))
    request = PolicyRequest({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                             "sender": "odoo@a.example", "recipient": "r@customer.example"})
    real_take = store.quota_take_many

    def full(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with caplog.at_level(logging.INFO):
        monkeypatch.setattr(store, "quota_take_many", full)
        policy(request), policy(request)
        if successes_between:
            monkeypatch.setattr(store, "quota_take_many", real_take)
            policy(request)
            monkeypatch.setattr(store, "quota_take_many", full)
        policy(request)
    errors = [r for r in caplog.records if "role=error" in r.getMessage()]
    assert len(errors) == 3
    assert [bool(r.exc_info) for r in errors] == [True, False, bool(successes_between)]
    store.close()
