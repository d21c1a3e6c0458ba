#!/opt/mailgate/bin/python
"""Postfix throughput with and without mailgate, every configuration in the same run.

One private Postfix (mailgate.lab.postfix) relays to one `smtp-sink`; between configurations it
is reconfigured with `postconf -e`/`-X` and `postfix reload`. Each configuration gets the same
load, `smtp-source -s 10 -m N -l 2000 -f odoo@mycompany.com -t <unique rcpt>`, and its rate is
N / (time from starting smtp-source to the last `status=sent` for that recipient in the log).
Rounds interleave the configurations (a b c d … a b c d …) so that drift on a noisy 2-core
machine hits all of them alike; each ratio is taken against the baseline of the same round, and
the medians are reported.

Configurations:
  a  baseline: no milter; a static texthash: sender_dependent_default_transport_maps naming the
     smtp-sink transport (the same mg-transactional service the gateway uses)
  b  mailgate milter (unix:) + socketmap lookup, Postfix wired by `mailgate postfix-config`'s
     main.cf settings, without the policy service
  c  the full path: b + the policy service (smtpd_recipient_restrictions = check_policy_service)
  d  reference: a trivial pymilter milter (Milter.Base, default callbacks) on unix:, baseline map
  e  b with mailgate's milter on inet:127.0.0.1 (with its built-in fix for the "inet: stall":
     TCP_NODELAY on the listening socket, DATA answered; bench/inet_stall.py)
  f  d on inet: (the stall, Postfix -> milter: pymilter's default milter does not answer DATA)
  g  f with TCP_NODELAY on the trivial milter's listening socket (the other half of the fix,
     which alone does not remove that stall)
  h  the trivial milter negotiating what mailgate's milter negotiates (connect, MAIL, RCPT, every
     header, body, all without a reply; the envelope changed at end of message) and doing nothing:
     the floor of a header-reading pymilter milter (bench/trivial_milter.py --like-mailgate)

Every mailgate configuration runs `mailgate serve` as it is: the milter in its child process
(`python -m mailgate.milter.worker`), the lookup and policy services in the parent. CPU per
message is read from /proc for the whole `mailgate serve` tree and split into the milter child
and the parent (the services); for d, f, g it is the trivial milter's process.

    bench/throughput.py [--quick] [--messages N] [--rounds R] [--modes abc…] [--count-lookups]
                        [--latency N] [--profile DIR [--profile-flags FLAGS]]

After each round's throughput runs, every configuration also gets the latency phase
(bench/smtp_latency.py): one client, one message per connection, one after another, each timed
from MAIL FROM to the final 250; p50 and p99 per configuration over all rounds, and how much each
adds to the baseline's p50 (`--latency N` messages a configuration and round; 0 skips it).

The last lines are the figures: msgs/s per configuration, the ratio to the baseline, CPU per
message, the transaction times.
Exit status: 0 ok; 1 broken (mail not delivered, a process died); 2 a target missed (full run only).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    CLK_TCK,
    SENDER,
    SUBMISSION_ROLE,
    LogFollower,
    Serve,
    SmtpSink,
    TrivialMilter,
    bench_config,
    busy_fraction,
    cpu_seconds,
    machine,
    median,
    percentile,
    process_tree,
    smtp_source,
    start_pyspy,
    stop_pyspy,
    system_cpu,
)
from smtp_latency import transaction_times

from mailgate.commands.postfixconf import main_settings, transport_service
from mailgate.configfile import load_config
from mailgate.lab.ports import free_port
from mailgate.lab.postfix import POSTCONF, PrivatePostfix, make_basedir

TARGET_OF_BASELINE = 0.75     # c / a, per round, median
TARGET_OF_FLOOR = 0.90        # c / h: the trivial milter asking for what mailgate asks
TARGET_SERVE_CPU_MS = 1.1     # mailgate serve's CPU per message in c (milter child + services)
TARGET_SERVICES_CPU_MS = 0.25  # of which the lookup and policy services
LATENCY_WARM_UP = 5
TARGET_ADDED_P50_MS = 1.0     # SMTP transaction time (MAIL FROM to the final 250) c minus a, p50
POLICY_KEYS = ("smtpd_recipient_restrictions", "smtpd_policy_service_default_action")

LABELS = {
    "a": "baseline (no milter, texthash map)",
    "b": "mailgate milter+socketmap (unix)",
    "c": "full path: b + policy service",
    "d": "trivial pymilter milter (unix)",
    "e": "mailgate milter on inet:",
    "f": "trivial pymilter milter on inet:",
    "g": "trivial milter inet: + TCP_NODELAY",
    "h": "trivial milter, mailgate's callbacks (unix)",
}
# `mailgate serve` instance (by configuration name) behind each mode; None: no mailgate
SERVE_OF = {"a": None, "b": "unix", "c": "unix", "d": None, "e": "inet", "f": None, "g": None, "h": None}
ALL_MODES = "".join(LABELS)
WORKER_MODULE = "mailgate.milter.worker"


def milter_worker_pid(serve_pid: int) -> int | None:
    """The milter child of `mailgate serve`: the process whose command line names the worker."""
    for pid in process_tree(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if WORKER_MODULE.encode() in argv:
            return pid
    return None


class Bench:
    def __init__(self, base: Path, modes: str, count_lookups: bool = False) -> None:
        self.base = base
        self.count_lookups = count_lookups
        self.profile_flags: list[str] = ["--gil"]
        self.modes = modes
        self.sink = SmtpSink(base)
        self.serves: dict[str, Serve] = {}
        self.milters: dict[str, TrivialMilter] = {}
        self.pf: PrivatePostfix | None = None
        self.settings: dict[str, dict[str, str]] = {}

    # -- set-up ----------------------------------------------------------------------------------

    def start(self) -> None:
        base, modes = self.base, self.modes
        self.sink.start()
        port = self.sink.port
        configs = {"unix": bench_config(base, "gw", port)}
        if "e" in modes:
            configs["inet"] = bench_config(base, "gwi", port, milter=f"inet:{free_port()}@127.0.0.1")
        for name, path in configs.items():
            # --count-lookups patches the LookupService, which runs in `mailgate serve` itself
            wrapper = ["--count-lookups", str(base / f"lookups-{name}.txt")] if self.count_lookups else []
            self.serves[name] = Serve(path, wrapper).start()
        trivial = {"d": (f"unix:{base}/trivial.sock", False), "f": (f"inet:{free_port()}@127.0.0.1", False),
                   "g": (f"inet:{free_port()}@127.0.0.1", True), "h": (f"unix:{base}/trivial-h.sock", False)}
        for mode, (spec, nodelay) in trivial.items():
            if mode in modes:
                self.milters[mode] = TrivialMilter(base, spec, nodelay=nodelay, name=f"trivial-{mode}",
                                                   like_mailgate=mode == "h").start()

        loaded = {name: load_config(path).config for name, path in configs.items()}
        config = loaded["unix"]
        static_map = base / "sender-transport"
        transport = config.servers[0].transport  # mg-transactional:[127.0.0.1]:PORT
        static_map.write_text(f"{SENDER} {transport}\n@mycompany.com {transport}\n")
        baseline = {"sender_dependent_default_transport_maps": f"texthash:{static_map}"}

        def gateway(name: str, policy: bool) -> dict[str, str]:
            settings = dict(main_settings(loaded[name]))
            if not policy:
                for key in POLICY_KEYS:
                    settings.pop(key)
            return settings

        def trivial_milter(mode: str) -> dict[str, str]:
            address = self.milters[mode].spec
            from mailgate.commands.postfixconf import milter_address
            from mailgate.infra.socketspec import parse_socket_spec
            address = milter_address(parse_socket_spec(address))
            return baseline | {"smtpd_milters": address, "non_smtpd_milters": address,
                               "milter_default_action": "tempfail", "milter_protocol": "6"}

        all_settings = {
            "a": lambda: baseline,
            "b": lambda: gateway("unix", policy=False),
            "c": lambda: gateway("unix", policy=True),
            "d": lambda: trivial_milter("d"),
            "e": lambda: gateway("inet", policy=False),
            "f": lambda: trivial_milter("f"),
            "g": lambda: trivial_milter("g"),
            "h": lambda: trivial_milter("h"),
        }
        self.settings = {mode: all_settings[mode]() for mode in modes}

        self.pf = PrivatePostfix(base / "pf", listeners={"submission": {
            "milter_macro_daemon_name": SUBMISSION_ROLE,
            "smtpd_policy_service_policy_context": SUBMISSION_ROLE}}, main_cf=self.settings[modes[0]])
        for server in config.servers:
            self.pf.add_master_service("\n".join(transport_service(config, server)) + "\n")
        self.pf.start()
        self.current = modes[0]

    def stop(self) -> None:
        if self.pf is not None:
            self.pf.stop()
        for milter in self.milters.values():
            milter.stop()
        for serve in self.serves.values():
            serve.stop()
        self.sink.stop()

    # -- one measurement -------------------------------------------------------------------------

    def configure(self, mode: str) -> None:
        assert self.pf is not None
        if mode == self.current:
            return
        wanted = self.settings[mode]
        every = set().union(*self.settings.values())
        remove = sorted(every - set(wanted))
        if remove:
            subprocess.run([POSTCONF, "-c", str(self.pf.config_dir), "-X", *remove], check=True,
                           capture_output=True)
        self.pf.postconf(wanted)
        self.pf.reload()
        self.current = mode

    def helper_pids(self, mode: str) -> tuple[int | None, int | None]:
        """(top, milter) processes of a configuration: `mailgate serve` and its milter child, or
        the trivial milter twice; (None, None) for the baseline."""
        serve = self.serves.get(SERVE_OF[mode] or "")
        if serve is not None:
            return serve.pid, milter_worker_pid(serve.pid)
        milter = self.milters.get(mode)
        pid = milter.proc.pid if milter is not None and milter.proc is not None else None
        return pid, pid

    def start_profiles(self, mode: str, round_no: int, profile: Path) -> list[subprocess.Popen]:
        """py-spy on the milter process (DIR/MODE-roundN.txt) and, for mailgate, on `mailgate serve`
        itself, where the lookup and policy services run (DIR/MODE-roundN-services.txt).
        --gil: only the thread holding the GIL is sampled, i.e. where the process's one Python
        interpreter spends its time (libmilter's threads queue for it).

        `mailgate serve` itself is sampled with --nonblocking: py-spy's ptrace stops interrupt its
        signal.sigtimedwait, and Python 3.11 then returns a bogus siginfo, which serve takes for a
        stop signal and exits. --nonblocking cannot give native frames, so with --native only the
        milter is profiled."""
        top, milter = self.helper_pids(mode)
        targets = [(milter, f"{mode}-round{round_no}.txt", self.profile_flags)]
        if top != milter and "--native" not in self.profile_flags:
            targets.append((top, f"{mode}-round{round_no}-services.txt", [*self.profile_flags, "--nonblocking"]))
        spies = [start_pyspy(pid, profile / name, flags) for pid, name, flags in targets if pid]
        if spies:
            time.sleep(1.0)
        return spies

    def measure(self, mode: str, round_no: int, count: int, profile: Path | None = None) -> dict:
        assert self.pf is not None
        self.configure(mode)
        time.sleep(0.5)  # let master finish replacing the old processes
        recipient = f"r{round_no}-{mode}@customer.example"
        follower = LogFollower(self.pf.maillog)
        top, milter = self.helper_pids(mode)
        cpu_before = (cpu_seconds(top), cpu_seconds(milter)) if top and milter else None
        spies = self.start_profiles(mode, round_no, profile) if profile is not None else []
        sys_before = system_cpu()
        start = time.monotonic()
        source = smtp_source(self.pf.port("submission"), count, recipient, self.base / f"source-{mode}.out")
        sent = failed = 0
        samples: list[str] = []
        last = source_done = start
        deadline = start + 60 + count / 20
        import re
        sent_re = re.compile(rf"to=<{re.escape(recipient)}>,.* status=sent ")
        fail_re = re.compile(rf"to=<{re.escape(recipient)}>,.* status=(deferred|bounced)|milter-reject|"
                             r"NOQUEUE: reject|warning: milter|lost connection")
        while sent < count:
            lines = follower.new_lines()
            now = time.monotonic()
            for line in lines:
                if sent_re.search(line):
                    sent += 1
                    last = now
                elif fail_re.search(line):
                    failed += 1
                    if len(samples) < 3:
                        samples.append(line)
            if source.poll() is None:
                source_done = now
            if sent >= count or now > deadline:
                break
            time.sleep(0.02)
        source.wait(30)
        for spy in spies:
            stop_pyspy(spy)
        sys_after = system_cpu()
        elapsed = last - start
        cpu = None
        # the split needs the same milter process throughout (a restarted child took its CPU along)
        if cpu_before is not None and self.helper_pids(mode) == (top, milter):
            cpu = {"total": cpu_seconds(top) - cpu_before[0], "milter": cpu_seconds(milter) - cpu_before[1]}
            cpu = {key: seconds * 1000 / max(sent, 1) for key, seconds in cpu.items()}
        result = {
            "mode": mode, "round": round_no, "sent": sent, "failed": failed, "samples": samples,
            "seconds": elapsed, "rate": sent / elapsed if elapsed > 0 else 0.0,
            "accept_seconds": source_done - start,
            "cpu_ms_per_msg": cpu,
            "busy": busy_fraction(sys_before, sys_after),
            "machine_ms_per_msg": (sys_after[0] - sys_before[0]) * 1000 / CLK_TCK / max(sent, 1),
        }
        if not self.pf.wait_queue_empty(60):
            result["failed"] += len(self.pf.queue_files())
        return result

    def latency(self, mode: str, round_no: int, count: int) -> list[float]:
        """The latency phase of one configuration: `count` transactions one at a time, then the
        queue left empty for the next measurement. A few unmeasured ones go first: after the
        reload Postfix starts its smtpd and cleanup processes on the first connections."""
        assert self.pf is not None
        self.configure(mode)
        time.sleep(0.5)
        transaction_times(self.pf.port("submission"), LATENCY_WARM_UP, SENDER,
                          f"w{round_no}-{mode}-{{n}}@customer.example")
        times = transaction_times(self.pf.port("submission"), count, SENDER,
                                  f"l{round_no}-{mode}-{{n}}@customer.example")
        self.pf.wait_queue_empty(60)
        return times


def p50_p99_ms(times: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile of transaction times (seconds), in milliseconds."""
    ordered = sorted(times)
    return percentile(ordered, 0.5) * 1000, percentile(ordered, 0.99) * 1000


def latency_lines(latencies: dict[str, list[float]]) -> tuple[list[str], tuple[str, bool] | None]:
    """RESULT lines of the transaction times per configuration (p50, p99, and the p50 added to
    the baseline's), and the target line for the full path when both a and c ran."""
    lines = []
    quantiles = {mode: p50_p99_ms(times) for mode, times in latencies.items() if times}
    p50 = {mode: median_ms for mode, (median_ms, _) in quantiles.items()}
    for mode, (median_ms, p99) in quantiles.items():
        added = f"  added_p50={median_ms - p50['a']:+.2f}ms" if mode != "a" and "a" in p50 else ""
        lines.append(f"RESULT latency {mode} {LABELS[mode]:<38} p50={median_ms:.2f}ms "
                     f"p99={p99:.2f}ms  (n={len(latencies[mode])}){added}")
    if "a" not in p50 or "c" not in p50:
        return lines, None
    added = p50["c"] - p50["a"]
    met = added < TARGET_ADDED_P50_MS
    return lines, (f"TARGET latency added by the full path (c - a) at p50 < {TARGET_ADDED_P50_MS:.2f} ms: "
                   f"{'MET' if met else 'MISSED'} ({added:.2f} ms)", met)


def cpu_text(mode: str, cpu: dict | None) -> str:
    """CPU per message: mailgate serve's whole tree, split into its milter child and itself (the
    lookup and policy services); the trivial milter's one process."""
    if cpu is None:
        return ""
    if SERVE_OF[mode] is None:
        return f"milter_cpu={cpu['milter']:.2f}ms/msg"
    return (f"serve_cpu={cpu['total']:.2f}ms/msg (milter {cpu['milter']:.2f} + "
            f"lookup/policy {cpu['total'] - cpu['milter']:.2f})")


def full_path_targets(summary: dict, by_mode: dict[str, list[dict]]) -> list[tuple[str, bool]]:
    """Issue 17's targets for the full path (c), each as (TARGET line, met): c against the
    baseline and against h (ratios per round, then the median), and serve's CPU per message.
    Only those whose configurations ran are judged."""
    if "c" not in summary:
        return []
    lines = []

    def target(what: str, value: float, limit: float, at_least: bool, unit: str = "") -> None:
        met = value >= limit if at_least else value <= limit
        sign = ">=" if at_least else "<="
        text = f"{value:.2f}{unit}" if unit else f"{value:.0%}"
        bound_text = f"{limit:.2f}{unit}" if unit else f"{limit:.0%}"
        lines.append((f"TARGET {what} {sign} {bound_text}: {'MET' if met else 'MISSED'} ({text})", met))

    target("full path (c) / baseline (a)", summary["c"][1], TARGET_OF_BASELINE, True)
    if "h" in by_mode:
        floor = {r["round"]: r["rate"] for r in by_mode["h"]}
        ratios = [r["rate"] / floor[r["round"]] for r in by_mode["c"] if floor.get(r["round"])]
        if ratios:
            target("full path (c) / trivial milter with mailgate's callbacks (h)", median(ratios),
                   TARGET_OF_FLOOR, True)
    cpu = summary["c"][2]
    if cpu is not None:
        target("serve CPU per message (c)", cpu["total"], TARGET_SERVE_CPU_MS, False, " ms")
        target("lookup+policy CPU per message (c)", cpu["total"] - cpu["milter"], TARGET_SERVICES_CPU_MS, False,
               " ms")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: 200 messages, one round, no targets")
    parser.add_argument("--messages", type=int, help="messages per configuration and round (full: 2000)")
    parser.add_argument("--rounds", type=int, help="rounds (full: 3)")
    parser.add_argument("--modes", help=f"configurations to run, baseline first (default, also with --quick: "
                        f"all, {ALL_MODES})")
    parser.add_argument("--latency", type=int, help="latency phase: messages per configuration and round, "
                        "sent one at a time (full: 200, quick: 30; 0 skips it)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--profile-flags", default="--gil",
                        help="py-spy record flags (default --gil; e.g. '--native --threads' for C frames)")
    parser.add_argument("--count-lookups", action="store_true",
                        help="count socketmap lookups per map (bench/_serve.py patches mailgate serve's LookupService)")
    parser.add_argument("--profile", type=Path, help="record py-spy profiles (raw, --gil) of each configuration into "
                        "this directory: MODE-roundN.txt the milter process (mailgate's milter child or the trivial "
                        "milter), MODE-roundN-services.txt mailgate serve's own process (lookup and policy; "
                        "sampled --nonblocking, so not with --native); "
                        "read them with bench/pyspy_summary.py")
    args = parser.parse_args()
    unknown = set(args.modes or "") - set(ALL_MODES)
    if unknown:
        parser.error(f"unknown configuration(s) {''.join(sorted(unknown))}: choose from {ALL_MODES}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    count = args.messages or (200 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    latency_count = args.latency if args.latency is not None else (30 if args.quick else 200)
    modes = "a" + (args.modes or ALL_MODES).replace("a", "")
    info = machine()
    print(f"# throughput: {count} messages x {rounds} round(s), configurations {modes}; "
          f"nproc={info['nproc']} cpu={info['cpu']!r} python={info['python']} postfix={info['postfix']}", flush=True)

    base = make_basedir("mgt")
    bench = Bench(base, modes, args.count_lookups)
    bench.profile_flags = args.profile_flags.split()
    results: list[dict] = []
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    broken = False
    try:
        bench.start()
        for round_no in range(1, rounds + 1):
            for mode in modes:
                result = bench.measure(mode, round_no, count, args.profile)
                results.append(result)
                cpu = cpu_text(mode, result["cpu_ms_per_msg"])
                print(f"round {round_no} {mode} {LABELS[mode]:<38} {result['rate']:7.1f} msgs/s  "
                      f"({result['sent']}/{count} sent in {result['seconds']:.2f}s, smtp-source done "
                      f"{result['accept_seconds']:.2f}s, machine busy {result['busy']:.0%}, "
                      f"machine CPU {result['machine_ms_per_msg']:.2f}ms/msg"
                      + (f", {cpu}" if cpu else "") + ")", flush=True)
                if result["sent"] < count or result["failed"]:
                    broken = True
                    print(f"  BROKEN: {result['sent']}/{count} delivered, {result['failed']} failures; "
                          + " | ".join(result["samples"]), flush=True)
            for mode in modes if latency_count else ():
                times = bench.latency(mode, round_no, latency_count)
                latencies[mode] += times
                median_ms, p99 = p50_p99_ms(times)
                print(f"round {round_no} {mode} latency: p50 {median_ms:.2f} ms, p99 {p99:.2f} ms "
                      f"({len(times)} messages one at a time)", flush=True)
    except Exception as exc:  # report, then clean up
        broken = True
        print(f"BROKEN: {type(exc).__name__}: {exc}", flush=True)
    finally:
        bench.stop()

    if args.count_lookups:
        for file in sorted(base.glob("lookups-*.txt")):
            serve_name = file.stem.split("-", 1)[1]
            # every message that serve saw: the throughput runs', the latency phases' and their warm-ups
            sent = sum(r["sent"] for r in results if SERVE_OF[r["mode"]] == serve_name) \
                + sum(len(times) + LATENCY_WARM_UP * rounds for mode, times in latencies.items()
                      if SERVE_OF[mode] == serve_name and times)
            for line in file.read_text().splitlines():
                what, number = line.rsplit(" ", 1)
                print(f"LOOKUPS {serve_name} {what}: {number} "
                      f"({int(number) / max(sent, 1):.2f} per message)")
    by_mode: dict[str, list[dict]] = {m: [r for r in results if r["mode"] == m] for m in modes}
    baseline_of_round = {r["round"]: r["rate"] for r in by_mode.get("a", [])}
    summary = {}
    for mode in modes:
        rates = [r["rate"] for r in by_mode[mode]]
        ratios = [r["rate"] / baseline_of_round[r["round"]] for r in by_mode[mode]
                  if baseline_of_round.get(r["round"])]
        machine_cpu = median([r["machine_ms_per_msg"] for r in by_mode[mode]])
        cpus = [r["cpu_ms_per_msg"] for r in by_mode[mode] if r["cpu_ms_per_msg"] is not None]
        cpu = {key: median([c[key] for c in cpus]) for key in cpus[0]} if cpus else None
        summary[mode] = (median(rates), median(ratios), cpu, rates, machine_cpu)

    print()
    print(f"# medians over {rounds} round(s) of {count} messages; ratio = rate / baseline of the same round")
    for mode in modes:
        rate, ratio, cpu, rates, machine_cpu = summary[mode]
        each = " ".join(f"{r:.0f}" for r in rates)
        cpu = cpu_text(mode, cpu)
        print(f"RESULT {mode} {LABELS[mode]:<38} msgs/s={rate:7.1f}  ratio={ratio:5.2f}  (rounds: {each})"
              + (f"  {cpu}" if cpu else "") + f"  machine_cpu={machine_cpu:.2f}ms/msg")
    targets = full_path_targets(summary, by_mode)
    lines, latency_target = latency_lines(latencies)
    for line in lines:
        print(line)
    if latency_target is not None:
        targets.append(latency_target)
    for line, _ in targets:
        print(line + (" [not enforced: --quick]" if args.quick else ""))
    missed = any(not met for _, met in targets)
    if not args.keep and not broken:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"# work directory kept: {base}")
    if broken:
        return 1
    return 2 if missed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
