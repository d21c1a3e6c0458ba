"""Files written by the import: the YAML and the password files, each written whole or not at all
with its mode (0600 for a password) from the start."""

from __future__ import annotations

import os
from pathlib import Path


def write_secrets(directory: Path, secrets: dict[Path, str]) -> None:
    if not secrets:
        return
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, password in secrets.items():
        write_text(path, password, 0o600)


def write_text(path: Path, text: str, mode: int) -> None:
    """Write through a temporary file in the same folder, created with `mode`, then rename."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
