#!/opt/mailgate/bin/python
"""The lookup (socketmap) and policy services alone: requests/s and latency, like Postfix uses them.

A running `mailgate serve` (the realistic bench configuration, its own SQLite) is driven by 1, 8
and 64 clients; each client is a separate process with one connection doing request -> reply in
lock step, as Postfix's processes do. In the same run the same clients drive a trivial asyncio
echo server (bench/echo_services.py) for both protocols: the ceiling of this harness on this
machine, and the ratio.

Workloads:
  socketmap      `transport <sender>`: half tokenised bounce senders (HMAC verified, as qmgr asks
                 for every message), half plain senders routed by the outbound rule
  policy-out     RCPT from the submission listener to an outside recipient: the daily quota is
                 counted and taken in one SQLite transaction (1,000 sender domains)
  policy-in      RCPT on the inbound listener to a business alias: alias check only, no database
  policy-quota-N one client, policy-out for one sender domain that already has N quota events in
                 the 24 h window (how the quota count scales)
  message        what Postfix asks per outbound message in bench/throughput.py's full path (c), in
                 its order: policy RCPT (quota taken), policy END-OF-MESSAGE (kept), socketmap
                 `transport <token>`; figures per message, not per request. (No `delivery` lookup:
                 postfix-config's transport_maps settle outside recipients in Postfix; `--only
                 message-delivery` adds it, as Postfix asked before.)

    bench/services.py [--quick] [--seconds S] [--clients 1,8,64] [--only socketmap,policy-out,...]
                      [--event-loop asyncio]

The echo baselines run on the standard asyncio loop (`echo-*`) and on uvloop (`echo-uv-*`, when
uvloop is installed), since `mailgate serve` uses uvloop when it can; `--event-loop asyncio`
makes mailgate use the standard loop too (MAILGATE_EVENT_LOOP=asyncio).

Last lines: one RESULT line per workload and client count (req/s, p50, p99, server CPU per
request), the ratios to the echo server, and the targets. Exit: 0 ok, 1 broken, 2 target missed
(full run only).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, PYTHON, Serve, bench_config, cpu_seconds, machine, percentile, stop_process

from mailgate.infra.sockets import socket_is_listening
from mailgate.infra.socketspec import parse_socket_spec
from mailgate.lab.postfix import make_basedir
from mailgate.policy.netstring import encode
from mailgate.rules.tokens import TokenSigner

try:
    import uvloop  # noqa: F401
    HAVE_UVLOOP = True
except ImportError:
    HAVE_UVLOOP = False

TARGET_SOCKETMAP = 30_000
TARGET_POLICY = 10_000
TARGET_P99_MS = 2.0
TARGET_CLIENTS = 8


# -- requests --------------------------------------------------------------------------------------

def gateway_signer(secret: bytes, database: Path) -> TokenSigner:
    """Tokens as the running gateway signs them: keyed with the store's identity where the
    store has one (`store_identity`), with the secret alone where it has not."""
    try:
        with contextlib.closing(sqlite3.connect(database)) as conn:
            store_id = conn.execute("select id from store_identity").fetchone()[0]
    except sqlite3.Error:
        return TokenSigner(secret)
    return TokenSigner(secret, store_id)


def socketmap_requests(signer: TokenSigner, now: float) -> list[bytes]:
    servers = ["transactional", "partner", "mass", None]
    keys = []
    for i in range(500):
        token = signer.make(1000 + i, servers[i % len(servers)], now)
        keys.append(f"bounce+{token}@mycompany.com")
    plain = ["odoo@mycompany.com", "sales@partner.example", "someone@customer.example", "admin@mycompany.com",
             "news@othercompany.example"]
    for i in range(500):
        keys.append(f"user{i}@{plain[i % len(plain)].split('@')[1]}")
    order = []
    for i in range(500):  # interleave tokenised and plain
        order += [keys[i], keys[500 + i]]
    return [encode(f"transport {key}".encode()) for key in order]


def policy_request(*, sender: str, recipient: str, context: str, instance: str, state: str = "RCPT",
                   recipient_count: int = 0, queue_id: str = "") -> bytes:
    """A Postfix 3.7 request (RCPT time unless `state` says otherwise), with every attribute Postfix sends."""
    attrs = {
        "request": "smtpd_access_policy", "protocol_state": state, "protocol_name": "ESMTP",
        "client_address": "127.0.0.1", "client_name": "localhost", "client_port": "41234",
        "reverse_client_name": "localhost", "server_address": "127.0.0.1", "server_port": "10025",
        "helo_name": "odoo.mycompany.com", "sender": sender, "recipient": recipient,
        "recipient_count": str(recipient_count), "queue_id": queue_id, "instance": instance, "size": "2000",
        "etrn_domain": "", "stress": "",
        "sasl_method": "", "sasl_username": "", "sasl_sender": "", "ccert_subject": "", "ccert_issuer": "",
        "ccert_fingerprint": "", "ccert_pubkey_fingerprint": "", "encryption_protocol": "",
        "encryption_cipher": "", "encryption_keysize": "0", "policy_context": context,
        "compatibility_level": "3.6", "mail_version": "3.7.11",
    }
    return ("".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n").encode()


def policy_out_requests() -> list[bytes]:
    return [policy_request(sender=f"odoo@dom{i % 1000}.example", recipient=f"customer{i}@gmail.example",
                           context="ORIGINATING", instance=f"{i:x}.6563a1b2.{i % 97:x}.0") for i in range(1000)]


def policy_in_requests() -> list[bytes]:
    aliases = ["sales@mycompany.com", "support@mycompany.com", "catchall@mycompany.com", "sales@othercompany.example"]
    return [policy_request(sender=f"client{i}@customer.example", recipient=aliases[i % len(aliases)],
                           context="INBOUND", instance=f"{i:x}.6563a1b2.{i % 89:x}.0") for i in range(1000)]


def message_requests(signer: TokenSigner, now: float, delivery: bool = False) -> list[tuple[bytes, ...]]:
    """Per message, the requests of the full path: (policy RCPT, policy END-OF-MESSAGE, socketmap
    transport[, socketmap delivery]), the first two on the policy connection."""
    messages = []
    for i in range(1000):
        instance = f"{i:x}.6563a1b2.{i % 97:x}.0"
        recipient = f"customer{i}@customer.example"
        rcpt = policy_request(sender="odoo@mycompany.com", recipient=recipient, context="ORIGINATING",
                              instance=instance)
        end = policy_request(sender="odoo@mycompany.com", recipient="", context="ORIGINATING", instance=instance,
                             state="END-OF-MESSAGE", recipient_count=1, queue_id=f"4Q{i:08X}")
        token = signer.make(1000 + i, "transactional", now)
        lookups = [encode(f"transport bounce+{token}@mycompany.com".encode())]
        if delivery:
            lookups.append(encode(f"delivery {recipient}".encode()))
        messages.append((rcpt, end, *lookups))
    return messages


def policy_quota_requests(domain: str) -> list[bytes]:
    return [policy_request(sender=f"odoo@{domain}", recipient=f"customer{i}@gmail.example", context="ORIGINATING",
                           instance=f"{i:x}.6563a1b2.0.0") for i in range(1000)]


# -- clients ---------------------------------------------------------------------------------------

def _read_netstring(sock: socket.socket, buf: bytearray) -> None:
    while True:
        colon = buf.find(b":")
        if colon > 0 and len(buf) >= colon + 2 + int(buf[:colon]):
            del buf[:colon + 2 + int(buf[:colon])]
            return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def _read_policy(sock: socket.socket, buf: bytearray) -> None:
    while True:
        end = buf.find(b"\n\n")
        if end >= 0:
            if not buf.startswith(b"action="):
                raise RuntimeError(f"unexpected policy reply {bytes(buf[:80])!r}")
            del buf[:end + 2]
            return
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


Exchange = Callable[[Any], None]


def message_exchange(policy_path: str, lookup_path: str) -> tuple[list[socket.socket], Exchange]:
    """A `message` client's two connections and the exchange of one message's requests."""
    policy, lookup = _connect(policy_path), _connect(lookup_path)
    policy_buf, lookup_buf = bytearray(), bytearray()

    def exchange(message: tuple[bytes, ...]) -> None:
        for request in message[:2]:
            policy.sendall(request)
            _read_policy(policy, policy_buf)
        for request in message[2:]:
            lookup.sendall(request)
            _read_netstring(lookup, lookup_buf)
    return [policy, lookup], exchange


def request_exchange(path: str, protocol: str) -> tuple[list[socket.socket], Exchange]:
    """One connection and the exchange of one request for it."""
    read = _read_netstring if protocol == "socketmap" else _read_policy
    sock = _connect(path)
    buf = bytearray()

    def exchange(request: bytes) -> None:
        sock.sendall(request)
        read(sock, buf)
    return [sock], exchange


def client(path: str, protocol: str, requests: list, offset: int, barrier, seconds: float, results) -> None:
    """One connection (two for `message`: policy and lookup), request -> reply in lock step
    until the time is up."""
    try:
        if protocol == "message":
            socks, exchange = message_exchange(*path.split("|"))
        else:
            socks, exchange = request_exchange(path, protocol)
        n = len(requests)
        for i in range(20):  # warm the connection
            exchange(requests[(offset + i) % n])
        latencies = []
        append = latencies.append
        clock = time.perf_counter_ns
        barrier.wait(60)
        start = clock()
        deadline = start + int(seconds * 1e9)
        i = offset
        now = start
        while now < deadline:
            exchange(requests[i % n])
            after = clock()
            append(after - now)
            now = after
            i += 1
        for sock in socks:
            sock.close()
        results.put((len(latencies), (now - start) / 1e9, latencies, None))
    except BaseException as exc:  # reported by the parent
        results.put((0, 0.0, [], f"{type(exc).__name__}: {exc}"))


def drive(path: str, protocol: str, requests: list, clients: int, seconds: float,
          server_pid: int | None) -> dict:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=client, args=(path, protocol, requests, k * 997, barrier, seconds, results))
             for k in range(clients)]
    for proc in procs:
        proc.start()
    barrier.wait(120)
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    gathered = [results.get(timeout=seconds + 120) for _ in procs]
    cpu_after = cpu_seconds(server_pid) if server_pid else 0.0
    for proc in procs:
        proc.join(30)
    errors = [g[3] for g in gathered if g[3]]
    total = sum(g[0] for g in gathered)
    elapsed = max(g[1] for g in gathered) or seconds
    latencies = sorted(x for g in gathered for x in g[2])
    return {
        "requests": total, "rate": total / elapsed, "errors": errors,
        "p50_ms": percentile(latencies, 0.50) / 1e6, "p99_ms": percentile(latencies, 0.99) / 1e6,
        "server_us": (cpu_after - cpu_before) * 1e6 / total if total and server_pid else None,
    }


def start_echo(base: Path, name: str, socketmap: Path, policy: Path, *, uvloop: bool) -> subprocess.Popen:
    """bench/echo_services.py on the standard asyncio loop, or on uvloop's."""
    script = str(BENCH_DIR / "echo_services.py")
    if uvloop:
        argv = [PYTHON, "-c", "import asyncio, runpy, sys, uvloop; "
                "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
                f"sys.argv = sys.argv[1:]; runpy.run_path({script!r}, run_name='__main__')", script]
    else:
        argv = [PYTHON, script]
    with open(base / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([*argv, str(socketmap), str(policy)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (socket_is_listening(parse_socket_spec(f"unix:{socketmap}"))
               and socket_is_listening(parse_socket_spec(f"unix:{policy}"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{name} server did not start")
        time.sleep(0.05)
    return proc


def preload_quota(database: Path, domain: str, rows: int, now: float) -> None:
    """`rows` recipients taken by one key, spread over the last 23 hours (inside the 24 h window),
    in the store's per-minute counters."""
    conn = sqlite3.connect(database, timeout=30)
    key = f"domain:{domain}"
    step = 23 * 3600 / max(rows, 1)
    with conn:
        conn.executemany("insert into quota_counters (key, stream, minute, count) values (?, 'transactional', ?, 1) "
                         "on conflict (key, stream, minute) do update set count = quota_counters.count + 1",
                         ((key, int((now - 23 * 3600 + i * step) // 60)) for i in range(rows)))
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: 1 s per measurement, fewer levels, no targets")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (full: 5)")
    parser.add_argument("--clients", help="client counts, comma separated (default 1,8,64)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--only", help="workloads to run, comma separated (default: all)")
    parser.add_argument("--event-loop", choices=["default", "asyncio"], default="default",
                        help="asyncio: mailgate serve on the standard loop even when uvloop is installed")
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    levels = [int(c) for c in (args.clients or "1,8,64").split(",")]
    quota_levels = [0, 10_000] if args.quick else [0, 10_000, 100_000]
    info = machine()
    print(f"# services: {seconds:g} s per measurement, clients {levels}; nproc={info['nproc']} "
          f"cpu={info['cpu']!r} python={info['python']}; load average {os.getloadavg()[0]:.2f}", flush=True)

    base = make_basedir("mgs")
    config_path = bench_config(base, "svc", 2525)
    serve = Serve(config_path, env={"MAILGATE_EVENT_LOOP": "asyncio"} if args.event_loop == "asyncio" else {})
    echo_proc = echo_uv_proc = None
    rows: list[tuple[str, int, dict]] = []
    broken = False
    try:
        serve.start()
        echo_map, echo_policy = base / "echo-map.sock", base / "echo-policy.sock"
        echo_proc = start_echo(base, "echo", echo_map, echo_policy, uvloop=False)
        echo_uv_map, echo_uv_policy = base / "echo-uv-map.sock", base / "echo-uv-policy.sock"
        if HAVE_UVLOOP:
            echo_uv_proc = start_echo(base, "echo-uv", echo_uv_map, echo_uv_policy, uvloop=True)

        signer = gateway_signer((base / "svc-secret").read_bytes().strip(), base / "svc-state" / "mailgate.sqlite3")
        now = time.time()
        lookup_path = str(base / "svc-lookup.sock")
        policy_path = str(base / "svc-policy.sock")
        workloads = [
            ("socketmap", "socketmap", lookup_path, socketmap_requests(signer, now), serve.pid),
            ("echo-socketmap", "socketmap", str(echo_map), socketmap_requests(signer, now), echo_proc.pid),
            ("policy-out", "policy", policy_path, policy_out_requests(), serve.pid),
            ("policy-in", "policy", policy_path, policy_in_requests(), serve.pid),
            ("echo-policy", "policy", str(echo_policy), policy_in_requests(), echo_proc.pid),
            ("message", "message", f"{policy_path}|{lookup_path}", message_requests(signer, now), serve.pid),
            ("message-delivery", "message", f"{policy_path}|{lookup_path}", message_requests(signer, now, True),
             serve.pid),
        ]
        if echo_uv_proc is not None:
            workloads += [
                ("echo-uv-socketmap", "socketmap", str(echo_uv_map), socketmap_requests(signer, now), echo_uv_proc.pid),
                ("echo-uv-policy", "policy", str(echo_uv_policy), policy_in_requests(), echo_uv_proc.pid),
            ]
        if args.only:
            wanted = set(args.only.split(","))
            workloads = [w for w in workloads if w[0] in wanted]
            quota_levels = [n for n in quota_levels if {"policy-quota", f"policy-quota-{n}"} & wanted]
        for clients in levels:
            for name, protocol, path, requests, pid in workloads:
                result = drive(path, protocol, requests, clients, seconds, pid)
                rows.append((name, clients, result))
                cpu = f"{result['server_us']:.1f} us/req" if result["server_us"] is not None else "-"
                print(f"{name:<15} clients={clients:<3} {result['rate']:9.0f} req/s  p50={result['p50_ms']:.3f} ms  "
                      f"p99={result['p99_ms']:.3f} ms  server CPU {cpu}", flush=True)
                if result["errors"] or not result["requests"]:
                    broken = True
                    print(f"  BROKEN: {result['errors'][:3]}", flush=True)

        database = base / "svc-state" / "mailgate.sqlite3"
        for preload in quota_levels:
            domain = f"quota{preload}.example"
            preload_quota(database, domain, preload, time.time())
            result = drive(policy_path, "policy", policy_quota_requests(domain), 1, seconds, serve.pid)
            rows.append((f"policy-quota-{preload}", 1, result))
            print(f"policy-quota-{preload:<7} clients=1   {result['rate']:9.0f} req/s  p50={result['p50_ms']:.3f} ms  "
                  f"p99={result['p99_ms']:.3f} ms  server CPU {result['server_us']:.1f} us/req", flush=True)
            if result["errors"]:
                broken = True
    except Exception as exc:
        broken = True
        print(f"BROKEN: {type(exc).__name__}: {exc}", flush=True)
    finally:
        stop_process(echo_proc)
        stop_process(echo_uv_proc)
        serve.stop()

    table = {(name, clients): result for name, clients, result in rows}
    print()
    print(f"# {seconds:g} s per measurement; each client one connection in lock step; server CPU = CPU time of "
          "the serving process / requests (`message*`: per message)")
    for name, clients, r in rows:
        cpu = f"{r['server_us']:.1f}" if r["server_us"] is not None else "-"
        print(f"RESULT {name:<18} clients={clients:<3} req/s={r['rate']:8.0f}  p50_ms={r['p50_ms']:.3f}  "
              f"p99_ms={r['p99_ms']:.3f}  server_cpu_us={cpu}")
    for name, echo in (("socketmap", "echo-socketmap"), ("policy-out", "echo-policy"), ("policy-in", "echo-policy"),
                       ("socketmap", "echo-uv-socketmap"), ("policy-out", "echo-uv-policy"),
                       ("policy-in", "echo-uv-policy")):
        for clients in levels:
            if (name, clients) in table and (echo, clients) in table and table[(echo, clients)]["rate"]:
                ratio = table[(name, clients)]["rate"] / table[(echo, clients)]["rate"]
                print(f"RATIO {name}/{echo} clients={clients}: {ratio:.2f}")
    missed = False
    checks = []
    at = [c for c in levels if c >= 4]
    if at:
        for name, target in (("socketmap", TARGET_SOCKETMAP), ("policy-out", TARGET_POLICY),
                             ("policy-in", TARGET_POLICY)):
            rates = [table[(name, c)]["rate"] for c in at if (name, c) in table]
            if rates:
                checks.append((f"{name} >= {target}/s over 4+ connections", max(rates) >= target,
                               f"{max(rates):.0f}/s"))
    if TARGET_CLIENTS in levels:
        for name in ("socketmap", "policy-out", "policy-in"):
            if (name, TARGET_CLIENTS) in table:
                p99 = table[(name, TARGET_CLIENTS)]["p99_ms"]
                checks.append((f"{name} p99 < {TARGET_P99_MS} ms at {TARGET_CLIENTS} clients", p99 < TARGET_P99_MS,
                               f"{p99:.3f} ms"))
    for text, met, value in checks:
        missed |= not met
        print(f"TARGET {text}: {'MET' if met else 'MISSED'} ({value})"
              f"{' [not enforced: --quick]' if args.quick else ''}")
    if args.keep or broken:
        print(f"# work directory kept: {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    if broken:
        return 1
    return 2 if missed and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
