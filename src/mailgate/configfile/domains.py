"""The alias domains: the `alias_domains` list, or the one-domain shorthand.

Odoo 17 replaced the system parameters `mail.catchall.domain`, `mail.bounce.alias`,
`mail.catchall.alias` and `mail.default.from` by `mail.alias.domain` records; the file mirrors
both: `alias_domains:` lists the records, and the four old keys at the top (`alias_domain`,
`bounce_alias`, `catchall_alias`, `default_from`) still describe one domain, so that every file
written before keeps loading. The two forms do not mix.
"""

from __future__ import annotations

from typing import Any

import yaml

from mailgate.config import Alias, AliasDomain
from mailgate.configfile.reader import Reader, build, node_of
from mailgate.configfile.values import ALIAS_DOMAIN

SHORTHAND = ("alias_domain", "bounce_alias", "catchall_alias")
MAX_ALIAS_DOMAINS = 200


def read_alias_domains(reader: Reader, node: yaml.Node | None, top: dict[str, Any]) -> tuple[AliasDomain, ...]:
    """The list when given (each entry on its own line), else the shorthand's one entry."""
    if node is None or (isinstance(node, yaml.ScalarNode) and reader.value(node) is None):
        return _shorthand(reader, top)
    for key in (*SHORTHAND, "default_from"):
        if key in top:
            reader.problem(node_of(top, key), key, "alias_domains is set: give each domain's "
                           f"{'name' if key == 'alias_domain' else key} in its entry, not at the top")
    if not isinstance(node, yaml.SequenceNode):
        reader.problem(node, "alias_domains", "expected a list of domains (each item starting with '- name:')")
        return ()
    if len(node.value) > MAX_ALIAS_DOMAINS:
        reader.problem(node, "alias_domains", f"{len(node.value)} alias domains: at most {MAX_ALIAS_DOMAINS}")
        return ()
    domains: list[AliasDomain] = []
    seen: dict[str, int] = {}
    for position, item in enumerate(node.value):
        key = f"alias_domains[{position}]"
        if isinstance(item, yaml.ScalarNode):  # `- brand.example`: a domain with Odoo's defaults
            values: dict[str, Any] = reader.section(_name_only(item), key, ALIAS_DOMAIN)
        else:
            values = reader.section(item, key, ALIAS_DOMAIN)
        if "name" not in values:
            if node_of(values, "name") is None:
                reader.problem(item, f"{key}.name", "missing (every alias domain needs its name)")
            continue
        name = values["name"]
        line = item.start_mark.line + 1
        if name in seen:
            reader.problem(node_of(values, "name") or item, f"{key}.name",
                           f"duplicate alias domain {name} (also at line {seen[name]})")
            continue
        seen[name] = line
        domains.append(build(AliasDomain, values))
    _check_collisions(reader, node, domains)
    return tuple(domains)


def _name_only(item: yaml.ScalarNode) -> yaml.MappingNode:
    """`- brand.example` read as `- name: brand.example`, keeping the item's line."""
    key = yaml.ScalarNode("tag:yaml.org,2002:str", "name", item.start_mark, item.end_mark)
    return yaml.MappingNode("tag:yaml.org,2002:map", [(key, item)], item.start_mark, item.end_mark)


def _shorthand(reader: Reader, top: dict[str, Any]) -> tuple[AliasDomain, ...]:
    name = top.get("alias_domain")
    if not name:
        for key in ("bounce_alias", "catchall_alias"):
            if key in top:
                reader.problem(node_of(top, key), key, "without alias_domain there is no such address: "
                               "this key has no effect", "warning")
        return ()
    values = {k: top[k] for k in ("bounce_alias", "catchall_alias", "default_from") if k in top}
    domain = AliasDomain(name, **values)
    _check_collisions(reader, node_of(top, "alias_domain"), [domain])
    return (domain,)


def _check_collisions(reader: Reader, node: yaml.Node | None, domains: list[AliasDomain]) -> None:
    """A domain's bounce and catchall addresses are two different routes: they must differ."""
    for domain in domains:
        if domain.bounce_alias == domain.catchall_alias:
            reader.problem(node, "alias_domains", f"{domain.name}: the bounce and catchall addresses are both "
                           f"{domain.bounce_address}: give them different aliases")


def with_alias_domains_of_aliases(reader: Reader, domains: tuple[AliasDomain, ...], aliases: tuple[Alias, ...],
                                  listed: bool, aliases_node: yaml.Node | None) -> tuple[AliasDomain, ...]:
    """Every alias lives on an alias domain. With the list, an alias on another domain is an
    error; with the shorthand (where files have always been able to give an alias its own
    domain), that domain joins as one more entry with the same bounce and catchall aliases and
    the first domain's notification address, which is how it behaved before the list existed."""
    known = {d.name for d in domains}
    added = list(domains)
    for alias in aliases:
        if alias.domain in known:
            continue
        if listed:
            reader.problem(aliases_node, f"aliases.{alias.name}.domain",
                           f"{alias.domain} is not one of the alias_domains ({', '.join(sorted(known))})")
            continue
        known.add(alias.domain)
        first = domains[0] if domains else None
        added.append(AliasDomain(alias.domain, first.bounce_alias if first else "bounce",
                                 first.catchall_alias if first else "catchall",
                                 first.notification_address if first else None))
    return tuple(added)


def check_special_addresses(reader: Reader, domains: tuple[AliasDomain, ...], aliases: tuple[Alias, ...],
                            aliases_node: yaml.Node | None) -> None:
    """An alias named like its domain's bounce or catchall address would never be reached."""
    special = {d.bounce_address.lower(): "bounce" for d in domains}
    special.update({d.catchall_address.lower(): "catchall" for d in domains})
    for alias in aliases:
        role = special.get(alias.address.lower())
        if role:
            reader.problem(aliases_node, f"aliases.{alias.name}",
                           f"{alias.address} is the {role} address of {alias.domain}: pick another alias name")
