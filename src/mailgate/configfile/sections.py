"""The parts of the file read entry by entry (servers, aliases), and the checks across keys.

Servers and aliases are a list and a map of entries, each entry checked on its own line; the
cross checks and the secret-file checks look at several keys together, or at the file system.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from mailgate.config import Alias, Config, Server
from mailgate.configfile.limits import MAX_ALIASES, MAX_SERVERS
from mailgate.configfile.oauth import check_oauth_files, read_oauth
from mailgate.configfile.reader import Reader, build, node_of
from mailgate.configfile.values import ALIAS, SERVER, Doubtful, Invalid, domain_name, local_part
from mailgate.infra.secretfile import UnusableFile, bounce_key_problem, read_password_file

_SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
_IMPLICIT_TLS_PORTS = {465}
_STARTTLS_PORTS = {25, 587, 2525}


def read_servers(reader: Reader, node: yaml.Node | None, check_files: bool) -> tuple[Server, ...]:
    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode):
        if not (isinstance(node, yaml.ScalarNode) and reader.value(node) is None):
            reader.problem(node, "servers", "expected a list of servers (each item starting with '- name:')")
        return ()
    if len(node.value) > MAX_SERVERS:
        reader.problem(node, "servers", f"{len(node.value)} servers: at most {MAX_SERVERS}")
        return ()
    servers: list[Server] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(node.value):
        key = f"servers[{position}]"
        names = [v for k, v in item.value if k.value == "name"] if isinstance(item, yaml.MappingNode) else []
        if names:
            key = f"servers[{position}]({reader.value(names[0])})"
        values = reader.section(item, key, SERVER)
        missing = [k for k in ("name", "host") if k not in values and node_of(values, k) is None]
        for required in missing:
            reader.problem(item, f"{key}.{required}", "missing (every server needs a name and a host)")
        if "name" not in values or "host" not in values:
            continue
        name = values["name"]
        if not _SERVER_NAME.match(name):
            reader.problem(node_of(values, "name"), f"{key}.name",
                           "expected lower-case letters, digits, '-' or '_' (it names a Postfix transport)")
            continue
        if name in seen:
            reader.problem(node_of(values, "name"), f"{key}.name", f"duplicate server name (also at line {seen[name]})")
            continue
        name_node = node_of(values, "name")
        assert name_node is not None  # section() keeps the node of every key it converted
        seen[name] = name_node.start_mark.line + 1
        port = values.get("port", 587)
        security = values.get("security") or ("tls" if port in _IMPLICIT_TLS_PORTS else "starttls")
        _check_security(reader, values, key, port, security)
        oauth = read_oauth(reader, {**values, "security": security}, key)
        server = build(Server, {k: v for k, v in values.items() if k != "oauth"}, port=port, security=security,
                       position=position, **oauth)
        if check_files:
            _check_server_files(reader, server, values, key, item)
            if server.oauth is not None:
                check_oauth_files(reader, server.oauth, values, key)
        servers.append(server)
    return tuple(servers)


def _check_server_files(reader: Reader, server: Server, values: dict[str, Any], key: str,
                        item: yaml.Node) -> None:
    if server.username and not server.password_file and server.auth == "password":
        reader.problem(node_of(values, "username"), f"{key}.password_file", "username given without password_file")
    if server.password_file:
        _check_secret(reader, server.password_file, node_of(values, "password_file"), f"{key}.password_file")
        if not server.username:
            reader.problem(node_of(values, "password_file"), f"{key}.username", "password_file given without username")
    if server.tls_ca_file and not server.tls_ca_file.is_file():
        reader.problem(node_of(values, "tls_ca_file"), f"{key}.tls_ca_file", f"no such file: {server.tls_ca_file}")


def _check_security(reader: Reader, values: dict[str, Any], key: str, port: int, security: str) -> None:
    node = node_of(values, "security") or node_of(values, "port")
    if security == "tls" and port in _STARTTLS_PORTS:
        reader.problem(node, f"{key}.security",
                       f"'tls' (TLS on connect) on port {port}: that port usually speaks STARTTLS; "
                       "use security: starttls, or port 465", "warning")
    if security == "starttls" and port == 465:
        reader.problem(node, f"{key}.security",
                       "'starttls' on port 465: that port expects TLS on connect; use security: tls", "warning")
    if port == 25:
        reader.problem(node_of(values, "port"), f"{key}.port",
                       "port 25 is blocked by many hosting providers: use 465, 587 or 2525", "warning")
    if security == "none" and values.get("username"):
        reader.problem(node, f"{key}.security", "a password would travel unencrypted: use starttls or tls",
                       "warning")


def read_aliases(reader: Reader, node: yaml.Node | None, default_domain: str | None) -> tuple[Alias, ...]:
    """Each alias with its domain: its own `domain:` (or the domain in a `name@domain` key, the
    way to give two domains an alias of the same name), else the first alias domain."""
    aliases: list[Alias] = []
    seen: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode) and len(node.value) > MAX_ALIASES:
        reader.problem(node, "aliases", f"{len(node.value)} aliases: at most {MAX_ALIASES}")
        return ()
    for name, (key_node, value_node) in reader.mapping(node, "aliases").items():
        key = f"aliases.{name}"
        local_text, at, key_domain = name.rpartition("@") if "@" in name else (name, "", "")
        try:
            local = local_part(local_text)
            key_domain = domain_name(key_domain) if at else ""
        except Doubtful as doubt:  # `sales@my_company.com`: kept, as Odoo matches it as written
            reader.problem(key_node, key, str(doubt), "warning")
            key_domain = doubt.value
        except Invalid as exc:
            reader.problem(key_node, key, str(exc))
            continue
        if isinstance(value_node, yaml.ScalarNode):
            values = {"target": reader.value(value_node)}
        else:
            values = reader.section(value_node, key, ALIAS)
        target = values.get("target")
        if not target:
            reader.problem(value_node, f"{key}.target", "missing: where Postfix delivers mail for this alias")
            continue
        if key_domain and values.get("domain", key_domain) != key_domain:
            reader.problem(value_node, f"{key}.domain", f"the key says {key_domain}: leave domain out, or make "
                           "them the same")
            continue
        domain = key_domain or values.get("domain") or default_domain
        if not domain:
            reader.problem(value_node, f"{key}.domain", "no domain: set alias_domains or this alias's domain")
            continue
        address = f"{local}@{domain}"
        if address in seen:
            reader.problem(key_node, key, f"{address} is already an alias (line {seen[address]})")
            continue
        seen[address] = key_node.start_mark.line + 1
        aliases.append(Alias(local, str(target), domain, values.get("incoming_local", False)))
    return tuple(aliases)


def cross_checks(reader: Reader, config: Config, top: dict[str, Any], mass: dict[str, Any],
                  check_files: bool, check_startup: bool = False) -> None:
    """Checks that involve several keys or the file system; with `check_startup`, also what
    `serve` does at start with the files (make a missing bounce-token key), with the same code."""
    mass_name = config.mass_mail.server
    mass_server = config.server_named(mass_name) if mass_name else None
    if mass_name and mass_server is None:
        names = [s.name for s in config.servers]
        close = difflib.get_close_matches(mass_name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; servers are: {', '.join(names) or 'none'}"
        reader.problem(node_of(mass, "server"), "mass_mail.server", f"no server named '{mass_name}'{hint}")
    elif mass_server is not None and not mass_server.active:
        reader.problem(node_of(mass, "server"), "mass_mail.server",
                       f"server '{mass_name}' is inactive: mass mail will follow the normal order", "warning")
    if "default_from" in top and config.default_from and "@" not in config.default_from and not config.alias_domains:
        reader.problem(node_of(top, "default_from"), "default_from",
                       "a local part without alias_domain gives no notification address: no From is rewritten",
                       "warning")
    if config.servers and not config.active_servers:
        reader.problem(node_of(top, "servers"), "servers", "every server is inactive: Postfix's default route "
                       "is used for all mail", "warning")
    if not check_files:
        return
    if check_startup or config.secret_file.exists():
        problem = bounce_key_problem(config.secret_file)
        if problem:
            reader.problem(node_of(top, "secret_file"), "secret_file", problem)
    if config.database_password_file:
        _check_secret(reader, config.database_password_file, node_of(top, "database_password_file"),
                      "database_password_file")


def _check_secret(reader: Reader, path: Path, node: yaml.Node | None, key: str) -> None:
    """A password file is read as `serve` reads it (`infra.secretfile`): it must be a small
    regular file, readable here, UTF-8, and not readable by everybody."""
    try:
        read_password_file(path)
    except UnusableFile as exc:
        reader.problem(node, key, str(exc))
