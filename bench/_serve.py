"""`mailgate …` with an experimental patch applied first (benchmarks only).

    _serve.py --nodelay serve --config FILE
    _serve.py --count-lookups OUT serve --config FILE
    _serve.py --nodelay --data-reply serve --config FILE

`--nodelay`: right after mailgate's milter opens its socket (mailgate.milter.app.serve_milter
calls `Milter.milter.opensocket`), set TCP_NODELAY on the listening socket, so every accepted
Postfix connection has it — the proposed fix for the inet: stall, measured without touching src/.
`--data-reply`: negotiate the DATA event with a reply (GatewayMilter.data without @nocallback).
`--count-lookups OUT`: count the socketmap lookups by map and kind of key, written to OUT at exit.
"""

from __future__ import annotations

import os
import sys

import Milter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _nodelay import set_nodelay_on_listeners  # noqa: E402


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
