"""Following a log file across rotation: where to read next (the rotated file is read to its end
first, found by its inode), complete lines a chunk at a time, each chunk committed with the
position after it."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from mailgate.commands.watchlog.parsing import parse_current
from mailgate.commands.watchlog.recording import CHUNK, Clock, Moved, commit, position_key
from mailgate.config import Config
from mailgate.infra.logfmt import kv_line
from mailgate.store.interface import Store


@dataclass(frozen=True)
class _Spot:
    path: str
    inode: int
    offset: int
    finished: bool               # rotated away and the writer has moved on: a last unterminated line is whole


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _rotated(path: str, inode: int) -> str | None:
    """Where the file we were reading went (`mail.log.1`, `maillog.20261125-221300`, …): the
    sibling with its inode. A compressed copy is a new inode and is not found."""
    folder, name = os.path.split(path)
    try:
        siblings = [e for e in os.scandir(folder or ".") if e.name.startswith(name) and e.name != name]
    except OSError:
        return None
    for entry in siblings:
        try:
            if entry.is_file(follow_symlinks=False) and entry.inode() == inode:
                return entry.path
        except OSError:
            continue
    return None


def _line_ends_at(path: str, offset: int) -> bool:
    if offset == 0:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(offset - 1)
            return handle.read(1) == b"\n"
    except OSError:
        return False


def _next_spot(key: str, saved: tuple[int, int] | None, logger: logging.Logger) -> _Spot | None:
    """Where to read next. After a rotation the old file is read to its end first (found by its
    inode), but only finished once the writer has started the new one: until then it may still
    append to the old file."""
    current = _stat(key)
    if saved is None:
        return _Spot(key, current.st_ino, 0, False) if current else None
    inode, offset = saved
    if current is not None and current.st_ino == inode:
        if current.st_size < offset or not _line_ends_at(key, offset):
            logger.warning(kv_line(None, role="watch-log", file=key, action="reread",
                                   reason="the file was truncated or replaced in place"))
            return _Spot(key, inode, 0, False)
        return _Spot(key, inode, offset, False)
    old = _rotated(key, inode)
    old_stat = _stat(old) if old else None
    moved_on = current is not None and current.st_size > 0
    if old is not None and old_stat is not None and (not moved_on or old_stat.st_size > offset):
        return _Spot(old, inode, offset, moved_on)
    if current is None or not moved_on:
        return None
    if old is None:
        logger.warning(kv_line(None, role="watch-log", file=key, action="rotated",
                               reason=f"the old file (inode {inode}) is gone: lines after byte {offset} are lost"))
    return _Spot(key, current.st_ino, 0, False)


def _read_lines(spot: _Spot) -> tuple[list[str], int] | None:
    """Complete lines from the spot on (at most CHUNK bytes) and the offset after them; None if
    the file changed under us (read again next time)."""
    try:
        with open(spot.path, "rb") as handle:
            if os.fstat(handle.fileno()).st_ino != spot.inode:
                return None
            handle.seek(spot.offset)
            data = handle.read(CHUNK)
    except OSError:
        return None
    cut = data.rfind(b"\n") + 1
    if spot.finished and len(data) < CHUNK:
        cut = len(data)              # the writer has moved on: the unterminated tail is a whole line
    elif cut == 0 and len(data) == CHUNK:
        cut = len(data)              # a "line" longer than a chunk is not Postfix's: step over it
    return [raw.decode("utf-8", "replace") for raw in data[:cut].splitlines()], spot.offset + cut


def _drain(file: str, key: str, store: Store, config: Config, clock: Clock, logger: logging.Logger) -> int:
    count = 0
    while True:
        saved = store.log_position(key)
        spot = _next_spot(file, saved, logger)
        got = _read_lines(spot) if spot else None
        if spot is None or got is None or saved == (spot.inode, got[1]):
            return count
        lines, end = got
        now = clock()
        try:
            commit(store, config, key, saved, (spot.inode, end),
                   [e for e in (parse_current(line, now) for line in lines) if e], now, logger)
        except Moved:
            continue
        count += len(lines)


def follow(path: str, store: Store, config: Config, *, once: bool = False, poll: float = 0.5,
           stop: threading.Event | None = None, clock: Clock = time.time,
           logger: logging.Logger | None = None) -> int:
    """Follow a Postfix log file from the saved position; `once` reads what is there and returns.
    Returns the number of lines consumed."""
    file, key = os.path.abspath(path), position_key(path)
    logger = logger or logging.getLogger("mailgate")
    total = 0
    while True:
        total += _drain(file, key, store, config, clock, logger)
        if once or (stop is not None and stop.is_set()):
            return total
        if stop is not None:
            stop.wait(poll)
        else:
            time.sleep(poll)
