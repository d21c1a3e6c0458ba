"""The token keeper: one thread that keeps every XOAUTH2 server's access token fresh.

The lookup service runs on an event loop that must answer in microseconds, so it never talks to a
provider: it asks `current()`, which reads what the keeper holds. A lookup that finds no usable
token answers TEMP (Postfix defers the message) and wakes the keeper, which refreshes at once.
The keeper also refreshes ahead of expiry (rules.oauth), writes a rotated refresh token back,
and logs one line per refresh and one per failure streak; never a token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from mailgate.config import Config, Server
from mailgate.infra.logfmt import kv_line
from mailgate.infra.secretfile import UnusableFile
from mailgate.oauth.exchange import Grant, TokenError, refresh_grant
from mailgate.oauth.refresh import refresh
from mailgate.oauth.storage import write_refresh_token
from mailgate.rules.oauth import TokenState, failed, refresh_due, refreshed, starts_streak, usable

Exchange = Callable[..., Grant]
TICK = 1.0


class TokenKeeper:
    """Access tokens per server, refreshed in a thread of their own (`start`/`stop`)."""

    def __init__(self, config: Callable[[], Config], clock: Callable[[], float], logger: logging.Logger,
                 exchange: Exchange = refresh_grant, tick: float = TICK) -> None:
        self._config, self._clock, self._logger, self._exchange, self._tick = config, clock, logger, exchange, tick
        self._states: dict[tuple[str, object], TokenState] = {}
        self._waiting: set[str] = set()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _key(server: Server) -> tuple[str, object]:
        """A server whose oauth block changes (a reload) starts again with no token."""
        return server.name, server.oauth

    def current(self, server: Server) -> str | None:
        """The access token to log in with now, or None (and the keeper is woken)."""
        state = self._states.get(self._key(server))
        if state is not None and usable(state, self._clock()):
            return state.access_token
        self._waiting.add(server.name)
        self._wake.set()
        return None

    def refresh_all(self) -> None:
        """One pass: refresh every server whose token is due (called by the thread, and by tests)."""
        config = self._config()
        waiting, self._waiting = self._waiting, set()
        for server in config.servers:
            if server.oauth is None:
                continue
            key = self._key(server)
            state = self._states.get(key, TokenState())
            if refresh_due(state, self._clock(), server.name in waiting):
                self._states[key] = self._refresh(server, state)
        live = {self._key(s) for s in config.servers}
        for stale in [k for k in self._states if k not in live]:
            del self._states[stale]

    def _refresh(self, server: Server, state: TokenState) -> TokenState:
        oauth = server.oauth
        assert oauth is not None
        try:
            done = refresh(oauth, self._exchange)
        except (TokenError, UnusableFile, ValueError) as exc:
            if isinstance(exc, TokenError):
                error, detail = exc.error, exc.description
            else:
                error, detail = ("unusable_file" if isinstance(exc, UnusableFile) else "config"), str(exc)
            now = self._clock()
            after = failed(state, error, now)
            if starts_streak(state, after):
                meanwhile = ("the current token serves until it expires" if usable(state, now)
                             else "mail for this server is deferred until a refresh succeeds")
                self._logger.error(kv_line(None, event="oauth", server=server.name, result="refresh-failed",
                                           provider=oauth.provider, error=error, detail=detail, next=meanwhile))
            return after
        grant, rotated = done.grant, done.rotated
        if rotated:
            assert grant.refresh_token is not None
            self._save_rotated(server, grant.refresh_token)
        recovered = {"after_failures": state.failures} if state.failures else {}
        self._logger.info(kv_line(None, event="oauth", server=server.name, result="refreshed",
                                  expires_in=int(grant.expires_in), rotated=rotated, **recovered))
        return refreshed(state, grant.access_token, grant.expires_in, self._clock())

    def _save_rotated(self, server: Server, token: str) -> None:
        assert server.oauth is not None
        try:
            write_refresh_token(Path(server.oauth.refresh_token_file), token)
        except OSError as exc:
            self._logger.error(kv_line(None, event="oauth", server=server.name, result="rotate-failed",
                                       file=server.oauth.refresh_token_file, detail=exc.strerror or str(exc)))

    # -- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="oauth-tokens", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.refresh_all()
            except Exception as exc:  # the next pass tries again; serving goes on
                self._logger.error(kv_line(None, event="oauth", error=type(exc).__name__, detail=str(exc)[:200]))
            self._wake.wait(self._tick)
            self._wake.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(15)
