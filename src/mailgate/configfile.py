"""Loading the YAML configuration, with one clear line per problem.

Operators edit this file by hand on a live mail server, so every problem names the file, the
line and the key, and says what was expected; unknown keys get a did-you-mean. All problems are
collected in one pass instead of stopping at the first. Warnings (odd but workable settings)
are reported without refusing the file.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass, fields as dc_fields
from pathlib import Path
from typing import Any, Callable

import yaml

from mailgate.addresses import is_valid_address, is_valid_domain
from mailgate.config import (BOUNCE_FORWARDS, QUOTA_ACTIONS, DIRECT_WRITE_ACTIONS, LOOP_ACTIONS, MALFORMED_ACTIONS, QUOTA_SCOPES,
                             SECURITY_MODES, SERVER_SELECTIONS, Alias, BounceSettings, Config,
                             ListenSettings, LoopSettings, MassMailSettings, OdooSettings, PolicySettings,
                             QuotaSettings, Server)
from mailgate.filters import FromFilter

_SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
_LOCAL_PART = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$", re.I)
_IMPLICIT_TLS_PORTS = {465}
_STARTTLS_PORTS = {25, 587, 2525}


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    key: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else "warning: "
        return f"{self.file}:{self.line}: {prefix}{self.key}: {self.message}"


class ConfigError(Exception):
    """The file cannot be used; `problems` holds every error and warning found."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    warnings: tuple[ConfigProblem, ...]


class _Invalid(Exception):
    """A value is of the wrong shape; the message says what was expected."""


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"'{str(value).lower()}'"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value) if isinstance(value, str) else f"'{value}'"


# Converters: python value -> typed value, raising _Invalid with what was expected.

def _str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Invalid(f"expected text, got {_describe(value)}")
    return str(value).strip()


def _opt_str(value: Any) -> str | None:
    return None if value is None else (_str(value) or None)


def _int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected a whole number, got {_describe(value)}")
        if not low <= value <= high:
            raise _Invalid(f"expected a number from {low} to {high}, got {value}")
        return value
    return convert


def _opt_int(low: int, high: int) -> Callable[[Any], int | None]:
    inner = _int(low, high)
    return lambda value: None if value is None else inner(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_describe(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _str(value).lower()
        if text not in options:
            raise _Invalid(f"expected one of {', '.join(options)}, got {_describe(value)}")
        return text
    return convert


def _str_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if not isinstance(value, list):
        raise _Invalid(f"expected a list, got {_describe(value)}")
    return tuple(_str(v) for v in value)


def _domain(value: Any) -> str:
    text = _str(value).lower()
    if not is_valid_domain(text):
        raise _Invalid(f"expected a domain name like mycompany.com, got {_describe(value)}")
    return text


def _opt_domain(value: Any) -> str | None:
    return None if value in (None, "") else _domain(value)


def _domains(value: Any) -> tuple[str, ...]:
    return tuple(_domain(v) for v in _str_list(value))


def _address(value: Any) -> str:
    text = _str(value)
    if not is_valid_address(text):
        raise _Invalid(f"expected an email address like name@example.com, got {_describe(value)}")
    return text


def _addresses(value: Any) -> tuple[str, ...]:
    return tuple(_address(v) for v in _str_list(value))


def _default_from(value: Any) -> str | None:
    text = _opt_str(value)
    if text is None:
        return None
    if "@" in text:
        return _address(text)
    if not _LOCAL_PART.match(text):
        raise _Invalid(f"expected a local part (notifications) or an address, got {_describe(value)}")
    return text


def _from_filter(value: Any) -> FromFilter:
    if value is None:
        return FromFilter.empty()
    parts = list(_str_list(value)) if isinstance(value, list) else [p.strip() for p in _str(value).split(",")]
    for part in (p for p in parts if p):
        if "@" in part and not is_valid_address(part):
            raise _Invalid(f"'{part}' is not an email address")
        if "@" not in part and not is_valid_domain(part):
            raise _Invalid(f"'{part}' is not a domain (expected a domain, an address or a comma list)")
    return FromFilter.parse(",".join(parts))


def _path(value: Any) -> Path:
    return Path(_str(value))


def _opt_path(value: Any) -> Path | None:
    return None if value in (None, "") else _path(value)


def _database(value: Any) -> str:
    text = _str(value)
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        raise _Invalid("expected the path of a SQLite file or a postgresql:// URL")
    return text


def _socket_spec(value: Any) -> str:
    from mailgate.sockets import parse_socket_spec
    text = _str(value)
    try:
        return str(parse_socket_spec(text))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _header_signs(value: Any) -> tuple[tuple[str, str | None], ...]:
    """`[Precedence: bulk, List-Unsubscribe]`: a header with a value, or a header's presence."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of 'Header: value' or 'Header', got {_describe(value)}")
    signs: list[tuple[str, str | None]] = []
    for item in value:
        if isinstance(item, dict) and len(item) == 1:
            (name, wanted), = item.items()
            signs.append((_str(name).lower(), None if wanted is None else _str(wanted).lower()))
        elif isinstance(item, str):
            name, colon, wanted = item.partition(":")
            signs.append((name.strip().lower(), wanted.strip().lower() if colon else None))
        else:
            raise _Invalid(f"expected 'Header: value' or 'Header', got {_describe(item)}")
    return tuple(signs)


class _Reader:
    """Walks the composed YAML nodes, so every value keeps the line it came from."""

    def __init__(self, loader: yaml.SafeLoader, file: str, base: Path):
        self.loader = loader
        self.file = file
        self.base = base
        self.problems: list[ConfigProblem] = []

    def problem(self, node: yaml.Node | None, key: str, message: str, severity: str = "error") -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(ConfigProblem(self.file, line, key, message, severity))

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node | None, key: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if node is None or (isinstance(node, yaml.ScalarNode) and self.value(node) is None):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, f"expected a mapping of keys, got {_describe(self.value(node))}")
            return {}
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = str(self.value(key_node))
            full = f"{key}.{name}" if key else name
            if name in entries:
                self.problem(key_node, full, "given twice; the second one would silently win")
            entries[name] = (key_node, value_node)
        return entries

    def section(self, node: yaml.Node | None, key: str,
                converters: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
        """Convert the known keys of a mapping; report unknown keys with a did-you-mean."""
        result: dict[str, Any] = {}
        for name, (key_node, value_node) in self.mapping(node, key).items():
            full = f"{key}.{name}" if key else name
            if name not in converters:
                close = difflib.get_close_matches(name, list(converters), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(converters)}"
                self.problem(key_node, full, f"unknown key{hint}")
                continue
            try:
                result[name] = converted = converters[name](self.value(value_node))
                if isinstance(converted, Path) and not converted.is_absolute():
                    result[name] = self.base / converted
            except _Invalid as exc:
                self.problem(value_node, full, str(exc))
            except (TypeError, ValueError) as exc:
                self.problem(value_node, full, f"invalid value: {exc}")
            result.setdefault(f"__line__{name}", value_node)
        return result


def _known(cls: type) -> set[str]:
    return {f.name for f in dc_fields(cls)}


def _build(cls: type, values: dict[str, Any], **extra: Any) -> Any:
    kwargs = {k: v for k, v in values.items() if k in _known(cls)}
    kwargs.update(extra)
    return cls(**kwargs)


def _node(values: dict[str, Any], name: str) -> yaml.Node | None:
    return values.get(f"__line__{name}")


_TOP = {
    "alias_domain": _opt_domain, "default_from": _default_from, "default_from_filter": _from_filter,
    "catchall_alias": lambda v: _local_part(v), "bounce_alias": lambda v: _local_part(v),
    "allowed_alias_domains": _domains, "aliases": lambda v: v, "catchall_direct_write": _choice(DIRECT_WRITE_ACTIONS),
    "fallback_target": _opt_str, "loop": lambda v: v, "bounces": lambda v: v, "quota": lambda v: v,
    "servers": lambda v: v, "mass_mail": lambda v: v, "inbound_listeners": _str_list, "listen": lambda v: v,
    "policy": lambda v: v,
    "odoo": lambda v: v, "server_selection": _choice(SERVER_SELECTIONS), "dry_run": _bool,
    "database": _database, "database_password_file": _opt_path, "secret_file": _path,
}
_SECTIONS = ("aliases", "loop", "bounces", "quota", "servers", "mass_mail", "listen", "policy", "odoo")


def _local_part(value: Any) -> str:
    text = _str(value)
    if not _LOCAL_PART.match(text):
        raise _Invalid(f"expected the local part of an address (no @), got {_describe(value)}")
    return text.lower()


_SERVER = {
    "name": _str, "host": _str, "port": _int(1, 65535), "security": _choice(SECURITY_MODES),
    "username": _opt_str, "password_file": _opt_path, "from_filter": _from_filter,
    "priority": _int(-1_000_000, 1_000_000), "active": _bool, "tls_verify": _bool, "tls_ca_file": _opt_path,
}
_LOOP = {"minutes": _int(1, 525_600), "threshold": _int(1, 1_000_000), "action": _choice(LOOP_ACTIONS),
         "allowed_senders": _addresses}
_BOUNCES = {"blacklist_after": _int(1, 1000), "window_days": _int(1, 3650), "min_spread_days": _int(0, 3650),
            "count_soft": _bool, "token_days": _int(1, 3650), "forward": _choice(BOUNCE_FORWARDS)}
_QUOTA = {"daily": _opt_int(1, 100_000_000), "mass_daily": _opt_int(1, 100_000_000), "scope": _choice(QUOTA_SCOPES),
          "action": _choice(QUOTA_ACTIONS)}
_MASS = {"server": _opt_str, "listeners": _str_list, "sasl_users": _str_list, "headers": _header_signs}
_LISTEN = {"milter": _socket_spec, "lookup": _socket_spec, "policy": _socket_spec, "socket_group": _opt_str}
_POLICY = {"on_malformed": _choice(MALFORMED_ACTIONS)}
_ODOO = {"url": _str, "database": _str, "user": _str, "password_file": _opt_path}
_ALIAS = {"target": _str, "domain": _domain, "incoming_local": _bool}


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
    reader = _Reader(loader, file, base)
    top = reader.section(root, "", _TOP)
    if "database" in top and "://" not in top["database"] and not Path(top["database"]).is_absolute():
        top["database"] = str(base / top["database"])
    nodes = {k: _node(top, k) for k in _SECTIONS}
    servers = _servers(reader, nodes["servers"], check_files)
    alias_domain = top.get("alias_domain")
    aliases = _aliases(reader, nodes["aliases"], alias_domain)
    allowed = tuple(dict.fromkeys([*(d for d in [alias_domain] if d), *(a.domain for a in aliases),
                                   *top.get("allowed_alias_domains", ())]))
    mass = reader.section(nodes["mass_mail"], "mass_mail", _MASS)
    config = _build(
        Config, top, servers=servers, aliases=aliases, allowed_alias_domains=allowed,
        loop=_build(LoopSettings, reader.section(nodes["loop"], "loop", _LOOP)),
        bounces=_build(BounceSettings, reader.section(nodes["bounces"], "bounces", _BOUNCES)),
        quota=_build(QuotaSettings, reader.section(nodes["quota"], "quota", _QUOTA)),
        mass_mail=_build(MassMailSettings, mass),
        listen=_build(ListenSettings, reader.section(nodes["listen"], "listen", _LISTEN)),
        policy=_build(PolicySettings, reader.section(nodes["policy"], "policy", _POLICY)),
        odoo=_build(OdooSettings, reader.section(nodes["odoo"], "odoo", _ODOO)),
        source=Path(file),
    )
    _cross_checks(reader, config, top, mass, check_files)
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


def _servers(reader: _Reader, node: yaml.Node | None, check_files: bool) -> tuple[Server, ...]:
    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode):
        if not (isinstance(node, yaml.ScalarNode) and reader.value(node) is None):
            reader.problem(node, "servers", "expected a list of servers (each item starting with '- name:')")
        return ()
    servers: list[Server] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(node.value):
        key = f"servers[{position}]"
        names = [v for k, v in item.value if k.value == "name"] if isinstance(item, yaml.MappingNode) else []
        if names:
            key = f"servers[{position}]({reader.value(names[0])})"
        values = reader.section(item, key, _SERVER)
        name = values.get("name")
        missing = [k for k in ("name", "host") if k not in values and _node(values, k) is None]
        for required in missing:
            reader.problem(item, f"{key}.{required}", "missing (every server needs a name and a host)")
        if "name" not in values or "host" not in values:
            continue
        if not _SERVER_NAME.match(name):
            reader.problem(_node(values, "name"), f"{key}.name",
                           "expected lower-case letters, digits, '-' or '_' (it names a Postfix transport)")
            continue
        if name in seen:
            reader.problem(_node(values, "name"), f"{key}.name", f"duplicate server name (also at line {seen[name]})")
            continue
        seen[name] = _node(values, "name").start_mark.line + 1
        port = values.get("port", 587)
        security = values.get("security") or ("tls" if port in _IMPLICIT_TLS_PORTS else "starttls")
        _check_security(reader, values, key, port, security)
        server = _build(Server, values, port=port, security=security, position=position)
        if check_files:
            _check_server_files(reader, server, values, key, item)
        servers.append(server)
    return tuple(servers)


def _check_server_files(reader: _Reader, server: Server, values: dict[str, Any], key: str,
                        item: yaml.Node) -> None:
    if server.username and not server.password_file:
        reader.problem(_node(values, "username"), f"{key}.password_file", "username given without password_file")
    if server.password_file:
        _check_secret(reader, server.password_file, _node(values, "password_file"), f"{key}.password_file")
        if not server.username:
            reader.problem(_node(values, "password_file"), f"{key}.username", "password_file given without username")
    if server.tls_ca_file and not server.tls_ca_file.is_file():
        reader.problem(_node(values, "tls_ca_file"), f"{key}.tls_ca_file", f"no such file: {server.tls_ca_file}")


def _check_security(reader: _Reader, values: dict[str, Any], key: str, port: int, security: str) -> None:
    node = _node(values, "security") or _node(values, "port")
    if security == "tls" and port in _STARTTLS_PORTS:
        reader.problem(node, f"{key}.security",
                       f"'tls' (TLS on connect) on port {port}: that port usually speaks STARTTLS; "
                       "use security: starttls, or port 465", "warning")
    if security == "starttls" and port == 465:
        reader.problem(node, f"{key}.security",
                       "'starttls' on port 465: that port expects TLS on connect; use security: tls", "warning")
    if port == 25:
        reader.problem(_node(values, "port"), f"{key}.port",
                       "port 25 is blocked by many hosting providers: use 465, 587 or 2525", "warning")
    if security == "none" and values.get("username"):
        reader.problem(node, f"{key}.security", "a password would travel unencrypted: use starttls or tls",
                       "warning")


def _aliases(reader: _Reader, node: yaml.Node | None, alias_domain: str | None) -> tuple[Alias, ...]:
    aliases: list[Alias] = []
    for name, (key_node, value_node) in reader.mapping(node, "aliases").items():
        key = f"aliases.{name}"
        try:
            local = _local_part(name)
        except _Invalid as exc:
            reader.problem(key_node, key, str(exc))
            continue
        if isinstance(value_node, yaml.ScalarNode):
            values = {"target": reader.value(value_node)}
        else:
            values = reader.section(value_node, key, _ALIAS)
        target = values.get("target")
        if not target:
            reader.problem(value_node, f"{key}.target", "missing: where Postfix delivers mail for this alias")
            continue
        domain = values.get("domain") or alias_domain
        if not domain:
            reader.problem(value_node, f"{key}.domain", "no domain: set alias_domain or this alias's domain")
            continue
        aliases.append(Alias(local, str(target), domain, values.get("incoming_local", False)))
    return tuple(aliases)


def _cross_checks(reader: _Reader, config: Config, top: dict[str, Any], mass: dict[str, Any],
                  check_files: bool) -> None:
    """Checks that involve several keys or the file system."""
    mass_name = config.mass_mail.server
    if mass_name and config.server_named(mass_name) is None:
        names = [s.name for s in config.servers]
        close = difflib.get_close_matches(mass_name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; servers are: {', '.join(names) or 'none'}"
        reader.problem(_node(mass, "server"), "mass_mail.server", f"no server named '{mass_name}'{hint}")
    elif mass_name and not config.server_named(mass_name).active:
        reader.problem(_node(mass, "server"), "mass_mail.server",
                       f"server '{mass_name}' is inactive: mass mail will follow the normal order", "warning")
    if "default_from" in top and config.default_from and "@" not in config.default_from and not config.alias_domain:
        reader.problem(_node(top, "default_from"), "default_from",
                       "a local part without alias_domain gives no notification address: no From is rewritten",
                       "warning")
    if config.servers and not config.active_servers:
        reader.problem(_node(top, "servers"), "servers", "every server is inactive: Postfix's default route "
                       "is used for all mail", "warning")
    if not check_files:
        return
    if config.secret_file.exists():
        _check_secret(reader, config.secret_file, _node(top, "secret_file"), "secret_file")
    if config.database_password_file:
        _check_secret(reader, config.database_password_file, _node(top, "database_password_file"),
                      "database_password_file")


def _check_secret(reader: _Reader, path: Path, node: yaml.Node | None, key: str) -> None:
    """Secrets must exist, be readable, and not be readable by everybody."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        reader.problem(node, key, f"no such file: {path}")
        return
    except OSError as exc:
        reader.problem(node, key, f"cannot read {path}: {exc.strerror}")
        return
    if mode & stat.S_IROTH:
        reader.problem(node, key, f"{path} is readable by everybody: chmod 0640 (or 0600) it")
    elif not os.access(path, os.R_OK):
        reader.problem(node, key, f"{path} is not readable by this user")
