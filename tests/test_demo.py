"""The README's first command: `mailgate demo` runs both directions and says where mail landed."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_runs_end_to_end():
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).with_name("mailgate")), "demo"], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    landed = [line for line in result.stdout.splitlines() if line.strip().startswith("landed:")]
    assert len(landed) == 6
    assert "server 'transactional' (TLS, AUTH odoo@mycompany.com) as From: \"Admin\" <notifications@mycompany.com>" \
        in result.stdout
    assert "server 'mass' (TLS)" in result.stdout and "server 'partner' (plain)" in result.stdout
    out = result.stdout
    assert re.search(r"^a\. a customer's reply to message 1 +-> Odoo, route reply:<\w+@demo\.example>", out, re.M)
    assert re.search(r"^b\. a new mail to sales@ +-> Odoo, route alias:sales, model crm\.lead", out, re.M)
    assert "refused at RCPT: 550 5.1.1 <nobody@mycompany.com>: Recipient address rejected: no such alias" in out
    assert "loop threshold 3 in the demo's config" in out
    assert "refused at end of data: 550 5.7.1 too many messages from this sender: mail loop suspected" in out
    assert "-> recorded as a bounce: 5.1.1 " in out
    assert re.search(r"^  refused at rcpt: no_such_alias +1$", out, re.M)
    assert re.search(r"^  bounce userunknown \(hard\) +1$", out, re.M)
    assert re.search(r"^Metrics while the demo runs: http://127\.0\.0\.1:\d+/metrics", out, re.M)
    assert time.monotonic() - started < 60, "the demo should take seconds"
