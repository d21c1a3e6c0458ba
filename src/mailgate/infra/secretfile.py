"""The files mailgate reads secrets from: the bounce-token key (made on first start) and the
password files; and the bounded read of any file an operator names (the configuration too).

`check-config` and `serve` use the same functions here, so a file `check-config` accepts is one
`serve` can use: every refusal is an UnusableFile whose message names the file and says why, for
the caller to print as one line, never as a traceback.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

MIN_SECRET_BYTES = 16
# A password or a key is a line; anything bigger is the wrong file (or /dev/zero).
MAX_SECRET_FILE_BYTES = 64 * 1024

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


class UnusableFile(Exception):
    """A file mailgate must read (or make) cannot be used; the message names it and says why."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _unreadable(path: Path, exc: OSError) -> str:
    """Why a file did not open: a socket file, say, opens with "No such device or address"."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG
    if not stat.S_ISREG(mode):
        return f"{path} is {_kind(mode)}, not a regular file"
    return f"cannot read {path}: {exc.strerror or exc}"


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most `max_bytes`.

    A directory, a device (/dev/zero never ends) or a named pipe (whose open blocks until a
    writer comes) is refused before anything is read, and the read itself stops at the bound."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnusableFile(f"no such file: {path}") from None
    except OSError as exc:
        raise UnusableFile(_unreadable(path, exc)) from None
    try:
        mode, size = (st := os.fstat(fd)).st_mode, st.st_size
        if not stat.S_ISREG(mode):
            raise UnusableFile(f"{path} is {_kind(mode)}, not a regular file")
        if size > max_bytes:
            raise UnusableFile(f"{path} is too big: {size} bytes, at most {max_bytes}")
        chunks: list[bytes] = []
        remaining = max_bytes + 1
        while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 20))):
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise UnusableFile(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise UnusableFile(f"{path} is too big: more than {max_bytes} bytes")
    return data


def read_secret_file(path: Path) -> bytes:
    """A key or password file: regular, small, and not readable by everybody."""
    data = read_regular_file(path, MAX_SECRET_FILE_BYTES)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise UnusableFile(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & stat.S_IROTH:
        raise UnusableFile(f"{path} is readable by everybody: chmod 0640 (or 0600) it")
    return data


def read_password_file(path: Path) -> str:
    """The password a file holds (its first and only line, spaces around it dropped)."""
    try:
        return read_secret_file(path).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UnusableFile(f"{path} is not UTF-8 text") from None


def _checked_key(path: Path, data: bytes) -> bytes:
    key = data.strip()
    if len(key) < MIN_SECRET_BYTES:
        raise UnusableFile(f"{path} holds {len(key)} bytes, fewer than {MIN_SECRET_BYTES}: "
                           "remove it and a new secret is made at the next start")
    return key


def bounce_key_problem(path: Path) -> str | None:
    """Why `load_or_create_secret` would fail on `path`, without creating anything; None if it
    would not: an existing key must be readable and long enough, a missing one makeable."""
    if not os.path.lexists(path):
        parent = path.parent
        if not parent.is_dir():
            return f"{path} does not exist and cannot be made: no directory {parent}"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{path} does not exist and cannot be made: {parent} is not writable by this user"
        return None
    try:
        _checked_key(path, read_secret_file(path))
    except UnusableFile as exc:
        return str(exc)
    return None


def load_or_create_secret(path: Path) -> bytes:
    """Read the HMAC key; create it (0600, 32 random bytes) when missing; refuse it world-readable,
    short, or anything but a small regular file (UnusableFile)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise UnusableFile(f"{path} does not exist and cannot be made: no directory {path.parent}") from None
    except OSError as exc:
        raise UnusableFile(f"{path} does not exist and cannot be made: {exc.strerror or exc}") from None
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    return _checked_key(path, read_secret_file(path))
