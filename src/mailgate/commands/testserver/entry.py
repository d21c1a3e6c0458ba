"""The entry point, `test_server`: find the server by name, run the probe, and always return
a result."""

from __future__ import annotations

import difflib

from mailgate.commands.testserver.probe import Probe, Stop
from mailgate.commands.testserver.result import FIXES, ServerTestResult, Step
from mailgate.config import Config


def test_server(config: Config, name: str, *, send_to: str | None = None,
                timeout: float = 15.0) -> ServerTestResult:
    """Test one server of the config by name; inactive servers are tested too (and said so)."""
    server = config.server_named(name)
    if server is None:
        names = [s.name for s in config.servers]
        close = difflib.get_close_matches(name, names, n=1)
        detail = f"no server named '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
        fix = FIXES["unknown-server"].format(names=", ".join(names) or "none")
        return ServerTestResult(name, None, (Step("server", False, detail, fix),))
    state = "active" if server.active else "inactive (active: false), tested anyway"
    probe = Probe(config, server, timeout)
    probe.steps.append(Step("server", True, f"{server.host}:{server.port}, security: "
                                            f"{server.security}, {state}"))
    try:
        probe.run(send_to)
    except Stop:
        pass
    finally:
        probe.close()
    return ServerTestResult(name, server, tuple(probe.steps), send_to if probe.steps[-1].ok else None)


test_server.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite its name
