"""Reading the YAML node tree, so that every problem can name the line it comes from.

The file is composed into nodes rather than loaded into plain Python values: a node keeps its
position, a plain value does not. The reader converts each known key with its converter from
`values` and records a problem (file, line, key, message) for anything wrong, instead of raising.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import yaml

from mailgate.configfile.limits import MAX_PROBLEMS, TooManyProblems
from mailgate.configfile.problems import ConfigProblem
from mailgate.configfile.values import Doubtful, Invalid, describe


class Reader:
    """Walks the composed YAML nodes, so every value keeps the line it came from."""

    def __init__(self, loader: yaml.SafeLoader, file: str, base: Path):
        self.loader = loader
        self.file = file
        self.base = base
        self.problems: list[ConfigProblem] = []

    def problem(self, node: yaml.Node | None, key: str, message: str, severity: str = "error") -> None:
        """Record a problem on the node's line (line 0, none, for a key left at its default)."""
        if len(self.problems) >= MAX_PROBLEMS:
            raise TooManyProblems()
        line = node.start_mark.line + 1 if node is not None else 0
        self.problems.append(ConfigProblem(self.file, line, key, message, severity))

    def value(self, node: yaml.Node) -> Any:
        """The plain Python value of a node; a value YAML cannot build (a date like 2020-13-45,
        an unhashable key, an unknown tag) is a yaml.MarkedYAMLError on its line."""
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            # PyYAML leaves the failed node marked as under construction: clear it, or the next
            # read of a node around it reports a "recursive node" that is not one.
            self.loader.recursive_objects.clear()
            self.loader.state_generators = []
            self.loader.deep_construct = False
            if isinstance(exc, yaml.MarkedYAMLError):
                raise
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this value: {exc}",
                                                    node.start_mark) from None

    def mapping(self, node: yaml.Node | None, key: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if node is None or (isinstance(node, yaml.ScalarNode) and self.value(node) is None):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, f"expected a mapping of keys, got {describe(self.value(node))}")
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
                converters: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
        """Convert the known keys of a mapping; report unknown keys with a did-you-mean.

        A known key written with no value at all (`bounce_alias:`) is left out, so it keeps its
        default, as in a form where a field was left blank; `null` (or `~`) written out is a value,
        "none", where a key accepts it (`quota.daily: null`).
        """
        result: dict[str, Any] = {}
        for name, (key_node, value_node) in self.mapping(node, key).items():
            full = f"{key}.{name}" if key else name
            if name not in converters:
                close = difflib.get_close_matches(name, list(converters), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(converters)}"
                self.problem(key_node, full, f"unknown key{hint}")
                continue
            if is_blank(value_node):
                continue
            try:
                result[name] = converted = converters[name](self.value(value_node))
                if isinstance(converted, Path) and not converted.is_absolute():
                    result[name] = self.base / converted
            except Doubtful as doubt:
                result[name] = doubt.value
                self.problem(value_node, full, str(doubt), "warning")
            except Invalid as exc:
                self.problem(value_node, full, str(exc))
            except yaml.MarkedYAMLError as exc:
                self.problem(value_node, full, str(exc.problem or exc))
            except (TypeError, ValueError) as exc:
                self.problem(value_node, full, f"invalid value: {exc}")
            result.setdefault(f"__line__{name}", value_node)
        return result


def is_blank(node: yaml.Node) -> bool:
    """A value left empty (`key:` and nothing after it), not an explicit `null` or `~`."""
    return (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null" and node.value == ""
            and node.style is None)


def _known(cls: type) -> set[str]:
    return {f.name for f in dc_fields(cls)}


def build(cls: type, values: dict[str, Any], **extra: Any) -> Any:
    kwargs = {k: v for k, v in values.items() if k in _known(cls)}
    kwargs.update(extra)
    return cls(**kwargs)


def node_of(values: dict[str, Any], name: str) -> yaml.Node | None:
    return values.get(f"__line__{name}")
