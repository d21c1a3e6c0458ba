"""What a running gateway holds: the configuration, the store, the token signer, the clock.

Adapters read `runtime.config` at the start of each request; a reload swaps the whole object at
once, so a request never sees half an old and half a new configuration.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mailgate.config import Config
from mailgate.store import Store, open_store
from mailgate.tokens import TokenSigner, load_or_create_secret


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
    def from_config(cls, config: Config) -> "Runtime":
        secret = load_or_create_secret(Path(config.secret_file))
        return cls(config, open_store(config.database), TokenSigner(secret), read_passwords(config))
