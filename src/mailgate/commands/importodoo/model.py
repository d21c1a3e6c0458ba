"""What the steps of the import hand each other: the one-line error, the result, the Odoo values
as read; and what more than one step needs: the ports of mailgate's listeners for Odoo (named in
the YAML and in the Odoo-side change) and one-line text for comments and messages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUBMISSION_PORT, MASS_PORT = 10025, 10026


class ImportFailed(Exception):
    """The import cannot go on; the message is one line, safe to show (no password)."""


@dataclass(frozen=True)
class ImportResult:
    yaml_text: str
    odoo_changes: str                      # what to change in Odoo once mailgate runs
    secret_files: tuple[Path, ...]         # one 0600 file per server with a password
    layout: str                            # "mail_alias_domain" (Odoo 17+) or "ir_config_parameter"
    warnings: tuple[str, ...] = ()


@dataclass
class Odoo:
    """What was read, before any mapping: Odoo's values as they are stored."""

    database: str
    version: str | None
    tables: set[str]
    params: dict[str, str]
    domains: list[dict[str, Any]]          # mail_alias_domain rows, main first ([] before 17)
    servers: list[dict[str, Any]]
    aliases: list[dict[str, Any]]
    allowed_senders: list[str] | None      # None: no mail_gateway_allowed table


def oneline(text: str) -> str:
    return " ".join(str(text).split())
