"""The refresh token on disk: read as a password file is, written back atomically when the
provider rotates it (Microsoft does on every refresh), so a crash never leaves half a token."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mailgate.infra.secretfile import read_password_file


def read_refresh_token(path: Path) -> str:
    return read_password_file(path)


def write_refresh_token(path: Path, token: str) -> None:
    """Replace the file's content with `token`: a new file beside it (same owner, mode 0600 or
    the old one's, whichever is stricter), synced, renamed over it."""
    path = Path(path)
    try:
        old = path.stat()
        mode, owner = old.st_mode & 0o660 or 0o600, (old.st_uid, old.st_gid)
    except FileNotFoundError:
        mode, owner = 0o600, None
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(staged, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(staged)
        raise
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
