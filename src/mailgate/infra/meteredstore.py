"""The store as `serve` uses it: every operation timed and every failure counted, by name.

A thin wrapper rather than calls sprinkled through the adapters: each store method is wrapped
once, on first use, and the wrapper is then an ordinary attribute of the instance, so a call
costs two clock reads and one histogram update more. `transaction()` is timed from BEGIN to
COMMIT and counts an error when either fails (what fails in its body is counted by the body's
own operation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, cast

from mailgate.infra.metrics import STORE_ERRORS, STORE_SECONDS, bound
from mailgate.store.interface import Store

UNTIMED = frozenset({"close", "store_id", "schema_version"})
TRANSACTION_SECONDS, TRANSACTION_ERRORS = bound(STORE_SECONDS, "transaction"), bound(STORE_ERRORS, "transaction")


class MeteredStore:
    """Delegates to `store`; the methods of the Store protocol are timed, anything else passes."""

    def __init__(self, store: Store) -> None:
        self.inner = store

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name.startswith("_") or name in UNTIMED or not callable(value):
            return value
        timed = self._timed_transaction if name == "transaction" else _timed(name, value)
        setattr(self, name, timed)
        return timed

    def _timed_transaction(self, *lock_keys: str) -> AbstractContextManager[None]:
        return _TimedTransaction(self.inner.transaction(*lock_keys))


def _timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    seconds, errors = bound(STORE_SECONDS, name), bound(STORE_ERRORS, name)
    clock = time.perf_counter

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return method(*args, **kwargs)
        except Exception:
            errors.inc()
            raise
        finally:
            seconds.observe(clock() - start)

    return timed


class _TimedTransaction:
    """The store's transaction, timed from BEGIN to the end of COMMIT (or ROLLBACK); an error
    counted when BEGIN fails or when ending it raises (a failed COMMIT or ROLLBACK). A class, not
    a generator: it runs once per message and per policy batch."""

    __slots__ = ("manager", "start")

    def __init__(self, manager: AbstractContextManager[None]) -> None:
        self.manager = manager
        self.start = 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        try:
            self.manager.__enter__()
        except Exception:
            TRANSACTION_ERRORS.inc()
            TRANSACTION_SECONDS.observe(time.perf_counter() - self.start)
            raise

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> bool | None:
        try:
            return self.manager.__exit__(kind, exc, traceback)
        except BaseException as raised:
            if raised is not exc:
                TRANSACTION_ERRORS.inc()
            raise
        finally:
            TRANSACTION_SECONDS.observe(time.perf_counter() - self.start)


def metered(store: Store) -> Store:
    return cast(Store, MeteredStore(store))
