"""Whether a running `serve` can do its job: the milter process up, the store taking writes, a
configuration loaded. `/healthz` answers from what is known at that moment and never waits.

The store is proven by a write (`Store.check_writable`) in a thread of its own every few seconds:
a write can wait for the store's busy timeout (5 s for SQLite) or a lock, and a health answer that
waits as long would look like a hung gateway. A probe still waiting past `slow_after` makes the
answer 503 as surely as a failed one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailgate.infra.logfmt import kv_line
from mailgate.infra.runtime import Runtime
from mailgate.rules.replies import HEALTH


@dataclass(frozen=True)
class StoreState:
    ok: bool
    detail: str = ""                  # the error of the last failed probe
    waiting_since: float | None = None  # monotonic start of a probe still under way


class StoreProbe(threading.Thread):
    """Proves the store writable every `every` seconds; `state()` says how the last proof went."""

    def __init__(self, runtime: Runtime, every: float = 3.0, slow_after: float = 2.0) -> None:
        super().__init__(name="health", daemon=True)
        self.runtime, self.every, self.slow_after = runtime, every, slow_after
        self.stopped = threading.Event()
        self._ok, self._detail = True, ""
        self._since: float | None = None
        self._failing = False

    def run(self) -> None:
        while not self.stopped.is_set():
            self._since = time.monotonic()
            try:
                self.runtime.store.check_writable()
            except Exception as exc:  # any failure is the answer: the store does not take writes
                self._ok, self._detail = False, f"{type(exc).__name__}: {exc}"
                if not self._failing:
                    self.runtime.logger.error(kv_line(None, event="health", store="unwritable",
                                                      error=type(exc).__name__, detail=str(exc)))
                self._failing = True
            else:
                if self._failing:
                    self.runtime.logger.info(kv_line(None, event="health", store="writable"))
                self._ok, self._detail, self._failing = True, "", False
            self._since = None
            self.stopped.wait(self.every)

    def state(self) -> StoreState:
        return StoreState(self._ok, self._detail, self._since)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(10)


def health_answer(milter_up: bool, store: StoreState, config_loaded: bool, slow_after: float,
                  now: Callable[[], float] = time.monotonic) -> tuple[bool, str]:
    """(healthy, text): `HEALTH["ok"]`, or every problem as `key: text`, joined by `; `."""
    problems: list[tuple[str, str]] = []
    if not milter_up:
        problems.append(("milter_down", HEALTH["milter_down"]))
    waited = now() - store.waiting_since if store.waiting_since is not None else 0.0
    if waited > slow_after:
        problems.append(("store_slow", HEALTH["store_slow"] + f" {waited:.1f} s"))
    elif not store.ok:
        problems.append(("store_unwritable", HEALTH["store_unwritable"] + f" ({store.detail})"))
    if not config_loaded:
        problems.append(("config_not_loaded", HEALTH["config_not_loaded"]))
    if not problems:
        return True, HEALTH["ok"]
    return False, "; ".join(f"{key}: {text}" for key, text in problems)
