"""The bounce-token key on disk: made on first start, refused when others may read it."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def load_or_create_secret(path: Path) -> bytes:
    """Read the HMAC key; create it (0600, 32 random bytes) when missing; refuse it world-readable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    if path.stat().st_mode & stat.S_IROTH:
        raise PermissionError(f"{path} is readable by everybody: chmod 0600 it")
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(f"{path} holds fewer than 16 bytes: remove it and a new secret is made")
    return secret
