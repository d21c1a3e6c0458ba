"""`mailgate check-health`: the running gateway's /healthz, for scripts and monitoring agents.

It asks the `serve` named by the configuration (its `listen.metrics`) rather than checking the
pieces itself: only the running process knows whether its milter process is up, and a check
that opened the store on its own would prove only that this shell can write it.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from typing import TextIO

from mailgate.config import Config
from mailgate.rules.replies import EXIT


def health_url(config: Config) -> str | None:
    spec = config.listen.metrics
    if spec is None:
        return None
    host = f"[{spec.host}]" if spec.family == "inet6" else spec.host
    return f"http://{host}:{spec.port}/healthz"


def check_health(config: Config, timeout: float = 10.0, out: TextIO | None = None) -> int:
    """Print the answer; exit `ok` for 200, `failure` for 503, `unavailable` when nothing answers,
    `config` when the configuration has no metrics listener to ask."""
    out = out or sys.stdout
    url = health_url(config)
    if url is None:
        print("mailgate: listen.metrics is not set: serve has no health endpoint to ask", file=sys.stderr)
        return EXIT["config"]
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            out.write(answer.read().decode(errors="replace"))
            return EXIT["ok"]
    except urllib.error.HTTPError as exc:
        out.write(exc.read().decode(errors="replace"))
        return EXIT["failure"]
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"mailgate: nothing answers at {url}: {reason}", file=sys.stderr)
        return EXIT["unavailable"]
