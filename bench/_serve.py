"""`mailgate …` with an experimental patch applied first (benchmarks only).

    _serve.py --nodelay serve --config FILE
    _serve.py --count-lookups OUT serve --config FILE
    _serve.py --nodelay --data-reply serve --config FILE
    _serve.py --fast serve --config FILE
    _serve.py --tracemalloc OUT serve --config FILE
    _serve.py --traceback serve --config FILE

`--nodelay`: right after mailgate's milter opens its socket (mailgate.milter.app.serve_milter
calls `Milter.milter.opensocket`), set TCP_NODELAY on the listening socket, so every accepted
Postfix connection has it — the proposed fix for the inet: stall, measured without touching src/.
`--data-reply`: negotiate the DATA event with a reply (GatewayMilter.data without @nocallback).
`--fast`: the proposed CPU fixes (see apply_cpu_fixes).
`--traceback`: log the traceback of an internal error in the milter at ERROR (mailgate: DEBUG).
`--tracemalloc OUT`: Python allocations that grew since 15 s after start, written to OUT at exit.
`--count-lookups OUT`: count the socketmap lookups by map and kind of key, written to OUT at exit.
"""

from __future__ import annotations

import os
import sys

import Milter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _nodelay import set_nodelay_on_listeners  # noqa: E402


def apply_cpu_fixes() -> None:
    """The CPU fixes proposed in bench/RESULTS.md, as patches, to measure what they would give:

    1. parse_mailboxes memoised (mailgate.addresses): the same few From headers come back all day,
       and the email package's header registry costs ~100 us per call, twice per message.
    2. SQLite connections reused across libmilter's threads (mailgate.store.sqlite.SQLiteStore._db):
       libmilter starts a thread per Postfix connection, so a thread-local connection is opened
       (~0.5 ms with its PRAGMAs) for nearly every message. Here a thread's connection goes back
       to a free list when the thread ends, and the next thread takes it.
    """
    import functools

    import mailgate.addresses
    import mailgate.milter.outbound
    import mailgate.outbound
    from mailgate.store.sqlite import SQLiteStore

    original_parse = mailgate.addresses.parse_mailboxes

    @functools.lru_cache(maxsize=4096)
    def cached(value):
        boxes = original_parse(value)
        return None if boxes is None else tuple(boxes)

    def parse_mailboxes(value):
        boxes = cached(value)
        return None if boxes is None else list(boxes)

    for module in (mailgate.addresses, mailgate.outbound, mailgate.milter.outbound):
        if getattr(module, "parse_mailboxes", None) is original_parse:
            module.parse_mailboxes = parse_mailboxes

    original_db = getattr(SQLiteStore, "_db", None)
    if original_db is None or not hasattr(SQLiteStore(":memory:"), "_local"):
        print("bench: SQLiteStore has no thread-local _db any more; connection reuse not patched",
              file=sys.stderr, flush=True)
        return

    class _Lease:
        """Held in the thread's local storage; returns the connection when the thread ends."""

        def __init__(self, pool: list, db) -> None:
            self.pool, self.db = pool, db

        def __del__(self) -> None:
            self.pool.append(self.db)

    def _db(self):
        lease = getattr(self._local, "lease", None)
        if lease is None:
            pool = self.__dict__.setdefault("_free_connections", [])
            try:
                db = pool.pop()
            except IndexError:
                db = original_db(self)
                self._local.db = None
            lease = self._local.lease = _Lease(pool, db)
        return lease.db

    SQLiteStore._db = _db


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--nodelay":
        argv = argv[1:]
        original = Milter.milter.opensocket

        def opensocket(*args):
            result = original(*args)
            fds = set_nodelay_on_listeners()
            print(f"bench: TCP_NODELAY set on listening fds {fds}", file=sys.stderr, flush=True)
            return result

        Milter.milter.opensocket = opensocket
    if argv and argv[0] == "--data-reply":
        argv = argv[1:]
        from mailgate.milter.app import GatewayMilter
        # Negotiate the DATA event *with* a reply: smtpd then waits for the milter's answer before
        # it hands the milter connection to cleanup, so its last write is acknowledged at once.
        GatewayMilter.data = lambda self: Milter.CONTINUE
    if argv and argv[0] == "--fast":
        argv = argv[1:]
        apply_cpu_fixes()
    if argv and argv[0] == "--traceback":
        argv = argv[1:]
        import logging
        original_debug = logging.Logger.debug

        def debug(self, msg, *args, **kwargs):
            # GatewayMilter.eom logs an internal error's traceback at DEBUG only: show it at ERROR
            if msg == "traceback" and kwargs.get("exc_info"):
                return self.error(msg, *args, **kwargs)
            return original_debug(self, msg, *args, **kwargs)

        logging.Logger.debug = debug
    if argv and argv[0] == "--tracemalloc":
        out, argv = argv[1], argv[2:]
        import atexit
        import tracemalloc
        tracemalloc.start(8)
        baseline: list = []

        def snapshot_on_ready() -> None:
            # the first snapshot is taken once the milter serves: growth is measured from there
            import threading
            import time

            def later() -> None:
                time.sleep(15)
                baseline.append(tracemalloc.take_snapshot())
            threading.Thread(target=later, daemon=True).start()
        snapshot_on_ready()

        def dump() -> None:
            now = tracemalloc.take_snapshot()
            lines = [f"traced now {sum(s.size for s in now.statistics('filename')) / 1e6:.1f} MB"]
            if baseline:
                for stat in now.compare_to(baseline[0], "traceback")[:15]:
                    lines.append(f"{stat.size_diff / 1e3:+.0f} kB ({stat.count_diff:+d} blocks)")
                    lines += [f"    {frame}" for frame in stat.traceback.format()[-6:]]
            open(out, "w").write("\n".join(lines) + "\n")
        atexit.register(dump)
    if argv and argv[0] == "--count-lookups":
        out, argv = argv[1], argv[2:]
        import atexit
        from collections import Counter

        from mailgate.policy.lookup import LookupService
        counts: Counter[str] = Counter()
        original_call = LookupService.__call__

        def counting_call(self, mapname: str, key: str):
            kind = "token" if key.startswith("bounce+") else ("domain" if key.startswith("@") else "address")
            counts[f"{mapname} {kind}"] += 1
            return original_call(self, mapname, key)

        LookupService.__call__ = counting_call
        atexit.register(lambda: open(out, "w").write("".join(f"{k} {v}\n" for k, v in counts.most_common())))
    from mailgate.cli import main as mailgate_main
    return mailgate_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
