#!/opt/mailgate/bin/python
"""The first purge of a store that never purged: N bounce, N delivery and N message rows spread
over 365 days (so about 3/4 of them are older than the default 91-day windows), purged with the
default configuration. `--shuffled` writes them in random time order (memory.py's generators: the
worst case, old rows scattered over every page); by default they are written oldest first, as a
gateway writes them (old rows then share pages). Reports the rows deleted, the CPU time of the whole purge, and how long
its write transactions took (median and longest: what another writer may have to wait for).

    bench/retention_purge.py [--shuffled] [ROWS ...]      (default 10^5 10^6)
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
from contextlib import contextmanager

from _common import median
from memory import SECONDS_PER_DAY, fill_bounces, fill_deliveries
from stats_indexes import scratch_store

from mailgate.rules.retention import purge_expired


def fill_messages(conn: sqlite3.Connection, rows: int, now: float, rng: random.Random) -> None:
    conn.executemany("insert into messages (direction, queue_id, message_id, envelope_from, server, mass, created_at) "
                     "values ('outbound', ?, ?, 'odoo@mycompany.com', 'transactional', 0, ?)",
                     ((f"{i:011X}", f"<{i}@odoo>", now - rng.random() * 365 * SECONDS_PER_DAY) for i in range(rows)))


class OldestFirst(random.Random):
    """A `random()` that goes down from 1 to 0 over `rows` calls: memory.py's generators
    (`now - random() * 365 days`, one call per row) then write their rows oldest first."""

    def __init__(self, rows: int):
        super().__init__(7)
        self.rows, self.calls = rows, 0

    def random(self) -> float:
        self.calls += 1
        return 1.0 - self.calls / (self.rows + 1)

    def getrandbits(self, k: int) -> int:
        """Defined so that randrange() keeps drawing from getrandbits, not from random()."""
        return super().getrandbits(k)


def measure(rows: int, shuffled: bool) -> None:
    with scratch_store("mgr") as (config, store, conn):
        now = time.time()
        conn.execute("begin")
        for fill in (fill_bounces, fill_deliveries):
            fill(conn, 0, rows, now, random.Random(7) if shuffled else OldestFirst(rows))
        fill_messages(conn, rows, now, random.Random(7) if shuffled else OldestFirst(rows))
        conn.execute("commit")
        cpu_spent: list[float] = []
        durations: list[float] = []
        transaction = store.transaction

        @contextmanager
        def timed_transaction(*keys: str):
            started, started_cpu = time.perf_counter(), time.thread_time()
            with transaction(*keys):
                yield
            durations.append(time.perf_counter() - started)
            cpu_spent.append(time.thread_time() - started_cpu)
        store.transaction = timed_transaction
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        deleted = purge_expired(store, config, now)
        cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started_wall
    print(f"RESULT {rows:>8} rows per table{' (shuffled)' if shuffled else ''}: deleted {deleted}; "
          f"cpu {cpu:.2f} s, wall {wall:.2f} s, "
          f"{len(durations)} transactions: cpu median {median(cpu_spent) * 1000:.1f} ms, longest "
          f"{max(cpu_spent) * 1000:.1f} ms; wall median {median(durations) * 1000:.1f} ms, longest "
          f"{max(durations) * 1000:.1f} ms", flush=True)


def main() -> int:
    shuffled = "--shuffled" in sys.argv[1:]
    for rows in [int(arg) for arg in sys.argv[1:] if arg != "--shuffled"] or [100_000, 1_000_000]:
        measure(rows, shuffled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
