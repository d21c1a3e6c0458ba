"""The store as `serve` uses it: every operation timed and every failure counted, by name.

A thin wrapper rather than calls sprinkled through the adapters: each store method is wrapped
once, on first use, and the wrapper is then an ordinary attribute of the instance, so a call
costs two clock reads and one histogram update more. `transaction()` is timed from BEGIN to
COMMIT and counts an error when either fails (what fails in its body is counted by the body's
own operation).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, cast

from mailgate.infra.metrics import STORE_ERRORS, STORE_SECONDS, bound
from mailgate.store.interface import Store

UNTIMED = frozenset({"close", "store_id", "schema_version"})


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
        return _transaction(self.inner, lock_keys)


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


@contextmanager
def _transaction(store: Store, lock_keys: tuple[str, ...]) -> Iterator[None]:
    seconds, errors = bound(STORE_SECONDS, "transaction"), bound(STORE_ERRORS, "transaction")
    start = time.perf_counter()
    manager = store.transaction(*lock_keys)
    try:
        try:
            manager.__enter__()
        except Exception:
            errors.inc()
            raise
        try:
            yield
        except BaseException as exc:
            if not manager.__exit__(type(exc), exc, exc.__traceback__):
                raise
            return
        try:
            manager.__exit__(None, None, None)
        except Exception:
            errors.inc()
            raise
    finally:
        seconds.observe(time.perf_counter() - start)


def metered(store: Store) -> Store:
    return cast(Store, MeteredStore(store))
