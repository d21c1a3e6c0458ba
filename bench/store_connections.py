#!/opt/mailgate/bin/python
"""What a SQLite connection per thread costs: `record_outbound` in a fresh thread, as libmilter
calls the store (one thread per Postfix connection), against the same call on a kept connection.

    bench/store_connections.py [CALLS]      (default 2,000)

CPU time, not wall time, so that a busy machine (other benchmarks, other test runs) shifts the
figures less: `thread CPU` is `time.thread_time()` of the calling thread around the store call
alone; `process CPU` is `time.process_time()` per iteration, thread start and join included.
Medians of 3 runs of CALLS calls each.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import median

from mailgate.store import OutboundRecord
from mailgate.store.sqlite import SQLiteStore


def record(now: float) -> OutboundRecord:
    return OutboundRecord(queue_id="Q", message_id="<m@x>", envelope_from_original="odoo@mycompany.com",
                          envelope_from="bounce@mycompany.com", header_from_before="<odoo@mycompany.com>",
                          header_from_after="<odoo@mycompany.com>", server="transactional", mass=False,
                          listener="ORIGINATING", sasl_user=None, created_at=now)


def in_fresh_threads(store: SQLiteStore, row: OutboundRecord, calls: int) -> tuple[float, float]:
    """(thread CPU µs of the store call, process CPU µs per iteration), each call in a new thread."""
    spent: list[float] = []

    def work() -> None:
        start = time.thread_time()
        store.record_outbound(row)
        spent.append(time.thread_time() - start)

    start = time.process_time()
    for _ in range(calls):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    process = (time.process_time() - start) / calls
    return sum(spent) / calls * 1e6, process * 1e6


def empty_threads(calls: int) -> float:
    """Process CPU µs per thread start and join alone (what libmilter costs before the store)."""
    start = time.process_time()
    for _ in range(calls):
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
    return (time.process_time() - start) / calls * 1e6


def on_kept_connection(store: SQLiteStore, row: OutboundRecord, calls: int) -> float:
    start = time.thread_time()
    for _ in range(calls):
        store.record_outbound(row)
    return (time.thread_time() - start) / calls * 1e6


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory(prefix="mgc") as base:
        store = SQLiteStore(Path(base) / "store.sqlite3")
        row = record(time.time())
        store.record_outbound(row)
        kept = median([on_kept_connection(store, row, calls) for _ in range(3)])
        fresh = [in_fresh_threads(store, row, calls) for _ in range(3)]
        empty = median([empty_threads(calls) for _ in range(3)])
        store.close()
    print(f"# {calls} calls x 3 runs, medians; store module {SQLiteStore.__module__} "
          f"({sys.modules[SQLiteStore.__module__].__file__})")
    print(f"RESULT record_outbound kept connection        thread CPU {kept:7.1f} us")
    print(f"RESULT thread start+join alone                process CPU per thread {empty:7.1f} us")
    print(f"RESULT record_outbound in a fresh thread      thread CPU {median([f[0] for f in fresh]):7.1f} us   "
          f"process CPU per thread {median([f[1] for f in fresh]):7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
