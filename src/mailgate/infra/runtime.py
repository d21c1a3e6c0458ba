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

from mailgate.config import Config
from mailgate.infra.clock import gateway_clock
from mailgate.infra.secretfile import load_or_create_secret
from mailgate.rules.tokens import TokenSigner
from mailgate.store import Store, is_postgres, open_store


def read_passwords(config: Config) -> dict[str, tuple[str, str]]:
    """SASL credentials per server name, read once from the password files."""
    passwords: dict[str, tuple[str, str]] = {}
    for server in config.servers:
        if server.username and server.password_file:
            secret = Path(server.password_file).read_text(encoding="utf-8").strip()
            passwords[server.name] = (server.username, secret)
    return passwords


@dataclass
class Runtime:
    config: Config
    store: Store
    signer: TokenSigner
    passwords: dict[str, tuple[str, str]] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("mailgate"))

    @classmethod
    def from_config(cls, config: Config) -> Runtime:
        secret = load_or_create_secret(Path(config.secret_file))
        store = open_store(config.database, config.database_password_file)
        return cls(config, store, TokenSigner(secret, store.store_id()), read_passwords(config),
                   clock=gateway_clock())


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
        signer = TokenSigner(Path(config.secret_file).read_bytes().strip(), _identity(store))
    except (OSError, ValueError):
        pass
    return {
        "known_outbound": store.known_outbound if store else (lambda ids: None),
        "already_received": store.already_received if store else (lambda message_id: False),
        "recent_count": (lambda s, k: store.recent_count(s, k, since)) if store else (lambda s, k: 0),
        "verify_token": signer.verify if signer else (lambda token: None),
    }
