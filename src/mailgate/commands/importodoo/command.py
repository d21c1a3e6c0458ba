"""The entry points: `import_odoo` (read, render, write the passwords, check the YAML with mailgate's
loader) and `main_import`, the CLI around it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from mailgate.commands.importodoo.files import write_secrets, write_text
from mailgate.commands.importodoo.model import ImportFailed, ImportResult, oneline
from mailgate.commands.importodoo.odoo_changes import odoo_changes
from mailgate.commands.importodoo.reading import read
from mailgate.commands.importodoo.rendering import render
from mailgate.commands.importodoo.yamlout import Out
from mailgate.configfile import ConfigError, parse_config
from mailgate.rules.replies import EXIT


def import_odoo(dsn: str, *, output_dir: Path, secrets_dir: Path | None = None) -> ImportResult:
    """Read the Odoo database at `dsn`; write one password file per server under `secrets_dir`
    (default `output_dir/secrets`) and return the YAML for `output_dir`, with the Odoo-side change.

    The YAML names the password files by absolute path, so it loads wherever it is read from.
    """
    secrets_dir = (secrets_dir or Path(output_dir) / "secrets").absolute()
    odoo = read(dsn)
    out = Out()
    slugs = render(odoo, out, secrets_dir)
    text = "\n".join(out.lines) + "\n"
    write_secrets(secrets_dir, out.secrets)
    try:
        parse_config(text, "<import-odoo>", check_files=True, base=Path(output_dir).absolute())
    except ConfigError as exc:
        raise ImportFailed(f"the generated configuration does not load (a bug): {oneline(str(exc))}") from None
    layout = "mail_alias_domain" if "mail_alias_domain" in odoo.tables else "ir_config_parameter"
    changes = odoo_changes(odoo, slugs, out.deactivated)
    return ImportResult(text, changes, tuple(sorted(out.secrets)), layout, tuple(out.warnings))


def main_import(dsn: str, output: Path | None, secrets_dir: Path | None = None, *, force: bool = False,
                stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The CLI: YAML to `output` (or stdout), the Odoo-side change to stderr; 0, or 1 with one line."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        if output is not None and output.exists() and not force:
            raise ImportFailed(f"{output} exists; not overwriting it (move it away first)")
        output_dir = output.absolute().parent if output is not None else Path.cwd()
        result = import_odoo(dsn, output_dir=output_dir, secrets_dir=secrets_dir)
        if output is None:
            stdout.write(result.yaml_text)
        else:
            write_text(output, result.yaml_text, 0o644)
    except ImportFailed as exc:
        print(f"mailgate import-odoo: error: {exc}", file=stderr)
        return EXIT["failure"]
    except OSError as exc:
        print(f"mailgate import-odoo: error: {exc.filename or ''}: {exc.strerror or exc}", file=stderr)
        return EXIT["failure"]
    for warning in result.warnings:
        print(f"mailgate import-odoo: warning: {warning}", file=stderr)
    where = f"wrote {output}" if output is not None else "configuration written to stdout"
    secrets_note = f"; {len(result.secret_files)} password file(s) (0600) in {result.secret_files[0].parent}" \
        if result.secret_files else ""
    print(f"mailgate import-odoo: {where}{secrets_note}; check it with: mailgate check-config", file=stderr)
    print(result.odoo_changes, file=stderr)
    return EXIT["ok"]
