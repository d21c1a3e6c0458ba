#!/opt/mailgate/bin/python
"""Memory and storage: RSS of `mailgate serve` under milter load, SQLite growth per message, and how
the operator views (`mailgate bounces stats`, `mailgate stats` when it exists) scale with rows.

Part 1 (live): a private Postfix wired by `mailgate postfix-config`'s settings (milter, socketmap,
policy service) relays to smtp-sink; `mailgate serve` runs the realistic bench configuration with
MALLOC_ARENA_MAX=2, as the systemd unit sets it (`--malloc-arena-max 0`: glibc's default).
RSS is read from /proc (VmRSS, `mailgate serve` and its milter child together) when idle, after
a warm-up batch, every second during the main batch (peak), and at the end; the database (main
file + WAL) is measured before and after, and once more after a WAL checkpoint, to give bytes per
100,000 messages.

Part 2 (offline): a scratch store made by mailgate.store.SQLiteStore is filled with bounce rows
(and delivery rows) by plain SQL in steps of 10x; at each step the CLI is timed as a subprocess
and the store's query in process, with `EXPLAIN QUERY PLAN` for each statement.

    bench/memory.py [--quick] [--messages N] [--rows 10000,100000,1000000] [--malloc-arena-max N]

Full: 100,000 messages, 10^4/10^5/10^6 rows. Quick: 2,000 messages, 10^3/10^4 rows.
Exit: 0 ok, 1 broken, 2 target missed (full run only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    PYTHON,
    SUBMISSION_ROLE,
    LogFollower,
    Serve,
    SmtpSink,
    bench_config,
    machine,
    median,
    process_tree,
    rss_kib,
    smtp_source,
)

from mailgate.commands.postfixconf import main_settings, transport_service
from mailgate.configfile import load_config
from mailgate.lab.postfix import PrivatePostfix, make_basedir
from mailgate.store.sqlite import SQLiteStore

TARGET_RSS_GROWTH = 0.10
UNIT_MALLOC_ARENA_MAX = 2  # systemd/mailgate.service: Environment=MALLOC_ARENA_MAX=2
SECONDS_PER_DAY = 86400.0


def db_bytes(path: Path) -> dict[str, int]:
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        file = Path(str(path) + suffix)
        sizes[suffix or "main"] = file.stat().st_size if file.exists() else 0
    return sizes


def send_and_wait(pf: PrivatePostfix, base: Path, count: int, recipient: str, sessions: int,
                  on_tick=None) -> tuple[int, float, int]:
    """smtp-source `count` messages; wait for every status=sent. Returns (sent, seconds, tempfails).

    smtp-source gives up at the first 4xx reply, and mailgate answers 451 when it cannot record a
    message (as designed: the client retries). So when smtp-source stops early, the queue is
    drained and the missing messages are sent again; the 451s are counted and reported.
    """
    follower = LogFollower(pf.maillog)
    pattern = re.compile(rf"to=<{re.escape(recipient)}>,.* status=sent ")
    tempfail = re.compile(r"milter-reject: END-OF-MESSAGE .*: 4\.\d\.\d")
    start = time.monotonic()
    source = smtp_source(pf.port("submission"), count, recipient, base / "source.out", sessions=sessions)
    sent = tempfails = restarts = 0
    last_tick = start
    deadline = start + 120 + count / 20
    while sent < count and time.monotonic() < deadline:
        for line in follower.new_lines():
            if pattern.search(line):
                sent += 1
            elif tempfail.search(line):
                tempfails += 1
        now = time.monotonic()
        if on_tick and now - last_tick >= 1.0:
            on_tick(sent)
            last_tick = now
        if source.poll() is not None and sent < count and not pf.queue_files() and restarts < 20:
            time.sleep(0.5)
            for line in follower.new_lines():
                sent += bool(pattern.search(line))
            if sent < count:
                restarts += 1
                print(f"  smtp-source stopped after a 4xx ({tempfails} so far); sending the missing "
                      f"{count - sent}", flush=True)
                source = smtp_source(pf.port("submission"), count - sent, recipient, base / "source.out",
                                     sessions=sessions)
        if sent < count:
            time.sleep(0.05)
    source.wait(60)
    return sent, time.monotonic() - start, tempfails


def live_part(base: Path, warmup: int, count: int, env: dict[str, str], wrapper: list[str]) -> dict:
    sink = SmtpSink(base).start()
    config_path = bench_config(base, "mem", sink.port)
    config = load_config(config_path).config
    serve = Serve(config_path, wrapper, env)
    pf = None
    try:
        serve.start()
        pf = PrivatePostfix(base / "pf", listeners={"submission": {
            "milter_macro_daemon_name": SUBMISSION_ROLE, "smtpd_policy_service_policy_context": SUBMISSION_ROLE}},
            main_cf=dict(main_settings(config)))
        for server in config.servers:
            pf.add_master_service("\n".join(transport_service(config, server)) + "\n")
        pf.start()
        database = base / "mem-state" / "mailgate.sqlite3"
        time.sleep(2)
        idle = rss_kib(serve.pid)
        db_idle = db_bytes(database)
        print(f"idle: RSS {idle} KiB; database {db_idle}", flush=True)

        sent, seconds, tempfails_warm = send_and_wait(pf, base, warmup, "warmup@customer.example", 20)
        if sent < warmup:
            raise RuntimeError(f"warm-up: only {sent}/{warmup} delivered\n{pf.log_tail()}")
        time.sleep(1)
        warm = rss_kib(serve.pid)
        db_warm = db_bytes(database)
        print(f"after {warmup} warm-up messages ({sent / seconds:.0f} msgs/s): RSS {warm} KiB; database {db_warm}",
              flush=True)

        samples: list[tuple[int, int]] = []

        def tick(done: int) -> None:
            samples.append((done, rss_kib(serve.pid)))
            if len(samples) % 30 == 0:
                print(f"  {done} delivered, RSS {samples[-1][1]} KiB", flush=True)

        sent, seconds, tempfails = send_and_wait(pf, base, count, "load@customer.example", 20, tick)
        if sent < count:
            raise RuntimeError(f"main batch: only {sent}/{count} delivered\n{pf.log_tail()}")
        time.sleep(2)
        after = rss_kib(serve.pid)
        db_after = db_bytes(database)
        peak = max([after, warm] + [rss for _, rss in samples])
        print(f"after {count} more messages ({sent / seconds:.0f} msgs/s): RSS {after} KiB (peak {peak}); "
              f"database {db_after}", flush=True)
        threads = sum(len(os.listdir(f"/proc/{pid}/task")) for pid in process_tree(serve.pid))
        log = serve.log_path.read_text(errors="replace")
        errors = [line for line in log.splitlines() if "role=error" in line]
        # the milter logs an internal error's traceback right after its role=error line
        tracebacks = [found.group(0) for found in
                      re.finditer(r"^Traceback \(most recent call last\):\n.*?(?=^mailgate\[|\Z)", log, re.S | re.M)]
    finally:
        if pf is not None:
            pf.stop()
        serve.stop()
        sink.stop()
    # What the rows really take: fold the WAL into the main file (the gateway is stopped).
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    messages = conn.execute("select count(*) from messages").fetchone()[0]
    quota = conn.execute("select count(*) from quota_counters").fetchone()[0]
    conn.close()
    main_after = db_bytes(database)["main"]
    return {"idle": idle, "warm": warm, "after": after, "peak": peak, "threads": threads,
            "db_warm": sum(db_warm.values()), "db_after": sum(db_after.values()), "db_main_checkpointed": main_after,
            "db_main_warm": db_warm["main"], "messages_rows": messages, "quota_rows": quota,
            "count": count, "warmup": warmup, "rate": sent / seconds, "samples": samples,
            "tempfails": tempfails_warm + tempfails, "errors": errors, "tracebacks": tracebacks}


# -- part 2: operator views against many rows ------------------------------------------------------

def fill_bounces(conn: sqlite3.Connection, start: int, stop: int, now: float, rng: random.Random) -> None:
    servers = ["transactional", "partner", "mass", None]
    statuses = [("5.1.1", 1, "User unknown"), ("5.2.2", 1, "Mailbox full"), ("4.2.2", 0, "Over quota"),
                ("5.7.1", 1, "Rejected by policy"), (None, None, "unparsed")]

    def rows():
        for i in range(start, stop):
            status, permanent, reason = statuses[rng.randrange(len(statuses))]
            yield (now - rng.random() * 365 * SECONDS_PER_DAY,
                   f"user{rng.randrange(50_000)}@d{rng.randrange(2_000)}.example",
                   status, "failed", permanent, reason, "dns; mx.example", "dns; mx.example", i,
                   servers[i % len(servers)], "dsn", 0, 1)
    conn.executemany("insert into bounces (created_at, recipient, status, action, permanent, reason, reporting_mta, "
                     "remote_mta, message, server, source, stale, matched) values (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows())


def fill_deliveries(conn: sqlite3.Connection, start: int, stop: int, now: float, rng: random.Random) -> None:
    servers = ["transactional", "partner", "mass", None]
    statuses = ["sent"] * 8 + ["deferred", "bounced"]

    def rows():
        for i in range(start, stop):
            yield (now - rng.random() * 365 * SECONDS_PER_DAY, f"{i:011X}", f"user{rng.randrange(50_000)}@example.com",
                   "mx.example.com[192.0.2.1]:25", statuses[i % len(statuses)], "2.0.0", 0.5, "250 ok", i,
                   servers[i % len(servers)])
    conn.executemany("insert into deliveries (at, queue_id, recipient, relay, status, dsn, delay, reason, message, "
                     "server) values (?,?,?,?,?,?,?,?,?,?)", rows())


def has_subcommand(name: str) -> bool:
    result = subprocess.run([PYTHON, "-m", "mailgate", name, "--help"], capture_output=True, text=True)
    return result.returncode == 0


def time_cli(argv: list[str], repeat: int) -> tuple[float, str]:
    times = []
    output = ""
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run([PYTHON, "-m", "mailgate", *argv], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise RuntimeError(f"mailgate {' '.join(argv)} exited {result.returncode}: {result.stderr[-500:]}")
        output = result.stdout
    return median(times), output


def time_call(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return median(times)


class StatementCapture:
    """Records the SQL the store really runs (sqlite3 trace callback on every connection it opens),
    so the query plans below follow the store's code instead of a copy of its queries."""

    def __init__(self) -> None:
        self.active = False
        self.statements: list[str] = []
        self._connect = sqlite3.connect

        def connect(*args, **kwargs):
            conn = self._connect(*args, **kwargs)
            conn.set_trace_callback(self._trace)
            return conn
        sqlite3.connect = connect

    def _trace(self, sql: str) -> None:
        if self.active and sql.lstrip().lower().startswith("select"):
            self.statements.append(sql)

    def capture(self, call) -> list[str]:
        self.statements, self.active = [], True
        try:
            call()
        finally:
            self.active = False
        return self.statements

    def restore(self) -> None:
        sqlite3.connect = self._connect


def plan(conn: sqlite3.Connection, sql: str) -> str:
    """EXPLAIN QUERY PLAN of a traced statement (its parameters are already inlined)."""
    return "; ".join(row[3] for row in conn.execute(f"explain query plan {sql}"))


def stats_part(base: Path, levels: list[int], repeat: int) -> list[dict]:
    config_path = bench_config(base, "stats", 2525)
    config = load_config(config_path).config
    capture = StatementCapture()
    store = SQLiteStore(config.database)  # creates and migrates the scratch store
    database = Path(config.database)
    stats_cli = has_subcommand("stats")
    print(f"`mailgate stats` {'exists' if stats_cli else 'does not exist yet: its store query is timed in process'}",
          flush=True)
    rng = random.Random(7)
    now = time.time()
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    results = []
    filled = 0
    for level in levels:
        start = time.perf_counter()
        conn.execute("begin")
        fill_bounces(conn, filled, level, now, rng)
        fill_deliveries(conn, filled, level, now, rng)
        conn.execute("commit")
        fill_seconds = time.perf_counter() - start
        filled = level
        since_week = now - 7 * SECONDS_PER_DAY
        row = {"rows": level, "fill_s": fill_seconds, "db_bytes": sum(db_bytes(database).values())}
        row["cli_all_s"], out = time_cli(["bounces", "stats", "--config", str(config_path), "--json"], repeat)
        json.loads(out)
        row["cli_7d_s"], _ = time_cli(["bounces", "stats", "--config", str(config_path), "--json", "--since", "7d"],
                                      repeat)
        row["cli_list_s"], _ = time_cli(["bounces", "list", "--config", str(config_path), "--json"], repeat)
        row["store_all_ms"] = time_call(lambda: store.bounce_stats(0.0), repeat) * 1000
        row["store_7d_ms"] = time_call(lambda since_week=since_week: store.bounce_stats(since_week), repeat) * 1000
        row["delivery_all_ms"] = time_call(lambda: store.delivery_stats(0.0), repeat) * 1000
        row["delivery_7d_ms"] = time_call(lambda since_week=since_week: store.delivery_stats(since_week), repeat) * 1000
        if stats_cli:
            row["stats_cli_s"], _ = time_cli(["stats", "--config", str(config_path)], repeat)
            row["stats_cli_7d_s"], _ = time_cli(["stats", "--config", str(config_path), "--since", "7d"], repeat)
            row["stats_prom_s"], _ = time_cli(["stats", "--config", str(config_path), "--prometheus"], repeat)
        row["plans"] = {}
        for name, call in (("bounce_stats(all)", lambda: store.bounce_stats(0.0)),
                           ("bounce_stats(7d)", lambda since_week=since_week: store.bounce_stats(since_week)),
                           ("delivery_stats(all)", lambda: store.delivery_stats(0.0)),
                           ("delivery_totals", lambda: store.delivery_totals())):
            for number, sql in enumerate(capture.capture(call), start=1):
                row["plans"][f"{name} #{number}"] = (" ".join(sql.split())[:110], plan(conn, sql))
        results.append(row)
        print(f"rows={level}: bounces stats CLI {row['cli_all_s']:.3f}s (since 7d {row['cli_7d_s']:.3f}s), "
              f"bounces list CLI {row['cli_list_s']:.3f}s, store.bounce_stats {row['store_all_ms']:.1f} ms "
              f"(7d {row['store_7d_ms']:.1f} ms), store.delivery_stats {row['delivery_all_ms']:.1f} ms "
              f"(7d {row['delivery_7d_ms']:.1f} ms)"
              + (f", `mailgate stats` {row['stats_cli_s']:.3f}s (7d {row['stats_cli_7d_s']:.3f}s, --prometheus "
                 f"{row['stats_prom_s']:.3f}s)" if stats_cli else ""), flush=True)
    conn.close()
    store.close()
    capture.restore()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: 2,000 messages, 10^3 and 10^4 rows, no targets")
    parser.add_argument("--messages", type=int, help="messages in the main batch (full: 100000)")
    parser.add_argument("--rows", help="row counts for the stats part, comma separated")
    parser.add_argument("--skip-live", action="store_true", help="only the stats part")
    parser.add_argument("--skip-stats", action="store_true", help="only the live part")
    parser.add_argument("--malloc-arena-max", type=int, default=UNIT_MALLOC_ARENA_MAX, metavar="N",
                        help=f"run mailgate serve with MALLOC_ARENA_MAX=N (default {UNIT_MALLOC_ARENA_MAX}, as the "
                        "systemd unit; 0: unset, glibc's default of 8 arenas per core)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace Python allocations in mailgate serve's own process (the lookup and policy "
                        "services; the milter child is not traced); print what grew (slows it down)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    count = args.messages or (2_000 if args.quick else 100_000)
    warmup = 200 if args.quick else 1_000
    levels = [int(x) for x in (args.rows or ("1000,10000" if args.quick else "10000,100000,1000000")).split(",")]
    repeat = 1 if args.quick else 3
    info = machine()
    print(f"# memory: {count} messages after {warmup} warm-up; stats rows {levels}; nproc={info['nproc']} "
          f"cpu={info['cpu']!r} python={info['python']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    base = make_basedir("mgm")
    broken = False
    live = None
    stats: list[dict] = []
    try:
        if args.malloc_arena_max:
            env = {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)}
        else:
            env = {}
            os.environ.pop("MALLOC_ARENA_MAX", None)  # Serve starts from this environment
        wrapper = ["--tracemalloc", str(base / "tracemalloc.txt")] if args.tracemalloc else []
        if not args.skip_live:
            live = live_part(base, warmup, count, env, wrapper)
            if args.tracemalloc and (base / "tracemalloc.txt").exists():
                print((base / "tracemalloc.txt").read_text(), flush=True)
        if not args.skip_stats:
            stats = stats_part(base, levels, repeat)
    except Exception as exc:
        broken = True
        print(f"BROKEN: {type(exc).__name__}: {exc}", flush=True)

    print()
    missed = False
    if live:
        growth_idle = live["after"] / live["idle"] - 1
        growth_warm = live["after"] / live["warm"] - 1
        per_100k = (live["db_main_checkpointed"] - live["db_main_warm"]) / live["count"] * 100_000
        print(f"# MALLOC_ARENA_MAX={args.malloc_arena_max or 'unset (glibc default)'}"
              + (" tracemalloc (lookup and policy services)" if args.tracemalloc else ""))
        print(f"RESULT rss_kib idle={live['idle']} after_{live['warmup']}={live['warm']} "
              f"after_{live['count']}_more={live['after']} peak={live['peak']} threads={live['threads']}")
        print(f"RESULT rss_growth vs_idle={growth_idle:+.1%} vs_warm={growth_warm:+.1%} "
              f"(load {live['rate']:.0f} msgs/s)")
        print(f"RESULT sqlite bytes_per_100k_messages={per_100k / 1e6:.1f}MB (main file after checkpoint; "
              f"{live['messages_rows']} message rows, {live['quota_rows']} quota rows; "
              f"main+wal+shm during the run {live['db_after'] / 1e6:.1f}MB)")
        print(f"RESULT milter_tempfails={live['tempfails']} (451 answered because of an internal error; "
              f"{len(live['errors'])} role=error lines"
              + (f", e.g. {live['errors'][0][:160]!r}" if live["errors"] else "") + ")")
        for traceback in live["tracebacks"][:3]:
            print(traceback[-1500:], end="")
        met = growth_idle <= TARGET_RSS_GROWTH
        missed |= not met
        print(f"TARGET rss growth <= {TARGET_RSS_GROWTH:.0%} after {live['count']} messages: "
              f"{'MET' if met else 'MISSED'} ({growth_idle:+.1%} vs idle, {growth_warm:+.1%} vs warm)"
              f"{' [not enforced: --quick]' if args.quick else ''}")
    for row in stats:
        print(f"RESULT stats rows={row['rows']}: `bounces stats` {row['cli_all_s']:.3f}s (--since 7d "
              f"{row['cli_7d_s']:.3f}s); store.bounce_stats {row['store_all_ms']:.1f}ms "
              f"(7d {row['store_7d_ms']:.1f}ms); "
              f"store.delivery_stats {row['delivery_all_ms']:.1f}ms (7d {row['delivery_7d_ms']:.1f}ms)"
              + (f"; `mailgate stats` {row['stats_cli_s']:.3f}s (--since 7d {row['stats_cli_7d_s']:.3f}s, --prometheus "
                 f"{row['stats_prom_s']:.3f}s)" if "stats_cli_s" in row else "; `mailgate stats`: absent"))
    if stats:
        for name, (sql, query_plan) in stats[-1]["plans"].items():
            print(f"PLAN {name}: {query_plan}   <- {sql}")
        if len(stats) > 1:
            first, last = stats[0], stats[-1]
            factor = last["rows"] / first["rows"]
            print(f"RESULT stats scaling x{factor:.0f} rows: "
                  f"bounce_stats(all) x{last['store_all_ms'] / first['store_all_ms']:.1f}, "
                  f"bounce_stats(7d) x{last['store_7d_ms'] / first['store_7d_ms']:.1f}, "
                  f"delivery_stats(all) x{last['delivery_all_ms'] / first['delivery_all_ms']:.1f}")
    if args.keep or broken:
        print(f"# work directory kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    if broken:
        return 1
    return 2 if missed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
