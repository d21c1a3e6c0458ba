#!/opt/mailgate/bin/python
"""The operator views' queries on N bounce and N delivery rows, in process, on whatever schema the
store in PYTHONPATH makes (run it once on the old tree and once on the new one to compare).

    bench/stats_indexes.py [ROWS ...]      (default 10^4 10^5 10^6)

Rows are spread over 365 days (memory.py's generators, fixed seed) and written by SQL into a
scratch store made by mailgate.store.SQLiteStore; no ANALYZE, as on a real gateway. Each query is
timed 3 times (median, CPU ms of this process and wall ms), and its query plan is printed.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from _common import bench_config, median
from memory import fill_bounces, fill_deliveries

from mailgate.config import Config
from mailgate.configfile import load_config
from mailgate.lab.postfix import make_basedir
from mailgate.store.sqlite import SQLiteStore

DAY = 86400.0


def timed(call, repeat: int = 3) -> tuple[float, float]:
    """(median CPU ms, median wall ms) of `repeat` calls."""
    cpu, wall = [], []
    for _ in range(repeat):
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        call()
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started_wall)
    return median(cpu) * 1000, median(wall) * 1000


def queries(store: SQLiteStore, now: float) -> dict:
    week, window = now - 7 * DAY, now - 91 * DAY
    found = {
        "bounce_stats(all)": lambda: store.bounce_stats(0.0),
        "bounce_stats(91d)": lambda: store.bounce_stats(window),
        "bounce_stats(7d)": lambda: store.bounce_stats(week),
        "delivery_stats(all)": lambda: store.delivery_stats(0.0),
        "delivery_stats(91d)": lambda: store.delivery_stats(window),
        "delivery_stats(7d)": lambda: store.delivery_stats(week),
        "delivery_totals": store.delivery_totals,
    }
    if hasattr(store, "bounce_kind_totals"):
        found["bounce_kind_totals"] = store.bounce_kind_totals
    else:
        found["bounce_kind_totals"] = lambda: store.bounce_stats(0.0)["per_kind"]
    return found


def plans(store: SQLiteStore, call) -> list[str]:
    """The query plan of every statement `call` runs (captured with a trace callback)."""
    statements: list[str] = []
    conn = store._db().conn
    conn.set_trace_callback(statements.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    return ["; ".join(row[3] for row in conn.execute("explain query plan " + sql)) for sql in statements]


@contextmanager
def scratch_store(prefix: str) -> Iterator[tuple[Config, SQLiteStore, sqlite3.Connection]]:
    """The bench configuration, a fresh store made by SQLiteStore and a plain connection to fill
    it by SQL; everything is removed afterwards."""
    base = make_basedir(prefix)
    try:
        config = load_config(bench_config(base, prefix, 2525)).config
        store = SQLiteStore(config.database)
        conn = sqlite3.connect(config.database, isolation_level=None)
        try:
            yield config, store, conn
        finally:
            conn.close()
            store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def measure(rows: int) -> None:
    with scratch_store("mgq") as (_, store, conn):
        now = time.time()
        rng = random.Random(7)
        conn.execute("begin")
        fill_bounces(conn, 0, rows, now, rng)
        fill_deliveries(conn, 0, rows, now, rng)
        conn.execute("commit")
        print(f"# {rows} bounce and {rows} delivery rows over 365 days, schema version {store.schema_version}; "
              "median of 3", flush=True)
        for name, call in queries(store, now).items():
            cpu, wall = timed(call)
            print(f"RESULT {rows:>8} {name:<20} cpu {cpu:9.1f} ms   wall {wall:9.1f} ms", flush=True)
            for plan in dict.fromkeys(plans(store, call)):
                print(f"PLAN   {rows:>8} {name:<20} {plan}")


def main() -> int:
    for rows in [int(arg) for arg in sys.argv[1:]] or [10_000, 100_000, 1_000_000]:
        measure(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
