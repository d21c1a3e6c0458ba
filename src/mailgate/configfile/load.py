"""The entry points: parse the text (or read the file), then assemble the immutable Config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
from mailgate.configfile.problems import ConfigError, ConfigProblem
from mailgate.configfile.reader import Reader, build, node_of
from mailgate.configfile.sections import cross_checks, read_aliases, read_servers
from mailgate.configfile.values import BOUNCES, LISTEN, LOOP, MASS, ODOO, POLICY, QUOTA, SECTIONS, TOP


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    warnings: tuple[ConfigProblem, ...]


def parse_config(text: str, file: str = "<config>", *, check_files: bool = True,
                 base: Path | None = None) -> LoadedConfig:
    """Parse and validate configuration text; raise ConfigError listing every error found.

    Relative paths in the file are taken relative to `base` (the file's folder), so a config
    and its secrets can move together.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([ConfigProblem(file, line, "(yaml)", f"{exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(file, 1, "(yaml)", str(exc))]) from None
    finally:
        loader.dispose()
    base = base or Path.cwd()
    reader = Reader(loader, file, base)
    top = reader.section(root, "", TOP)
    if "database" in top and "://" not in top["database"] and not Path(top["database"]).is_absolute():
        top["database"] = str(base / top["database"])
    nodes = {k: node_of(top, k) for k in SECTIONS}
    servers = read_servers(reader, nodes["servers"], check_files)
    alias_domain = top.get("alias_domain")
    aliases = read_aliases(reader, nodes["aliases"], alias_domain)
    allowed = tuple(dict.fromkeys([*(d for d in [alias_domain] if d), *(a.domain for a in aliases),
                                   *top.get("allowed_alias_domains", ())]))
    mass = reader.section(nodes["mass_mail"], "mass_mail", MASS)
    config = build(
        Config, top, servers=servers, aliases=aliases, allowed_alias_domains=allowed,
        incoming_local_anywhere=top.get("allowed_alias_domains", None) == (),
        loop=build(LoopSettings, reader.section(nodes["loop"], "loop", LOOP)),
        bounces=build(BounceSettings, reader.section(nodes["bounces"], "bounces", BOUNCES)),
        quota=build(QuotaSettings, reader.section(nodes["quota"], "quota", QUOTA)),
        mass_mail=build(MassMailSettings, mass),
        listen=build(ListenSettings, reader.section(nodes["listen"], "listen", LISTEN)),
        policy=build(PolicySettings, reader.section(nodes["policy"], "policy", POLICY)),
        odoo=build(OdooSettings, reader.section(nodes["odoo"], "odoo", ODOO)),
        source=Path(file),
    )
    cross_checks(reader, config, top, mass, check_files)
    errors = [p for p in reader.problems if p.severity == "error"]
    if errors:
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line))
    return LoadedConfig(config, tuple(p for p in reader.problems if p.severity != "error"))


def load_config(path: str | os.PathLike[str], *, check_files: bool = True) -> LoadedConfig:
    """Read and validate a configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), 0, "(file)", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(str(path), 0, "(file)", f"not UTF-8 text: {exc}")]) from None
    return parse_config(text, str(path), check_files=check_files, base=path.resolve().parent)
