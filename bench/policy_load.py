#!/opt/mailgate/bin/python
"""The policy service under load on SQLite and on PostgreSQL, in one run, over the socket.

Two `mailgate serve` instances with the bench configuration, one on its own SQLite file and one
on a private PostgreSQL cluster (loopback, `mailgate.lab.postgres`: fsync off like the tests, so a
lower bound for a real server's commit latency), each driven by 8 and 64 client processes with
the `policy-out` requests of bench/services.py (RCPT from the submission listener: the daily quota
counted and taken in a transaction; the requests of one event-loop turn share it, the group
commit of `GatewayPolicy.answer_all`). The order of the backends alternates per client count.

    bench/policy_load.py [--quick] [--seconds S] [--clients 8,64] [--profile DIR [--idle]]

Last lines: a RESULT line per backend and client count (req/s, p50, p99, CPU per request of
`mailgate serve` and, for PostgreSQL, of its server processes too), the ratio PostgreSQL/SQLite,
and the targets: PostgreSQL >= 5,000 req/s at 8 clients with p99 < 5 ms. Exit: 0 ok, 1 broken,
2 target missed (full run only).

--profile DIR samples `mailgate serve` with py-spy during each measurement (DIR/BACKEND-CLIENTS.txt,
raw stacks for bench/pyspy_summary.py), with --nonblocking as bench/throughput.py does (ptrace
stops break serve's sigtimedwait); --idle keeps the samples of threads waiting (the event loop
waiting on PostgreSQL's answers: where its wall time goes, not only its CPU).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import Serve, bench_config, cpu_seconds, machine, start_pyspy, stop_pyspy
from services import drive, policy_out_requests

from mailgate.lab.postfix import make_basedir
from mailgate.lab.postgres import PrivatePostgres

TARGET_RATE = 5_000
TARGET_CLIENTS = 8
TARGET_P99_MS = 5.0


def postgres_config(base, dsn: str):
    """The bench configuration with the store on PostgreSQL instead of its SQLite file."""
    path = bench_config(base, "pg", 2525)
    text = path.read_text().replace("database: pg-state/mailgate.sqlite3", f"database: \"{dsn}\"")
    path.write_text(text)
    return path


def start_profile(pid: int, path: Path, idle: bool) -> subprocess.Popen:
    """py-spy on `mailgate serve` (see the module docstring for its flags), given a second to attach."""
    spy = start_pyspy(pid, path, ["--nonblocking", *(["--idle"] if idle else [])])
    time.sleep(1.0)
    return spy


def failed(result: dict) -> bool:
    """Whether a measurement broke (errors, or no request answered); says so when it did."""
    if result["errors"] or not result["requests"]:
        print(f"  BROKEN: {result['errors'][:3]}", flush=True)
        return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per measurement, no targets")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (full: 5)")
    parser.add_argument("--clients", default="8,64", help="client counts, comma separated (default 8,64)")
    parser.add_argument("--profile", type=Path, help="py-spy each measurement's serve into this directory")
    parser.add_argument("--idle", action="store_true", help="with --profile: keep the waiting threads' samples")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    levels = [int(c) for c in args.clients.split(",")]
    info = machine()
    print(f"# policy_load: policy-out, {seconds:g} s per measurement, clients {levels}; nproc={info['nproc']} "
          f"cpu={info['cpu']!r} python={info['python']}", flush=True)
    base = make_basedir("mgp")
    pg = PrivatePostgres(base / "pg")
    serves: dict[str, Serve] = {}
    rows: list[tuple[str, int, dict]] = []
    broken = False
    try:
        pg.start()
        pg.create_database("bench")
        serves["sqlite"] = Serve(bench_config(base, "lite", 2525))
        serves["postgresql"] = Serve(postgres_config(base, pg.dsn("bench")))
        for serve in serves.values():
            serve.start()
        requests = policy_out_requests()
        for number, clients in enumerate(levels):
            order = list(serves) if number % 2 == 0 else list(reversed(serves))
            for backend in order:
                name = "lite" if backend == "sqlite" else "pg"
                postmaster = pg.postmaster_pid() if backend == "postgresql" else None
                database_before = cpu_seconds(postmaster) if postmaster else 0.0
                spy = (start_profile(serves[backend].pid, args.profile / f"{backend}-{clients}.txt", args.idle)
                       if args.profile else None)
                try:
                    result = drive(str(base / f"{name}-policy.sock"), "policy", requests, clients, seconds,
                                   serves[backend].pid)
                finally:
                    if spy is not None:
                        stop_pyspy(spy)
                database_cpu = cpu_seconds(postmaster) - database_before if postmaster else 0.0
                result["database_us"] = database_cpu * 1e6 / max(result["requests"], 1) if postmaster else None
                rows.append((backend, clients, result))
                print(f"{backend:<10} clients={clients:<3} {result['rate']:8.0f} req/s  p50={result['p50_ms']:.3f} ms  "
                      f"p99={result['p99_ms']:.3f} ms", flush=True)
                broken |= failed(result)
    except Exception as exc:
        broken = True
        print(f"BROKEN: {type(exc).__name__}: {exc}", flush=True)
    finally:
        for serve in serves.values():
            serve.stop()
        pg.stop()

    table = {(backend, clients): result for backend, clients, result in rows}
    print()
    for backend, clients, r in rows:
        serve_us = f"{r['server_us']:.1f}" if r["server_us"] is not None else "-"
        database_us = f"  postgres_cpu_us={r['database_us']:.1f}" if r["database_us"] is not None else ""
        print(f"RESULT {backend:<10} clients={clients:<3} req/s={r['rate']:8.0f}  p50_ms={r['p50_ms']:.3f}  "
              f"p99_ms={r['p99_ms']:.3f}  serve_cpu_us={serve_us}{database_us}")
    for clients in levels:
        lite, pgres = table.get(("sqlite", clients)), table.get(("postgresql", clients))
        if lite and pgres and lite["rate"]:
            print(f"RATIO postgresql/sqlite clients={clients}: {pgres['rate'] / lite['rate']:.2f}")
    missed = False
    target = table.get(("postgresql", TARGET_CLIENTS))
    if target is not None:
        for text, met, value in ((f"postgresql >= {TARGET_RATE}/s at {TARGET_CLIENTS} clients",
                                  target["rate"] >= TARGET_RATE, f"{target['rate']:.0f}/s"),
                                 (f"postgresql p99 < {TARGET_P99_MS:g} ms at {TARGET_CLIENTS} clients",
                                  target["p99_ms"] < TARGET_P99_MS, f"{target['p99_ms']:.3f} ms")):
            missed |= not met
            print(f"TARGET {text}: {'MET' if met else 'MISSED'} ({value})"
                  f"{' [not enforced: --quick]' if args.quick else ''}")
    if broken:
        print(f"# work directory kept: {base}")
        return 1
    shutil.rmtree(base, ignore_errors=True)
    return 2 if missed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
