"""`mailgate …` with a measuring patch applied first (benchmarks only).

    _serve.py [--count-lookups OUT] [--tracemalloc OUT] serve --config FILE

The patches reach this process only. `mailgate serve` runs the lookup (socketmap) and policy
services here and starts the milter as a child process of its own (`python -m
mailgate.milter.worker`, a fresh interpreter), which no patch applied here reaches: nothing here
measures or changes the milter.

`--count-lookups OUT`: count the socketmap lookups by map and kind of key, written to OUT at exit.
`--tracemalloc OUT`: Python allocations of this process (the lookup and policy services) that grew
since 15 s after start, written to OUT at exit.
"""

from __future__ import annotations

import atexit
import sys


def count_lookups(out: str) -> None:
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


def trace_allocations(out: str) -> None:
    import threading
    import time
    import tracemalloc
    tracemalloc.start(8)
    baseline: list = []

    def later() -> None:
        # the first snapshot is taken once the services serve: growth is measured from there
        time.sleep(15)
        baseline.append(tracemalloc.take_snapshot())
    threading.Thread(target=later, daemon=True).start()

    def dump() -> None:
        now = tracemalloc.take_snapshot()
        lines = [f"traced now {sum(s.size for s in now.statistics('filename')) / 1e6:.1f} MB "
                 "(mailgate serve's own process: lookup and policy services, not the milter)"]
        if baseline:
            for stat in now.compare_to(baseline[0], "traceback")[:15]:
                lines.append(f"{stat.size_diff / 1e3:+.0f} kB ({stat.count_diff:+d} blocks)")
                lines += [f"    {frame}" for frame in stat.traceback.format()[-6:]]
        open(out, "w").write("\n".join(lines) + "\n")
    atexit.register(dump)


PATCHES = {"--count-lookups": count_lookups, "--tracemalloc": trace_allocations}


def main(argv: list[str]) -> int:
    while argv and argv[0] in PATCHES:
        PATCHES[argv[0]](argv[1])
        argv = argv[2:]
    from mailgate.commands.cli import main as mailgate_main
    return mailgate_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
