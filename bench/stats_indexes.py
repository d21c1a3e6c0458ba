#!/opt/mailgate/bin/python
"""What would speed up the operator views: the store's stats queries on N rows, as they are, then
with one grouped pass, then with covering indexes (the experiment behind RESULTS.md section 5, 9).

    bench/stats_indexes.py [ROWS]      (default 1,000,000)

Uses memory.py's row generators on a scratch store made by mailgate.store.SQLiteStore; the
indexes are created on the scratch file only.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import sys
import time

from _common import bench_config, median
from memory import fill_bounces, fill_deliveries

from mailgate.configfile import load_config
from mailgate.lab.postfix import make_basedir
from mailgate.store import SQLiteStore

ONE_PASS = ("select date(created_at, 'unixepoch') as day, coalesce(server, '-') as server, permanent, "
            "substr(recipient, instr(recipient, '@') + 1) as domain, count(*) from bounces where created_at >= ? "
            "group by 1, 2, 3, 4")
COVERING = ("create index bench_bounces_stats on bounces(created_at, permanent, server, recipient)",
            "create index bench_deliveries_stats on deliveries(at, server, status)",
            "create index bench_deliveries_totals on deliveries(server, status)")


def timed(call, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return median(times) * 1000


def main() -> int:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    base = make_basedir("mgq")
    try:
        config = load_config(bench_config(base, "q", 2525)).config
        store = SQLiteStore(config.database)
        conn = sqlite3.connect(config.database, isolation_level=None)
        now = time.time()
        rng = random.Random(7)
        conn.execute("begin")
        fill_bounces(conn, 0, rows, now, rng)
        fill_deliveries(conn, 0, rows, now, rng)
        conn.execute("commit")
        week = now - 7 * 86400
        before = (timed(lambda: store.bounce_stats(0.0)), timed(lambda: store.bounce_stats(week)),
                  timed(lambda: store.delivery_stats(0.0)), timed(lambda: store.delivery_totals()))
        one_pass = timed(lambda: conn.execute(ONE_PASS, [0.0]).fetchall())
        for sql in COVERING:
            conn.execute(sql)
        conn.execute("analyze")
        after = (timed(lambda: store.bounce_stats(0.0)), timed(lambda: store.bounce_stats(week)),
                 timed(lambda: store.delivery_stats(0.0)), timed(lambda: store.delivery_totals()))
        one_pass_covered = timed(lambda: conn.execute(ONE_PASS, [0.0]).fetchall())
        plans = ["; ".join(r[3] for r in conn.execute("explain query plan " + sql, params)) for sql, params in (
            (ONE_PASS, [0.0]),
            ("select coalesce(server, '-'), status, count(*) from deliveries group by 1, 2", []))]
        store.close()
        conn.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    names = ("bounce_stats(all)", "bounce_stats(7d)", "delivery_stats(all)", "delivery_totals")
    print(f"# {rows} bounce and delivery rows over 365 days; median of 3, ms")
    for name, a, b in zip(names, before, after):
        print(f"RESULT {name:<20} now {a:9.1f} ms   covering indexes {b:9.1f} ms   x{a / b:.1f}")
    print(f"RESULT bounce_stats as one grouped pass: {one_pass:.1f} ms; with the covering index {one_pass_covered:.1f} ms")
    for text in plans:
        print(f"PLAN {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
