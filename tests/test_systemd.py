"""The systemd units: `systemd-analyze verify` clean, and the hardening operators rely on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def directives(name: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


@pytest.mark.e2e
def test_systemd_analyze_verify_is_clean():
    result = subprocess.run(["systemd-analyze", "verify", *(str(p) for p in sorted(UNITS.glob("*.service")))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("name", ["mailgate.service", "mailgate-watch-log.service"])
def test_hardening(name):
    unit = directives(name)
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "true", "NoNewPrivileges": "true",
                       "PrivateTmp": "true", "CapabilityBoundingSet": "", "SystemCallFilter": "@system-service",
                       "User": "mailgate", "Group": "mailgate", "Restart": "on-failure",
                       "StateDirectory": "mailgate"}.items():
        assert unit.get(key) == value, key


def test_gateway_unit_contract():
    unit = directives("mailgate.service")
    assert unit["Type"] == "notify" and unit["ExecStart"].endswith("mailgate serve")
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (unit["RuntimeDirectory"] == "mailgate" and unit["SupplementaryGroups"] == "postfix"
            and unit["UMask"] == "0007")
    # Postfix's processes are not in group mailgate: they reach the sockets through "others"
    assert int(unit["RuntimeDirectoryMode"], 8) & 0o001


def test_gateway_unit_raises_the_descriptor_limit():
    """Postfix's connections to the lookup and policy services need more than the default 1024."""
    assert int(directives("mailgate.service")["LimitNOFILE"]) >= 65536
