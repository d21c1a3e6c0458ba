"""The README's first command: `mailgate demo` runs the whole path and says where mail landed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_runs_end_to_end():
    result = subprocess.run([str(Path(sys.executable).with_name("mailgate")), "demo"], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    landed = [line for line in result.stdout.splitlines() if line.strip().startswith("landed:")]
    assert len(landed) == 6
    assert "server 'transactional' (TLS, AUTH odoo@mycompany.com) as From: \"Admin\" <notifications@mycompany.com>" \
        in result.stdout
    assert "server 'mass' (TLS)" in result.stdout and "server 'partner' (plain)" in result.stdout
