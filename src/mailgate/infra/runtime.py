"""What a running gateway holds: the configuration, the store, the token signer, the clock.

Adapters read `runtime.config` at the start of each request; a reload swaps the whole object at
once, so a request never sees half an old and half a new configuration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailgate.config import Config, Server
from mailgate.configfile.problems import ConfigError, ConfigProblem
from mailgate.infra.clock import gateway_clock
from mailgate.infra.meteredstore import metered
from mailgate.infra.secretfile import (
    MAX_SECRET_FILE_BYTES,
    UnusableFile,
    load_or_create_secret,
    read_password_file,
    read_regular_file,
)
from mailgate.rules.tokens import TokenSigner
from mailgate.store import Store, is_postgres, open_store


class AccessTokens(Protocol):
    """Where the lookup service finds a server's current OAuth access token (`oauth.keeper`)."""

    def current(self, server: Server) -> str | None: ...


def unusable_setting(config: Config, key: str, exc: UnusableFile) -> ConfigError:
    """A file the configuration names that cannot be used at start, reported like the loader's
    problems (`file: key: message`, no line: the Config keeps none), so `serve` exits 78 with it."""
    return ConfigError([ConfigProblem(str(config.source), 0, key, str(exc))])


def read_passwords(config: Config) -> dict[str, tuple[str, str]]:
    """SASL credentials per server name, read once from the password files (ConfigError when one
    cannot be used: the loader checked it, but the file may have changed since)."""
    passwords: dict[str, tuple[str, str]] = {}
    for server in config.servers:
        if server.username and server.password_file:
            try:
                secret = read_password_file(Path(server.password_file))
            except UnusableFile as exc:
                raise unusable_setting(config, f"servers[{server.position}]({server.name}).password_file",
                                       exc) from None
            passwords[server.name] = (server.username, secret)
    return passwords


@dataclass
class Runtime:
    config: Config
    store: Store
    signer: TokenSigner
    passwords: dict[str, tuple[str, str]] = field(default_factory=dict)
    tokens: AccessTokens | None = None
    clock: Callable[[], float] = time.time
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("mailgate"))

    @classmethod
    def from_config(cls, config: Config) -> Runtime:
        """Everything `serve` needs at start; a file it cannot use is a ConfigError (the same
        checks as `check-config`), a store that does not answer is StoreUnavailable."""
        try:
            secret = load_or_create_secret(Path(config.secret_file))
        except UnusableFile as exc:
            raise unusable_setting(config, "secret_file", exc) from None
        passwords = read_passwords(config)
        if config.database_password_file:
            try:
                read_password_file(Path(config.database_password_file))
            except UnusableFile as exc:
                raise unusable_setting(config, "database_password_file", exc) from None
        # serve's checkpointer thread checkpoints the SQLite WAL: never a commit of the milter or the policy
        store = metered(open_store(config.database, config.database_password_file, background_checkpoints=True))
        return cls(config, store, TokenSigner(secret, store.store_id()), passwords, clock=gateway_clock())


def _identity(store: Store | None) -> str:
    """The store's identity for the token signer; "" for a store not yet migrated to carry one
    (read-only here: `serve` migrates it), whose tokens are all of the older kind."""
    if store is None:
        return ""
    try:
        return store.store_id()
    except Exception:  # sqlite3 and psycopg each raise their own "no such table"
        return ""


def read_only_facts(config: Config, now: float | None = None) -> dict[str, Callable]:
    """What `explain inbound` needs from the live gateway, without creating or changing anything.

    With no store file yet, nothing was sent or received; with no readable secret, no token
    can be verified.
    """
    now = time.time() if now is None else now
    since = now - config.loop.minutes * 60
    store: Store | None = None
    if is_postgres(config.database) or Path(config.database).exists():
        store = open_store(config.database, config.database_password_file, read_only=True)
    signer: TokenSigner | None = None
    try:
        signer = TokenSigner(read_regular_file(Path(config.secret_file), MAX_SECRET_FILE_BYTES).strip(),
                             _identity(store))
    except (UnusableFile, ValueError):
        pass
    return {
        "known_outbound": store.known_outbound if store else (lambda ids: None),
        "already_received": store.already_received if store else (lambda message_id: False),
        "recent_count": (lambda s, k: store.recent_count(s, k, since)) if store else (lambda s, k: 0),
        "verify_token": signer.verify if signer else (lambda token: None),
    }
