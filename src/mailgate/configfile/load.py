"""The entry points: parse the text (or read the file), then assemble the immutable Config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mailgate.config import (
    BounceSettings,
    Config,
    ListenSettings,
    LoopSettings,
    MassMailSettings,
    OdooSettings,
    PolicySettings,
    QuotaSettings,
)
from mailgate.configfile.domains import check_special_addresses, read_alias_domains, with_alias_domains_of_aliases
from mailgate.configfile.limits import MAX_CONFIG_BYTES, MAX_PROBLEMS, BoundedLoader, TooManyProblems
from mailgate.configfile.problems import ConfigError, ConfigProblem
from mailgate.configfile.reader import Reader, build, node_of
from mailgate.configfile.sections import cross_checks, read_aliases, read_servers
from mailgate.configfile.values import BOUNCES, LISTEN, LOOP, MASS, ODOO, POLICY, QUOTA, SECTIONS, TOP
from mailgate.infra.secretfile import UnusableFile, read_regular_file


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    warnings: tuple[ConfigProblem, ...]


def _yaml_problem(file: str, exc: yaml.YAMLError) -> ConfigProblem:
    mark = (exc.problem_mark or exc.context_mark) if isinstance(exc, yaml.MarkedYAMLError) else None
    message = (exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None) or str(exc)
    return ConfigProblem(file, mark.line + 1 if mark else 0, "(yaml)", message)


def parse_config(text: str, file: str = "<config>", *, check_files: bool = True, check_startup: bool = False,
                 base: Path | None = None) -> LoadedConfig:
    """Parse and validate configuration text; raise ConfigError listing every error found.

    Relative paths in the file are taken relative to `base` (the file's folder), so a config
    and its secrets can move together. `check_startup` (check-config, serve) also checks what
    `serve` needs at start: that a missing bounce-token key can be made. The work is bounded
    (`configfile.limits`): past a bound the file is refused with one line.
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(file, 0, "", f"too big: more than {MAX_CONFIG_BYTES} bytes")])
    loader = BoundedLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(file, exc)]) from None
    except RecursionError:  # a backstop: BoundedLoader refuses deep nesting long before
        raise ConfigError([ConfigProblem(file, 0, "(yaml)", "nested too deeply")]) from None
    finally:
        loader.dispose()
    reader = Reader(loader, file, base or Path.cwd())
    try:
        loaded = _read(reader, root, check_files, check_startup)
    except TooManyProblems:
        raise ConfigError([*sorted(reader.problems, key=lambda p: p.line),
                           ConfigProblem(file, 0, "", f"more than {MAX_PROBLEMS} problems: stopped")]) from None
    except yaml.YAMLError as exc:  # a value YAML cannot build, outside any key's own check
        raise ConfigError([*sorted(reader.problems, key=lambda p: p.line), _yaml_problem(file, exc)]) from None
    except RecursionError:
        raise ConfigError([ConfigProblem(file, 0, "(yaml)", "nested too deeply")]) from None
    return loaded


def _read(reader: Reader, root: yaml.Node | None, check_files: bool, check_startup: bool) -> LoadedConfig:
    """Assemble the Config from the composed nodes, every problem recorded in `reader`."""
    file, base = reader.file, reader.base
    top = reader.section(root, "", TOP)
    if "database" in top and "://" not in top["database"] and not Path(top["database"]).is_absolute():
        top["database"] = str(base / top["database"])
    nodes = {k: node_of(top, k) for k in SECTIONS}
    servers = read_servers(reader, nodes["servers"], check_files)
    domains = read_alias_domains(reader, nodes["alias_domains"], top)
    aliases = read_aliases(reader, nodes["aliases"], domains[0].name if domains else None)
    domains = with_alias_domains_of_aliases(reader, domains, aliases, nodes["alias_domains"] is not None,
                                            nodes["aliases"])
    check_special_addresses(reader, domains, aliases, nodes["aliases"])
    allowed = tuple(dict.fromkeys([*(d.name for d in domains), *top.get("allowed_alias_domains", ())]))
    mass = reader.section(nodes["mass_mail"], "mass_mail", MASS)
    config = build(
        Config, top, alias_domains=domains, servers=servers, aliases=aliases, allowed_alias_domains=allowed,
        incoming_local_anywhere=top.get("allowed_alias_domains", None) == (),
        loop=build(LoopSettings, reader.section(nodes["loop"], "loop", LOOP)),
        bounces=build(BounceSettings, bounce_values(reader, reader.section(nodes["bounces"], "bounces", BOUNCES))),
        quota=build(QuotaSettings, reader.section(nodes["quota"], "quota", QUOTA)),
        mass_mail=build(MassMailSettings, mass),
        listen=build(ListenSettings, reader.section(nodes["listen"], "listen", LISTEN)),
        policy=build(PolicySettings, reader.section(nodes["policy"], "policy", POLICY)),
        odoo=build(OdooSettings, reader.section(nodes["odoo"], "odoo", ODOO)),
        source=Path(file),
    )
    cross_checks(reader, config, top, mass, check_files, check_startup)
    errors = [p for p in reader.problems if p.severity == "error"]
    if errors:
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line))
    return LoadedConfig(config, tuple(p for p in reader.problems if p.severity != "error"))


def bounce_values(reader: Reader, values: dict[str, Any]) -> dict[str, Any]:
    """`bounces.count_soft`, the option before `bounces.count`, still loads: `true` (every bounce
    counts) is `count: all`; `false` (hard ones only) is the default, `count: recipient`, since
    "hard" now means the recipient's fault. Given with a `count` that says otherwise, it is an
    error; given at all, a warning naming its replacement."""
    if "count_soft" not in values:
        return values
    meant = "all" if values["count_soft"] else "recipient"
    node = node_of(values, "count_soft")
    if "count" in values and values["count"] != meant:
        reader.problem(node, "bounces.count_soft", f"says count: {meant}, but count: {values['count']} is set too; "
                       "keep count alone")
    else:
        reader.problem(node, "bounces.count_soft", f"replaced by bounces.count (this file means count: {meant})",
                       "warning")
    return {**values, "count": values.get("count", meant)}


def load_config(path: str | os.PathLike[str], *, check_files: bool = True,
                check_startup: bool = False) -> LoadedConfig:
    """Read and validate a configuration file: a regular file of at most MAX_CONFIG_BYTES (not
    /dev/zero, not a named pipe whose open would hang), UTF-8 text."""
    path = Path(path)
    try:
        text = read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8")
    except UnusableFile as exc:
        raise ConfigError([ConfigProblem(str(path), 0, "", str(exc))]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(str(path), 0, "", f"not UTF-8 text: {exc}")]) from None
    return parse_config(text, str(path), check_files=check_files, check_startup=check_startup,
                        base=path.resolve().parent)
