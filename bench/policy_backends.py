"""Policy-service requests/s with the SQLite store and with the PostgreSQL store, in one run.

The handler the policy server calls (`GatewayPolicy`) is driven in process, so the figure is
the decision and the store round trips (the socket layer is the same for both backends and is
measured by bench/services.py). Two workloads: an outbound RCPT (quota: a transaction with a
count and an increment) and an inbound RCPT (alias check, no store). PostgreSQL is a private
cluster on loopback (mailgate.lab.postgres), fsync off like the tests: a lower bound for a real
server's latency. Prints `RESULT` lines and the ratio PostgreSQL / SQLite last.
"""

from __future__ import annotations

import argparse
import shutil
import time

from mailgate.configfile import parse_config
from mailgate.infra.runtime import Runtime
from mailgate.lab.postfix import make_basedir
from mailgate.lab.postgres import PrivatePostgres
from mailgate.policy.attributes import PolicyRequest
from mailgate.policy.recipients import GatewayPolicy
from mailgate.rules.tokens import TokenSigner
from mailgate.store import open_store
from mailgate.store.sqlite import SQLiteStore

CONFIG = parse_config("""
alias_domain: mycompany.com
aliases: {sales: {target: "odoo:crm.lead"}}
quota: {daily: null, mass_daily: null, scope: sender_domain}
""", check_files=False).config
QUOTA_CONFIG = parse_config("""
alias_domain: mycompany.com
quota: {daily: 100000000, scope: sender_domain}
""", check_files=False).config


def request(recipient: str, context: str) -> PolicyRequest:
    return PolicyRequest({"request": "smtpd_access_policy", "protocol_state": "RCPT", "sender": "app@shop.example",
                          "recipient": recipient, "policy_context": context, "client_address": "127.0.0.1"})


def rate(policy: GatewayPolicy, req: PolicyRequest, count: int) -> float:
    for _ in range(min(200, count)):  # warm up: connections, caches, the first pages
        policy(req)
    start = time.perf_counter()
    for _ in range(count):
        policy(req)
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="500 requests")
    args = parser.parse_args()
    count = 500 if args.quick else args.requests
    base = make_basedir("mgbpb")
    server = PrivatePostgres(base / "pg")
    server.start()
    try:
        server.create_database("bench")
        stores = {"sqlite": SQLiteStore(base / "bench.sqlite3"), "postgresql": open_store(server.dsn("bench"))}
        results: dict[tuple[str, str], float] = {}
        for name, store in stores.items():
            signer = TokenSigner(b"k" * 32)
            outbound = GatewayPolicy(Runtime(QUOTA_CONFIG, store, signer))
            inbound = GatewayPolicy(Runtime(CONFIG, store, signer))
            results[(name, "outbound-quota")] = rate(outbound, request("r@customer.example", "ORIGINATING"), count)
            results[(name, "inbound-alias")] = rate(inbound, request("sales@mycompany.com", "INBOUND"), count)
            store.close()
        for (name, workload), value in results.items():
            print(f"RESULT policy {workload} {name}: {value:,.0f} requests/s ({count} requests, in process)")
        for workload in ("outbound-quota", "inbound-alias"):
            ratio = results[("postgresql", workload)] / results[("sqlite", workload)]
            print(f"RATIO policy {workload} postgresql/sqlite = {ratio:.2f}")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
