"""The gateway's clock: the rules never read the time themselves, they are given it.

`OffsetClock` lets the end-to-end tests move a running gateway's time forward (past the loop
window, across a day of quota) without sleeping: it adds the number of seconds written in a
file to the real time. It is enabled only by the MAILGATE_CLOCK_OFFSET_FILE environment
variable, which no production unit sets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

OFFSET_FILE_VARIABLE = "MAILGATE_CLOCK_OFFSET_FILE"


class OffsetClock:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self) -> float:
        try:
            offset = float(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            offset = 0.0
        return time.time() + offset


def gateway_clock() -> Callable[[], float]:
    path = os.environ.get(OFFSET_FILE_VARIABLE)
    return OffsetClock(Path(path)) if path else time.time
