#!/opt/mailgate/bin/python
"""The "inet: stall": why a milter on a TCP socket is slower than on a unix socket, shown on the wire.

One Postfix, one smtp-sink, one SMTP session at a time (`smtp-source -s 1`), so that every wait
adds up in the per-message time. Each variant's milter traffic is captured with tcpdump on lo and
searched for the Nagle + delayed-ACK signature: a small data segment, then ~40 ms of silence, then
a bare ACK from the peer, and only then the sender's next data segment (the sender held it back
under Nagle's rule until its previous small segment was acknowledged, and the peer's kernel
delayed that ACK because it had nothing to send). Each stall is attributed to the side that was
held back (Postfix -> milter, or milter -> Postfix).

Variants (all in the same run):
  mailgate unix              reference, no TCP
  mailgate inet              as shipped: the fix is built in (TCP_NODELAY on the milter's listening
                             socket, inherited by every connection, and the DATA event answered,
                             so that smtpd waits for the reply; mailgate.milter.app.TcpGatewayMilter)
  trivial inet               pymilter's default milter (DATA not negotiated): the stall, Postfix -> milter
  trivial inet +data-reply   the same milter answering DATA: the fix for that stall

    bench/inet_stall.py [--quick] [--messages N]

Last lines: msgs/s and stalls per message for each variant. Needs tcpdump (apt-get install tcpdump);
without it only the rates are printed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from _common import (
    SENDER,
    SUBMISSION_ROLE,
    LogFollower,
    Serve,
    SmtpSink,
    TrivialMilter,
    bench_config,
    machine,
    smtp_source,
    stop_process,
)

from mailgate.commands.postfixconf import main_settings, milter_address, transport_service
from mailgate.configfile import load_config
from mailgate.infra.socketspec import parse_socket_spec
from mailgate.lab.ports import free_port
from mailgate.lab.postfix import POSTCONF, PrivatePostfix, make_basedir

POLICY_KEYS = ("smtpd_recipient_restrictions", "smtpd_policy_service_default_action")
LINE = re.compile(r"^(?P<t>\d+\.\d+) IP (?P<src>[\d.]+)\.(?P<sport>\d+) > (?P<dst>[\d.]+)\.(?P<dport>\d+): "
                  r"Flags \[(?P<flags>[^\]]*)\].*?length (?P<len>\d+)")


def analyse(pcap: Path, milter_port: int) -> dict:
    """Stalls in a capture: (data from S) ... >=30 ms ... (bare ACK to S) then S's data within 5 ms."""
    text = subprocess.run(["tcpdump", "-r", str(pcap), "-tt", "-n", "-S"], capture_output=True, text=True).stdout
    packets = []
    for line in text.splitlines():
        found = LINE.match(line)
        if found:
            packets.append((float(found["t"]), int(found["sport"]), int(found["dport"]), found["flags"],
                            int(found["len"])))
    by_conn: dict[tuple[int, int], list] = {}
    for packet in packets:
        key = tuple(sorted((packet[1], packet[2])))
        by_conn.setdefault(key, []).append(packet)
    stalls: Counter[str] = Counter()
    stall_time: Counter[str] = Counter()
    for seq in by_conn.values():
        for i in range(1, len(seq) - 1):
            t, sport, dport, flags, length = seq[i]
            prev, nxt = seq[i - 1], seq[i + 1]
            is_bare_ack = length == 0 and flags == "."
            if not is_bare_ack:
                continue
            # prev: data from the peer of this ACK's sender; nxt: more data from that same peer
            if prev[1] == dport and prev[4] > 0 and t - prev[0] >= 0.030 and nxt[1] == dport and nxt[4] > 0 \
                    and nxt[0] - t < 0.005:
                held = "postfix->milter" if dport != milter_port else "milter->postfix"
                stalls[held] += 1
                stall_time[held] += t - prev[0]
    return {"packets": len(packets), "connections": len(by_conn), "stalls": dict(stalls),
            "stall_ms": {k: v * 1000 for k, v in stall_time.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 messages per variant")
    parser.add_argument("--messages", type=int, help="messages per variant (full: 100)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    count = args.messages or (20 if args.quick else 100)
    tcpdump = shutil.which("tcpdump")
    info = machine()
    print(f"# inet stall: {count} messages per variant, one SMTP session at a time; nproc={info['nproc']} "
          f"python={info['python']} postfix={info['postfix']}; tcpdump {'found' if tcpdump else 'missing'}", flush=True)
    base = make_basedir("mgi")
    sink = SmtpSink(base).start()
    variants = [  # name, kind, trivial milter flags, inet?
        ("mailgate unix", "serve", {}, False),
        ("mailgate inet", "serve", {}, True),
        ("trivial inet", "trivial", {}, True),
        ("trivial inet +data-reply", "trivial", {"data_reply": True}, True),
    ]
    procs: list = []
    settings: dict[str, dict[str, str]] = {}
    ports: dict[str, int] = {}
    pf = None
    results = []
    broken = False
    try:
        first_config = None
        for number, (name, kind, extra, inet) in enumerate(variants):
            port = free_port()
            spec = f"inet:{port}@127.0.0.1" if inet else f"unix:{base}/v{number}-milter.sock"
            ports[name] = port if inet else 0
            if kind == "serve":
                path = bench_config(base, f"v{number}", sink.port, milter=spec)
                config = load_config(path).config
                first_config = first_config or config
                procs.append(Serve(path).start())
                wanted = dict(main_settings(config))
                for key in POLICY_KEYS:
                    wanted.pop(key)
            else:
                procs.append(TrivialMilter(base, spec, name=f"v{number}", **extra).start())
                transport = first_config.servers[0].transport
                static = base / "sender-transport"
                static.write_text(f"{SENDER} {transport}\n")
                address = milter_address(parse_socket_spec(spec))
                wanted = {"sender_dependent_default_transport_maps": f"texthash:{static}", "smtpd_milters": address,
                          "non_smtpd_milters": address, "milter_default_action": "tempfail", "milter_protocol": "6"}
            settings[name] = wanted
        every = set().union(*settings.values())
        pf = PrivatePostfix(base / "pf", listeners={"submission": {
            "milter_macro_daemon_name": SUBMISSION_ROLE,
            "smtpd_policy_service_policy_context": SUBMISSION_ROLE}}, main_cf=settings[variants[0][0]])
        for server in first_config.servers:
            pf.add_master_service("\n".join(transport_service(first_config, server)) + "\n")
        pf.start()
        current = variants[0][0]
        for number, (name, _, _, inet) in enumerate(variants):
            if name != current:
                remove = sorted(every - set(settings[name]))
                if remove:
                    subprocess.run([POSTCONF, "-c", str(pf.config_dir), "-X", *remove], check=True, capture_output=True)
                pf.postconf(settings[name])
                pf.reload()
                current = name
                time.sleep(0.5)
            dump = None
            pcap = base / f"v{number}.pcap"
            if tcpdump and inet:
                dump = subprocess.Popen([tcpdump, "-i", "lo", "-n", "-s", "128", "-w", str(pcap),
                                         f"tcp port {ports[name]}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                assert dump.stderr is not None
                dump.stderr.readline()  # "listening on lo ..."
            recipient = f"v{number}@customer.example"
            follower = LogFollower(pf.maillog)
            start = time.monotonic()
            source = smtp_source(pf.port("submission"), count, recipient, base / "source.out", sessions=1)
            source.wait(600)
            accepted = time.monotonic() - start
            sent = 0
            deadline = time.monotonic() + 60
            while sent < count and time.monotonic() < deadline:
                sent += sum(1 for line in follower.new_lines() if f"to=<{recipient}>" in line and "status=sent" in line)
                time.sleep(0.05)
            if dump is not None:
                time.sleep(0.2)
                stop_process(dump, timeout=10)
            analysis = analyse(pcap, ports[name]) if dump is not None else None
            result = {"name": name, "rate": count / accepted, "ms_per_msg": accepted * 1000 / count, "sent": sent,
                      "analysis": analysis}
            results.append(result)
            line = f"{name:<24} {result['rate']:6.1f} msgs/s accepted ({result['ms_per_msg']:.1f} ms per message)"
            if analysis:
                per = {k: v / count for k, v in analysis["stalls"].items()}
                line += ("; stalls per message: "
                         + (", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items())) or "none")
                         + (f" ({sum(analysis['stall_ms'].values()) / count:.1f} ms/msg)"
                            if analysis["stall_ms"] else ""))
            print(line, flush=True)
            if sent < count:
                broken = True
                print(f"  BROKEN: {sent}/{count} delivered\n{pf.log_tail(10)}", flush=True)
    except Exception as exc:
        broken = True
        print(f"BROKEN: {type(exc).__name__}: {exc}", flush=True)
    finally:
        if pf is not None:
            pf.stop()
        for proc in procs:
            proc.stop()
        sink.stop()
    print()
    for r in results:
        a = r["analysis"]
        stall_text = "-"
        if a:
            stall_text = ", ".join(f"{k}={v / count:.2f}/msg ({a['stall_ms'][k] / count:.1f} ms/msg)"
                                   for k, v in sorted(a["stalls"].items())) or "none"
        print(f"RESULT {r['name']:<24} msgs/s={r['rate']:6.1f}  ms/msg={r['ms_per_msg']:6.1f}  stalls: {stall_text}")
    if args.keep or broken:
        print(f"# work directory kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
