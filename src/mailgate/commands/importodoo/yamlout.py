"""Writing the YAML: lines with their comments and warnings, plain or quoted scalars, and mailgate's
own loader asked about each value before it is written."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailgate.commands.importodoo.model import oneline
from mailgate.configfile import ConfigError, parse_config

_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


@dataclass
class Out:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    secrets: dict[Path, str] = field(default_factory=dict)
    deactivated: set[str] = field(default_factory=set)    # active in Odoo, not usable as imported

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def note(self, text: str, indent: str = "") -> None:
        self.lines.append(f"{indent}# {oneline(text)}")

    def warn(self, text: str, indent: str = "") -> None:
        self.note(f"WARNING: {text}", indent)
        self.warnings.append(oneline(text))


def mailgate_rejects(snippet: str) -> str | None:
    """mailgate's own verdict on a YAML fragment: the first error, or None when it loads."""
    try:
        parse_config(snippet, "<value>", check_files=False)
    except ConfigError as exc:
        errors = [p for p in exc.problems if p.severity == "error"]
        return f"{errors[0].key}: {errors[0].message}" if errors else None
    return None


def scalar(value: Any) -> str:
    """A YAML scalar: plain when unambiguous, else a double-quoted (JSON) string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@+-]*", text) and text.lower() not in _YAML_WORDS
            and not re.fullmatch(r"[0-9._+-]+(e[0-9+-]*)?", text, re.I)):
        return text
    return json.dumps(text, ensure_ascii=False)
