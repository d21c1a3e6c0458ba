"""When an OAuth access token may be handed to Postfix, and when to ask the provider for a new one
(docs/rules.md A1-A3). Pure: the state of one server's token and the time in, a decision out.

Google's and Microsoft's access tokens live an hour. A token is refreshed well before it
expires, so that mail never waits for the provider; a token about to expire is not handed out at
all, because Postfix logs in with it seconds later (and may keep the session a while). A refresh
that fails is tried again after a delay that doubles up to a ceiling, sooner while mail is waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

REFRESH_AHEAD = 300.0   # seconds before expiry at which a new token is fetched
USABLE_MARGIN = 30.0    # a token with less left is not handed out
RETRY_FIRST = 5.0       # after the first failure; doubles per failure
RETRY_MAX = 300.0


@dataclass(frozen=True)
class TokenState:
    """One server's access token (never logged) and how its refreshes went."""

    access_token: str | None = None
    issued_at: float = 0.0
    expires_at: float = 0.0
    failures: int = 0
    last_attempt: float | None = None
    last_error: str | None = None

    def _lifetime(self) -> float:
        return max(self.expires_at - self.issued_at, 0.0)


def usable(state: TokenState, now: float) -> bool:
    """A1: a token is handed out while more than USABLE_MARGIN (a quarter of its life, for a
    short-lived one) is left."""
    if state.access_token is None:
        return False
    return now < state.expires_at - min(USABLE_MARGIN, state._lifetime() / 4)


def refresh_due(state: TokenState, now: float, mail_waiting: bool = False) -> bool:
    """A2: refresh when there is no token, or REFRESH_AHEAD (half its life, for a short-lived
    one) before it expires; after a failure, once the retry delay has passed (A3)."""
    if state.failures and state.last_attempt is not None:
        return now >= state.last_attempt + retry_delay(state.failures, mail_waiting)
    if state.access_token is None:
        return True
    return now >= state.expires_at - min(REFRESH_AHEAD, state._lifetime() / 2)


def retry_delay(failures: int, mail_waiting: bool = False) -> float:
    """A3: 5 s, 10 s, 20 s ... at most 300 s; 5 s while a lookup found no usable token."""
    if mail_waiting:
        return RETRY_FIRST
    return min(RETRY_FIRST * 2 ** max(failures - 1, 0), RETRY_MAX)


def refreshed(state: TokenState, access_token: str, expires_in: float, now: float) -> TokenState:
    return TokenState(access_token=access_token, issued_at=now, expires_at=now + expires_in, last_attempt=now)


def failed(state: TokenState, error: str, now: float) -> TokenState:
    """The old token stays: it is still good until it expires."""
    return replace(state, failures=state.failures + 1, last_attempt=now, last_error=error)


def starts_streak(before: TokenState, after: TokenState) -> bool:
    """A failure is logged when it starts a streak, or when the provider's error changes."""
    return after.failures == 1 or after.last_error != before.last_error
