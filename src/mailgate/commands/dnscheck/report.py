"""How findings are shown: text for a terminal, or the `--json` shape."""

from __future__ import annotations

from dataclasses import asdict

from mailgate.commands.dnscheck.findings import Finding

LEVELS = ("OK", "WARN", "FAIL")


def render(findings: list[Finding]) -> str:
    """One line per finding with its fix below, then a count per level."""
    lines = []
    several = len({f.domain for f in findings}) > 1
    for index, finding in enumerate(findings):
        if several and (index == 0 or findings[index - 1].domain != finding.domain):
            lines.append(f"{finding.domain}:")
        lines.append(f"{finding.level:4}  {finding.check:5}  {finding.message}")
        if finding.fix:
            lines.append(f"{'':4}  {'':5}  fix: {finding.fix}")
    counts = {level: sum(f.level == level for f in findings) for level in LEVELS}
    lines.append(", ".join(f"{n} {level}" for level, n in counts.items() if n) or "nothing checked")
    return "\n".join(lines)


def findings_json(findings: list[Finding]) -> dict:
    """The `--json` shape: `ok` is false when any finding is a FAIL."""
    return {
        "ok": not any(f.level == "FAIL" for f in findings),
        "counts": {level: sum(f.level == level for f in findings) for level in LEVELS},
        "findings": [asdict(f) for f in findings],
    }
